"""The LV-UNet dock widget: gathers the user's choices, runs work on a background thread.

Data flows one way: image layer -> ``inference.default_pool().get(...)`` (a ``Segmenter``,
shared with the CLI and ``inference.segment``) -> labels -> Labels layer, and
Labels layer -> ``_annotations.save_for_training`` -> folder -> ``training.finetune`` ->
weights -> model picker. Everything slow (loading or downloading weights, building the
ONNX session, segmenting) runs on one long-lived job thread (``_qt_util.run_in_background``),
so the window never freezes;
fine-tuning runs in a child process (``_finetune_job``), so napari never imports torch
and survives a crash or an out-of-memory kill of the training. Every failure ends as a
napari notification.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    TextEdit,
)
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QFileDialog, QSizePolicy

from . import weights as weights_mod
from ._annotations import (
    SliceIndex,
    edited_slices,
    iter_slices,
    layer_axes,
    next_colour,
    slice_digest,
)
from ._correct import CorrectSection
from ._qt_util import Group, WrappedText, no_repaint, run_in_background
from ._qt_util import ask as _ask_user
from ._qt_util import compact as _compact
from ._qt_util import if_alive as _if_alive
from ._qt_util import real as _real
from ._retrain import RetrainSection
from ._uncertain import UncertaintyPanel
from .cancel import Cancelled
from .inference import Segmenter, default_pool, infer_axes, resolve_device
from .model_info import model_info

if TYPE_CHECKING:
    import napari

__all__ = ["LVUNetWidget"]

logger = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda", "mps")

# A Segment that ends sooner never shows a busy state, only its result (ms).
_BUSY_LOOK_MS = 150
# Live preview: a slice is segmented at once, in the GUI thread (the slice and its labels
# show together, in one repaint) only when the last run measured for the same model,
# device, sizing, slice shape and dtype took at most this long (s), the slice has at most
# _INLINE_PREVIEW_PIXELS pixels, and the model's segmenter is still in the pool (never
# loaded in the GUI thread). Anything else goes to the job thread, which measures again:
# after a slow run every step goes there, and in-line runs resume once a job-thread run
# (or an in-line one) was quick enough again. A job-thread run shares the GIL with
# napari's repaint and measures 2-3x the engine's own time (512 x 512: 56 ms against 20 ms
# on a 2-core CPU), so 60 ms admits a slice whose in-line run takes about 20-30 ms, and an
# in-line run (measured again each time) is usually shorter than the job-thread run that
# admitted it.
_INLINE_PREVIEW_S = 0.06
_INLINE_PREVIEW_PIXELS = 1920 * 1080  # a first try in the GUI thread only up to this


def _cancel_segment(widget: weakref.ReferenceType, *_args: Any) -> None:
    """Cancel the widget's running Segment, if the widget is still there (a weak reference:
    the Qt connection must not keep it alive)."""
    alive = widget()
    if alive is not None:
        alive._cancel.set()


class _UndockWatch(QObject):
    """Calls ``on_undock`` when the watched widget loses its parent (its dock closed)."""

    def __init__(self, on_undock: Callable[[], None]) -> None:
        super().__init__()
        self._on_undock = on_undock

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            self._on_undock()
        return False


class _Progress(QObject):
    """Carries progress from a worker thread to the GUI thread (a queued connection)."""

    changed = Signal(int, int)
    message = Signal(str)


class _DownloadProgress:
    """The tqdm-like object pooch reports a weights download to, forwarded to the widget."""

    def __init__(self, signals: _Progress, name: str) -> None:
        self.total = 0
        self.n = 0
        self._signals = signals
        self._shown = -1
        signals.message.emit(f"downloading {name}...")

    def update(self, n: int) -> None:
        self.n += int(n)
        total = self.total or self.n
        # pooch reports every 1 kB chunk: forward whole percents only, not a signal flood.
        percent = 100 * min(self.n, total) // max(total, 1)
        if percent != self._shown:
            self._shown = percent
            self._signals.changed.emit(percent, 100)

    def reset(self) -> None:
        self.n = 0

    def close(self) -> None:
        self._signals.message.emit("download complete")


@dataclass
class _Request:
    """One segmentation job, gathered in the GUI thread before the worker starts."""

    image: Image
    data: Any  # numpy or any array-like napari holds (dask, zarr)
    axes: str
    index: SliceIndex | None  # the slice segmented, or None for the whole layer
    model_key: str
    device: str
    threshold: float
    output: str
    sizing: str
    probabilities: bool
    overwrite: bool
    preview: bool = False
    replace_confirmed: bool = False  # the user agreed to replace their corrections


@dataclass
class _Result:
    request: _Request
    labels: np.ndarray
    probabilities: np.ndarray | None
    device: str
    backend: str
    weights_name: str = ""
    weights_sha256: str = ""
    seconds: float = 0.0  # what segmenting took, the model already loaded


@dataclass
class _Track:
    """What the widget knows about one result Labels layer."""

    image: weakref.ReferenceType
    edited: set[SliceIndex] = field(default_factory=set)  # painted on (napari's history)
    colour: str | None = None  # of a one-label result; None: napari's label colours
    # Each slice's foreground as the model left it: what a correction differs from.
    proposal: dict[SliceIndex, bytes] = field(default_factory=dict)
    # The same foreground, bit-packed (np.packbits of the flat mask): saved beside a
    # correction, to measure how much the user had to change.
    masks: dict[SliceIndex, np.ndarray] = field(default_factory=dict)
    # How each slice's result was made: model, weights hash, threshold, sizing, output.
    provenance: dict[SliceIndex, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Replaced:
    """Labels that an overwrite replaced, kept until restored or replaced again."""

    layer: weakref.ReferenceType
    index: SliceIndex | None  # the slice replaced, or None for the whole layer
    data: np.ndarray
    edited: set[SliceIndex]
    proposal: dict[SliceIndex, bytes]
    masks: dict[SliceIndex, np.ndarray]
    provenance: dict[SliceIndex, dict[str, Any]]


class _Elider(QObject):
    """Re-elides a label's text whenever the label is resized."""

    def __init__(self, label: _ElidedLabel) -> None:
        super().__init__(label.native)
        self._label = weakref.ref(label)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        label = self._label()
        if label is not None and event.type() == QEvent.Type.Resize:
            label._show()
        return False


class _ElidedLabel(Label):
    """A label that never widens the dock: long text ends in "...", the tooltip has it all.

    ``value`` is the full text; the label shows as much of it as fits.
    """

    def __init__(self, *, tooltip: str = "", **kwargs: Any) -> None:
        self._full = str(kwargs.get("value", ""))
        self._tip = tooltip
        super().__init__(**kwargs)
        self.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.native.setMinimumWidth(60)
        self._elider = _Elider(self)
        self.native.installEventFilter(self._elider)
        self._show()

    @property
    def value(self) -> str:
        return self._full

    @value.setter
    def value(self, text: Any) -> None:
        self._full = str(text)
        if hasattr(self, "_elider"):
            self._show()
        on_change = getattr(self, "on_change", None)
        if on_change is not None:
            on_change(self._full)

    def _show(self) -> None:
        native = self.native
        width = max(native.width(), native.minimumWidth())
        shown = native.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight, width)
        Label.value.fset(self, shown)  # type: ignore[attr-defined]
        tip = self._full if shown != self._full else ""
        native.setToolTip("\n".join(t for t in (tip, self._tip) if t))


class _AxesError(ValueError):
    """The image's axes are ambiguous; the user should pick them under "Axes"."""


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def _yx_shape(image: Image) -> tuple[int, ...]:
    """The image layer's data shape without its colour axis: the shape its labels have."""
    return tuple(image.data.shape[:-1] if image.rgb else image.data.shape)


def _fit_dtype(layer: Labels, labels: np.ndarray) -> None:
    """Widen a Labels layer's dtype if ``labels`` (e.g. many instances) would overflow it."""
    if labels.size and int(labels.max()) > np.iinfo(layer.data.dtype).max:
        layer.data = layer.data.astype(np.promote_types(layer.data.dtype, labels.dtype))


class LVUNetWidget(Container):
    """Dock widget: segment image layers with LV-UNet, correct, save, fine-tune.

    Args:
        napari_viewer: The viewer the widget acts on (napari passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self.viewer = napari_viewer
        self._files: dict[str, str] = {}  # model-picker key (a path) -> display name
        self._tracks: weakref.WeakKeyDictionary[Labels, _Track] = weakref.WeakKeyDictionary()
        # Probability layers this widget made -> their source image: "overwrite" replaces
        # only these, never a user's layer that happens to carry the same name.
        self._probability_sources: weakref.WeakKeyDictionary[Image, weakref.ReferenceType] = (
            weakref.WeakKeyDictionary()
        )
        self._cancel = threading.Event()
        self._worker = None  # the Segment job: one at a time
        self._preview_worker = None  # the live preview's job
        self._busy_look = False  # whether the running job shows as busy (see _start)
        self._models_changed = False  # a job downloaded a model: refresh the picker
        self._preview_pending: tuple[Image, SliceIndex] | None = None
        self._sliced_after = False  # napari slices the layers right after (see _on_step)
        # Live preview, per (model, device, sizing, slice shape, dtype): the seconds the
        # latest run took (on the job thread or in the GUI thread), model load excluded.
        self._preview_cost: dict[tuple, float] = {}
        self._progress = _Progress()
        self._progress.changed.connect(self._on_progress)
        self._progress.message.connect(self._on_message)
        self._adding = False  # while the widget adds a layer of its own

        # The sections first: the model picker lists the retrain section's versions.
        self.correct_section = CorrectSection(self)
        self.corrected = self.correct_section.corrected
        self.data_dir = self.correct_section.data_dir
        self.save_button = self.correct_section.save_button
        self.retrain = RetrainSection(self)
        self.command = self.retrain.command
        self.steps = self.retrain.steps
        self.finetune_button = self.retrain.finetune_button
        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.model = ComboBox(label="Model", choices=self._model_choices)
        self.load_file = PushButton(text="Load weights from file...")
        self.device = ComboBox(label="Device", choices=_DEVICES, value="auto")
        self.device_in_use = _ElidedLabel(label="In use", value="-")
        self.threshold = FloatSlider(label="Threshold", min=0.05, max=0.95, step=0.05, value=0.5)
        self.output = ComboBox(
            label="Output",
            choices=[("semantic (one label)", "semantic"), ("instances", "instances")],
            value="semantic",
        )
        self.sizing = ComboBox(
            label="Sizing",
            choices=[
                ("auto (resize, tiles for large images)", "auto"),
                ("resize to training size", "resize"),
                ("tiles at the training scale", "tiles"),
            ],
            value="auto",
        )
        self.axes = ComboBox(label="Axes", choices=self._axes_choices)
        self.scope = ComboBox(
            label="Segment",
            choices=[("current slice", "slice"), ("whole stack", "stack")],
            value="stack",
        )
        self.probabilities = CheckBox(text="Add probability map")
        self.overwrite = CheckBox(text="Overwrite previous result")
        self.live = CheckBox(text="Live preview on slice change")
        self.outline = CheckBox(text="Show results as outlines")
        self.segment_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = _ElidedLabel(label="Status", value="ready")
        # The last long message (see _show_details), its job, and whether it is earlier.
        self._details_text = ""
        self._details_job: Any = None
        self._details_stale = False

        self.restore_button = PushButton(text="Restore replaced labels", enabled=False)
        self._replaced: _Replaced | None = None
        self.details = TextEdit(label="Messages", value="")
        self.details.native.setReadOnly(True)
        self.details.native.setMaximumHeight(90)

        # The model panel: what the chosen model is, from its weights' metadata.
        self.model_panel = WrappedText(value="")
        self.about = Group(
            "About this model",
            [self.model_panel],
            labels=False,
            tooltip="Show or hide what the chosen model segments, what it learnt from, "
            "how well it scored, its intended use and licence.",
        )
        self.about.margins = (0, 0, 0, 0)

        # Four groups a clinician reads top to bottom; Advanced starts folded.
        self.segment_group = Group(
            "Segment",
            [
                self.image,
                self.model,
                self.about,
                self.threshold,
                self.scope,
                self.segment_button,
                self.cancel_button,
                self.progress,
                self.status,
            ],
        )
        # "Correct and save": the lead appends further panels here (append goes to the body).
        self.correct_group = Group("Correct and save", [self.correct_section, self.restore_button])
        self.retrain_group = Group("Retrain", [self.retrain])
        self.advanced = Group(
            "Advanced",
            [
                self.device,
                self.device_in_use,
                self.sizing,
                self.axes,
                self.output,
                self.probabilities,
                self.overwrite,
                self.live,
                self.outline,
                self.load_file,
                self.details,
            ],
            expanded=False,
        )
        self.extend([self.segment_group, self.correct_group, self.retrain_group, self.advanced])
        # "Next uncertain slice" for stacks and videos: it reads the pickers made above.
        self.uncertain = UncertaintyPanel(self)
        self.correct_group.append(self.uncertain)
        self.advanced.header.native.toggled.connect(self._on_advanced_toggled)

        if weights_mod.DEFAULT_MODEL in self.model.choices:
            self.model.value = weights_mod.DEFAULT_MODEL
        self.retrain.follow_picker()  # start on the current model version

        self.segment_button.changed.connect(self.segment)
        self.cancel_button.changed.connect(self.cancel)
        self.load_file.changed.connect(self._ask_weights_file)
        self.restore_button.changed.connect(self.restore_replaced)
        self.outline.changed.connect(self._apply_outline)
        self._add_shortcuts()
        self._add_tooltips()
        self.status.on_change = self._on_status
        for picker in (self.image, self.model, self.corrected):
            _compact(picker)
        self.live.changed.connect(self._on_live_toggled)
        self.image.changed.connect(self._on_image_changed)
        self.device.changed.connect(self._on_device_changed)
        self._on_device_changed(self.device.value)
        self._show_stack_controls()
        self.model.changed.connect(self.retrain.update_command)
        self.model.changed.connect(self._show_model_info)
        self._show_model_info()
        self.data_dir.changed.connect(self.retrain.update_command)
        # The pickers follow the layer list whether or not napari docks this widget.
        for emitter, callback in self._viewer_connections():
            # First in line: a live-preview slice segmented at once is in the Labels layer
            # before napari slices its layers for the new point (no second slicing).
            emitter.connect(callback, position="first" if callback == self._on_step else "last")
        # Closing the dock takes this widget out of it (napari reparents it to nothing) and
        # closing the viewer deletes it: either way a running Segment stops at its next
        # check instead of segmenting on for a result nobody sees.
        cancel = functools.partial(_cancel_segment, weakref.ref(self))
        self._undock_watch = _UndockWatch(cancel)
        self.native.installEventFilter(self._undock_watch)
        self.native.destroyed.connect(cancel)

    def _alive(self) -> bool:
        try:
            self.native.objectName()
        except RuntimeError:  # deleted with its window: stop listening to the viewer
            self._cancel.set()
            self.retrain.cancel()
            for emitter, callback in self._viewer_connections():
                emitter.disconnect(callback)
            return False
        return True

    def _viewer_connections(self) -> list[tuple[Any, Callable[..., Any]]]:
        events = self.viewer.layers.events
        return [
            (events.inserted, self._on_layers_changed),
            (events.removed, self._on_layers_changed),
            (events.reordered, self._on_layers_changed),
            (events, self._on_layer_event),  # the list re-emits its layers' own events
            (self.viewer.layers.selection.events.active, self._on_active_layer),
            (self.viewer.dims.events.point, self._on_step),
        ]

    def _running_job(self) -> Any:
        """The running Segment, live-preview or Fine-tune job, or None."""
        for job in (self._worker, self._preview_worker, self.retrain.job):
            if job is not None:
                return job
        return None

    @property
    def busy(self) -> bool:
        """Whether a Segment, Fine-tune or live-preview job is running."""
        return (
            self._worker is not None
            or self._preview_worker is not None
            or self.retrain.job is not None
        )

    # ----------------------------------------------------------------- pickers
    def _image_choices(self, _widget: ComboBox) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _model_choices(self, _widget: ComboBox) -> list[tuple[str, str]]:
        choices = []
        for name, entry in weights_mod.registry().items():
            if entry.bundled:
                where = "bundled"
            elif weights_mod.is_available_offline(name):
                where = "cached"
            else:
                where = "will download"
            choices.append((f"{name} ({where})", name))
        choices.extend(self.retrain.model_choices())
        choices.extend((f"{label} (file)", key) for key, label in self._files.items())
        return choices

    def _refresh_models(self) -> None:
        """Rebuild the model picker, keeping the chosen model.

        A choice's label changes when its weights get cached ("will download" ->
        "cached"), and magicgui would then fall back to the first model.
        """
        current = self.model.value
        self.model.reset_choices()
        if current is not None and current in self.model.choices:
            self.model.value = current

    @_if_alive
    def _on_layers_changed(self, _event: Any = None) -> None:
        self.image.reset_choices()
        self.corrected.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[0]

    @_if_alive
    def _on_layer_event(self, event: Any) -> None:
        if event.type == "name":  # a renamed layer: show its new name in the pickers
            self._on_layers_changed()

    @_if_alive
    def _on_active_layer(self, event: Any) -> None:
        """Follow the layer the user selects in napari's layer list.

        An image layer becomes the one to segment; a Labels layer becomes the one to save,
        and a result's own image becomes the one to segment with it.
        """
        layer = event.value
        if self._adding:
            return  # napari activates every new layer; the widget's own are not a choice
        if isinstance(layer, Image) and layer in self.image.choices:
            self.image.value = layer
        elif isinstance(layer, Labels):
            if layer in self.corrected.choices:
                self.corrected.value = layer
            track = self._tracks.get(_real(layer))
            source = track.image() if track is not None else None
            for choice in self.image.choices:
                if source is not None and _real(choice) is source:
                    self.image.value = choice

    def _show_model_info(self, _value: Any = None) -> None:
        """Fill the model panel from the chosen model's metadata (header only, cached)."""
        key = self.model.value
        if key is None:
            self.model_panel.value = "No model chosen."
            self.model_panel.tooltip = ""
            return
        info = model_info(key)
        self.model_info = info
        self.model_panel.value = "<br>".join(
            f"<b>{html.escape(head)}:</b> {html.escape(text)}" for head, text in info.rows
        )
        self.model_panel.tooltip = (
            f"{info.name}, as its weights file describes it (figures are those recorded "
            "when it was made; none is computed here)."
        )

    def _on_advanced_toggled(self, expanded: bool) -> None:
        if expanded:
            self.advanced.note = ""  # the new message is on show

    def _add_tooltips(self) -> None:
        """A plain-words tooltip on every control (what it does, and its shortcut)."""
        tips = {
            self.image: "The image to segment. Follows the image you select in napari's "
            "layer list.",
            self.model: "The network that draws the outlines. 'bundled' ships with the plugin; "
            "'(file)' are weights you loaded or fine-tuned.",
            self.load_file: "Use weights saved by fine-tuning or training (.safetensors).",
            self.device: "Where the network runs. 'auto' uses a GPU when there is one, "
            "else the processor.",
            self.threshold: "How sure the model must be before a pixel counts as the object. "
            "Lower: larger regions; higher: only the clearest parts.",
            self.output: "One label for everything found, or a separate number for each "
            "separate region.",
            self.sizing: "How a frame is fed to the model: shrunk to the size it learnt on, "
            "or cut into pieces at that scale (keeps detail in large frames). 'auto' "
            "chooses.",
            self.axes: "How to read the image's dimensions, when its shape does not say.",
            self.scope: "Segment only the slice or frame on screen, or all of them. Next / "
            "previous slice: Ctrl+Shift+Right / Left (or Right / Left on the canvas).",
            self.probabilities: "Also add the model's confidence for every pixel as an image.",
            self.outline: "Draw results as outlines instead of filled regions, to see the "
            "tissue beneath.",
            self.overwrite: "Put the new result into the last result layer instead of a new "
            "one. Asks first if you corrected it; 'Restore replaced labels' undoes it.",
            self.live: "Segment each slice as you move to it with Ctrl+Shift+Right / Left "
            "or the slider (slices you corrected are never redrawn).",
            self.segment_button: "Segment the chosen image (Ctrl+Shift+Return).",
            self.cancel_button: "Stop the running segmentation or fine-tuning; nothing "
            "half-done is kept.",
            self.progress: "How far the running job is.",
            self.restore_button: "Put back the labels that the last 'Overwrite' replaced.",
            self.details: "Long messages: commands and error details, to read and copy. "
            "Each starts with its time; one from before a later action is marked 'earlier'.",
        }
        for control, tip in tips.items():
            control.tooltip = tip
        self.status._tip = "What the widget is doing, or did last."
        self.device_in_use._tip = "The device and engine the last segmentation ran on."
        for label in (self.status, self.device_in_use):
            label._show()

    def _add_shortcuts(self) -> None:
        """Keyboard shortcuts, active anywhere in napari's window (named in the tooltips)."""
        from qtpy.QtGui import QKeySequence, QShortcut

        self._shortcuts = []
        for keys, action in (
            ("Ctrl+Shift+Return", self.segment),
            ("Ctrl+Shift+S", self.save_for_training),
            ("Ctrl+Shift+Right", functools.partial(self.step_slice, 1)),
            ("Ctrl+Shift+Left", functools.partial(self.step_slice, -1)),
        ):
            shortcut = QShortcut(QKeySequence(keys), self.native)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(action)
            self._shortcuts.append(shortcut)

    def step_slice(self, delta: int) -> None:
        """Show the next (``delta`` 1) or previous (-1) slice or frame.

        Ctrl+Shift+Right / Left, which work wherever the focus is in napari's window (napari's
        own Right / Left arrows do the same, but only while the canvas has the focus). Moves
        along the slider used last, as napari's arrows do; stops at the first and last.
        """
        dims = self.viewer.dims
        sliders = list(dims.not_displayed)
        if not sliders:
            return
        axis = dims.last_used if dims.last_used in sliders else sliders[-1]
        step = dims.current_step[axis] + int(delta)
        dims.set_current_step(axis, min(max(step, 0), dims.nsteps[axis] - 1))

    def _apply_outline(self, _value: Any = None) -> None:
        """Filled regions or outlines, for every result layer of this widget."""
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and _real(layer) in self._tracks:
                layer.contour = 2 if self.outline.value else 0

    def _show_stack_controls(self) -> None:
        """Slice controls only for stacks; the axes choice only where it can matter."""
        image = self.image.value
        stack = image is not None and image.ndim > 2
        self.scope.visible = self.live.visible = stack
        self.axes.visible = stack and not image.rgb
        self.uncertain.visible = stack  # "Next uncertain slice" walks slices or frames

    @contextlib.contextmanager
    def _adding_layer(self) -> Iterator[None]:
        self._adding = True
        try:
            yield
        finally:
            self._adding = False

    def _axes_choices(self, _widget: ComboBox) -> list[tuple[str, str]]:
        choices = [("auto (from the image's shape)", "auto")]
        image = self.image.value if hasattr(self, "image") else None
        if image is not None and not image.rgb and 3 <= image.ndim <= 4:
            stack = layer_axes(image.ndim, False)
            shape = tuple(image.data.shape)
            choices.append((f"{stack}: a stack of {shape[-2]} x {shape[-1]} images", stack))
        return choices

    def _on_image_changed(self, _value: Any = None) -> None:
        self.axes.reset_choices()
        self.axes.value = "auto"  # a reading chosen for one image never carries over
        self._show_stack_controls()
        if self.live.value:
            self._request_preview()

    def add_weights_file(self, path: str | Path, *, select: bool = True) -> str:
        """Add a safetensors weights file to the model picker.

        The file is checked when a segmentation first loads it, in a worker; a bad file
        gives a notification then.

        Args:
            path: The ``.safetensors`` file.
            select: Make it the current model.

        Returns:
            The picker key of the file (its resolved path).
        """
        key = str(Path(path).expanduser().resolve())
        self._files[key] = Path(key).name
        self._refresh_models()
        if select:
            self.model.value = key
        self.retrain.update_command()
        return key

    def _ask_weights_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self.native, "LV-UNet weights", "", "Safetensors weights (*.safetensors)"
        )
        if path:
            self.add_weights_file(path)

    # ---------------------------------------------------------------- models
    def _segmenter(self, key: str, device: str) -> Segmenter:
        """The segmenter for a picker key; runs in a worker (may download the weights).

        From the engine's process-wide pool, keyed by the weights (a changed file is a new
        key), device and backend: a second viewer, the live preview and Segment share it.
        """
        progressbar: Any = False
        if key in weights_mod.registry() and not weights_mod.is_available_offline(key):
            progressbar = _DownloadProgress(self._progress, key)
            self._models_changed = True  # its picker label changes once it is cached
        return default_pool().get(key, device=device, progressbar=progressbar)

    # ------------------------------------------------------------ segmenting
    def _gather(self, *, preview_index: SliceIndex | None = None) -> _Request:
        """Read the widget's choices into a job; raises ValueError with a user message."""
        image = self.image.value
        if image is None:
            raise ValueError("No image layer: open an image (File > Open, or a sample) first.")
        if self.model.value is None:
            raise ValueError("No model selected.")
        if image.multiscale:
            raise ValueError(
                f"{image.name!r} is a multiscale (pyramid) image: open its full-resolution "
                "level as a plain image layer to segment it"
            )
        axes = self._image_axes(image)
        n_leading = image.ndim - 2
        if preview_index is not None:
            index: SliceIndex | None = preview_index
        elif n_leading and self.scope.value == "slice":
            index = self._displayed_index(image)
        else:
            index = None
        # Not read here: a lazy (dask) stack is read frame by frame in the worker.
        data = image.data if index is None else image.data[index]
        return _Request(
            image=image,
            data=data,
            axes=axes if index is None else axes[n_leading:],
            index=index,
            model_key=self.model.value,
            device=self.device.value,
            threshold=float(self.threshold.value),
            output=self.output.value,
            sizing=self.sizing.value,
            probabilities=bool(self.probabilities.value) and preview_index is None,
            overwrite=bool(self.overwrite.value),
            preview=preview_index is not None,
        )

    def _image_axes(self, image: Image) -> str:
        """The axes to segment ``image`` with; raises _AxesError when its shape is ambiguous.

        napari reads a non-RGB layer as a stack of its last two dimensions; an
        ``(H, W, 2)`` layer would be segmented as H images of W x 2 pixels. The engine's
        reading of the shape must agree, or the user confirms napari's under "Axes".
        """
        axes = layer_axes(image.ndim, bool(image.rgb))  # raises for 5D and more
        shape = tuple(int(n) for n in image.data.shape)
        if image.rgb:
            if shape[-1] not in (3, 4):
                raise ValueError(f"unsupported colour image with {shape[-1]} channels")
            return axes
        if self.axes.value == axes:
            return axes  # the user chose napari's reading explicitly
        try:
            inferred = infer_axes(shape)
        except ValueError as err:
            raise _AxesError(
                f"{image.name!r}: {err}. Choose how to read it under 'Axes' in the widget."
            ) from err
        if inferred != axes:
            raise _AxesError(
                f"{image.name!r} has shape {shape}: napari shows it as {axes} (a stack of "
                f"{shape[-2]} x {shape[-1]} images), but its shape reads as {inferred}. "
                f"Open it as an RGB layer, or choose '{axes}' under 'Axes' to segment it "
                "as napari shows it."
            )
        return axes

    def _displayed_index(self, image: Image) -> SliceIndex:
        """The image's slice on display: its data indices along the leading axes."""
        n_leading = image.ndim - 2
        point = self.viewer.dims.point[-image.ndim :]
        coords = image.world_to_data(point)
        shape = image.data.shape[:n_leading]
        return tuple(
            int(np.clip(round(float(c)), 0, n - 1))
            for c, n in zip(coords[:n_leading], shape, strict=True)
        )

    def _run(
        self,
        request: _Request,
        cancel: threading.Event | None,
        segmenter: Segmenter | None = None,
    ) -> _Result:
        """Worker body: load the model (maybe download) unless ``segmenter`` is given,
        segment; the result carries the seconds segmenting took (load excluded)."""
        if segmenter is None:
            segmenter = self._segmenter(request.model_key, request.device)
        start = time.perf_counter()
        n_slices = int(np.prod(request.data.shape[: request.axes.index("Y")]))
        out = segmenter.segment(
            request.data,
            axes=request.axes,
            threshold=request.threshold,
            sizing=request.sizing,
            output=request.output,
            return_probabilities=request.probabilities,
            progress=None if request.preview or n_slices < 2 else self._progress.changed.emit,
            cancel=cancel,
        )
        labels, probabilities = out if request.probabilities else (out, None)
        if probabilities is not None and probabilities.ndim > labels.ndim:
            probabilities = 1.0 - probabilities[0]  # multi-class: P(not background)
        seconds = time.perf_counter() - start
        info = segmenter.info  # None only for a bare model, never from the widget's pool
        return _Result(
            request,
            labels,
            probabilities,
            segmenter.device,
            segmenter.backend,
            weights_name=info.name if info is not None else "",
            weights_sha256=info.sha256 if info is not None else "",
            seconds=seconds,
        )

    def segment(self) -> None:
        """Segment the chosen image layer in a worker (the Segment button).

        With "Overwrite previous result" ticked and corrections in that result, the user
        is asked first; replaced labels are kept for "Restore replaced labels".
        """
        if self._worker is not None or self.retrain.job is not None:
            show_warning("LV-UNet is busy: wait for the running job, or press Cancel.")
            return
        try:
            request = self._gather()
        except _AxesError as err:
            self.axes.visible = True  # the choice the message points to
            self.advanced.expanded = True
            self.status.value = "choose the image's axes"
            show_error(str(err))
            return
        except ValueError as err:
            self.status.value = f"not segmented: {err}"
            show_error(str(err))
            return
        target = self._result_layer(request.image) if request.overwrite else None
        if target is not None and self._holds_corrections(target, request.index):
            where = "" if request.index is None else f" on slice {request.index}"
            answer = self._ask(
                "Replace your corrections?",
                f"{target.name!r} holds corrections you made{where}. Replace them with a "
                "new result, or put the new result in a new layer?\n\nReplaced labels are "
                "kept: 'Restore replaced labels' brings them back.",
                ("Replace", "New layer"),
            )
            if answer is None:
                self.status.value = "nothing segmented: your corrections are untouched"
                return
            request.overwrite = answer == "Replace"
            request.replace_confirmed = request.overwrite
        self._cancel = threading.Event()
        self._start(
            self._run,
            request,
            self._cancel,
            on_returned=self._on_segmented,
            status=f"segmenting {request.image.name}...",
        )

    def cancel(self) -> None:
        """Ask the running Segment or Fine-tune job to stop (the Cancel button)."""
        self._cancel.set()
        self.retrain.cancel()
        self.status.value = "cancelling..."

    def _start(self, func: Any, *args: Any, on_returned: Any, status: str) -> None:
        self._worker = job = run_in_background(
            func, *args, returned=on_returned, errored=self._on_error, finished=self._on_finished
        )
        # The busy look (status, disabled Segment, Cancel, progress) only if the job lasts:
        # every change in the dock repaints napari's whole window with its OpenGL canvas
        # (tens of ms of CPU on a software renderer, taken from the job), so a quick
        # Segment shows its result and nothing else. Segment refuses while a job runs.
        QTimer.singleShot(_BUSY_LOOK_MS, functools.partial(self._look_busy, job, status))

    @_if_alive
    def _look_busy(self, job: Any, status: str) -> None:
        if self._worker is not job:
            return  # finished already
        self._busy_look = True
        with no_repaint(self.progress.native):
            self.progress.max, self.progress.value = 1, 0
        self.status.value = status
        self.segment_button.enabled = self.finetune_button.enabled = False
        self.cancel_button.enabled = True

    @_if_alive
    def _on_progress(self, done: int, total: int) -> None:
        with no_repaint(self.progress.native):  # QProgressBar repaints at once otherwise
            self.progress.max = max(int(total), 1)
            self.progress.value = min(int(done), self.progress.max)

    @_if_alive
    def _on_message(self, text: str) -> None:
        self.status.value = text

    @_if_alive
    def _on_finished(self) -> None:
        self._worker = None
        if self._models_changed:
            self._models_changed = False
            self._refresh_models()  # a model downloaded by the job now shows as cached
        if self._busy_look:
            self._busy_look = False
            self.segment_button.enabled = self.finetune_button.enabled = True
            self.cancel_button.enabled = False

    @_if_alive
    def _on_error(self, err: BaseException) -> None:
        if isinstance(err, Cancelled):
            self.status.value = "cancelled"
            show_info("LV-UNet: cancelled.")
            return
        if _out_of_memory(err):
            message = (
                "LV-UNet ran out of memory. Try 'current slice' instead of the whole stack, "
                "the 'resize' sizing, or the CPU device."
            )
        elif isinstance(err, weights_mod.WeightsError | ValueError | OSError):
            message = f"LV-UNet: {err}"
        else:
            logger.error("LV-UNet job failed", exc_info=err)
            message = f"LV-UNet failed: {type(err).__name__}: {err}"
        self.report_failure(f"failed: {message.removeprefix('LV-UNet: ')}", message)
        show_error(message)

    def report_failure(self, status: str, details: str) -> None:
        """Show a failure: a short status and, in Messages, the whole message.

        Both stay until a later action: its status replaces the status, and Messages marks
        this message as earlier (see :meth:`_show_details`).
        """
        self.status.value = status
        self._show_details(details, error=True)

    def _on_device_changed(self, device: str) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resolved = resolve_device(device)  # warns when an asked-for GPU is missing
        self.device_in_use.value = f"{resolved} (from the next run)"
        for warning in caught:
            show_warning(f"LV-UNet: {warning.message}")

    def _show_device(self, result: _Result) -> None:
        self.device_in_use.value = f"{result.device} ({result.backend})"

    def _result_layer(self, image: Image) -> Labels | None:
        """The most recent result Labels layer made from ``image`` that is still open."""
        found = None
        for layer in self.viewer.layers:
            track = self._tracks.get(_real(layer)) if isinstance(layer, Labels) else None
            if track is not None and track.image() is _real(image):
                found = layer
        return found

    def _fits_image(self, result: _Result) -> bool:
        """Whether a result still matches its image layer's current data shape.

        The layer's data can be replaced (by the user or another plugin) while a job runs;
        a result for the old data must not be written into a layer shaped for the new.
        """
        request = result.request
        shape = _yx_shape(request.image)
        if request.index is None:
            return result.labels.shape == shape
        n_leading = len(request.index)
        return result.labels.shape == shape[n_leading:] and all(
            0 <= i < n for i, n in zip(request.index, shape[:n_leading], strict=False)
        )

    def _new_labels(self, image: Image, dtype: np.dtype, *, output: str = "semantic") -> Labels:
        """A new, empty result layer for ``image``, named and coloured apart from the others.

        One-label results get a high-contrast colour no other open result of this widget
        uses, so a new result never looks like an earlier (corrected) one beneath it.
        """
        shape = _yx_shape(image)
        earlier = [
            (lay, self._tracks[_real(lay)])
            for lay in self.viewer.layers
            if isinstance(lay, Labels) and _real(lay) in self._tracks
        ]
        n_same = sum(1 for _lay, t in earlier if t.image() is _real(image))
        name = f"{image.name} labels" + (f" {n_same + 1}" if n_same else "")
        colour = None
        kwargs: dict[str, Any] = {}
        if output == "semantic":
            colour = next_colour(t.colour for _lay, t in earlier if t.colour)
            kwargs["colormap"] = DirectLabelColormap(color_dict={None: colour, 0: "transparent"})
        with self._adding_layer():
            layer = self.viewer.add_labels(
                np.zeros(shape, dtype=dtype),
                name=name,
                scale=image.scale,
                translate=image.translate,
                metadata={"lvunet_image": image.name},
                **kwargs,
            )
        if self.outline.value:
            layer.contour = 2
        real = _real(layer)
        self._tracks[real] = _Track(image=weakref.ref(_real(image)), colour=colour)
        n_leading = image.ndim - 2
        # Remember which slices the user corrected, so live preview never repaints them.
        layer.events.paint.connect(functools.partial(self._on_paint, weakref.ref(real), n_leading))
        return layer

    @_if_alive
    def _on_paint(self, layer_ref: weakref.ReferenceType, n_leading: int, event: Any) -> None:
        layer = layer_ref()
        if layer is not None and layer in self._tracks:
            self._tracks[layer].edited |= edited_slices(event.value, n_leading)

    def edited_slices(self, layer: Labels) -> set[SliceIndex]:
        """The slices of a result layer the user has painted on (a copy)."""
        track = self._tracks.get(_real(layer))
        return set(track.edited) if track else set()

    @_if_alive
    def _on_segmented(self, result: _Result) -> None:
        request = result.request
        image = request.image
        if image not in self.viewer.layers:
            show_warning(f"LV-UNet: layer {image.name!r} was closed before its result arrived.")
            return
        self._show_device(result)
        if not self._fits_image(result):
            self.status.value = "result discarded: the image changed"
            show_warning(
                f"LV-UNet: the data of {image.name!r} changed size while it was being "
                "segmented; the result was discarded. Press Segment again."
            )
            return
        target = self._result_layer(image) if request.overwrite else None
        labels = result.labels
        if target is not None and target.data.shape != _yx_shape(image):
            target = None
        corrected = target is not None and self._holds_corrections(target, request.index)
        if corrected and not request.replace_confirmed:
            # Painted while this result was computing, without being asked: keep it.
            show_info(
                f"LV-UNet: {target.name!r} was corrected while segmenting; the new result "
                "went to a new layer."
            )
            target = None
        if target is None:
            target = self._new_labels(image, labels.dtype, output=request.output)
        elif corrected:
            self._keep_replaced(target, request.index)
        track = self._tracks[_real(target)]
        if request.index is None:
            track.edited.clear()
            reset_history = getattr(_real(target), "_reset_history", None)
            if (
                target.data.dtype == labels.dtype
                and isinstance(target.data, np.ndarray)
                and reset_history is not None
            ):
                # Same shape and type: written in place, which spares napari a new layer
                # extent (dims, every layer's slice); the undo history goes, as with a
                # new array (the replaced corrections are kept for Restore instead).
                target.data[...] = labels
                reset_history()
                target.refresh()
            else:
                target.data = labels
        else:
            track.edited.discard(request.index)
            _fit_dtype(target, labels)
            target.data[request.index] = labels
            target.refresh()
        self._note_proposal(target, result)
        if result.probabilities is not None:
            self._show_probabilities(image, request, result.probabilities)
        self.progress.value = self.progress.max
        self.status.value = f"done: {target.name}"
        self.corrected.reset_choices()
        # The picker stays on a layer the user corrected: a fresh result must never
        # become what "Save for training" stores without the user choosing it.
        current = self.corrected.value
        if current is None or (
            _real(current) is not _real(target) and not self._holds_corrections(current, None)
        ):
            self.corrected.value = target

    # ------------------------------------------------- corrections bookkeeping
    def _holds_corrections(self, layer: Labels, index: SliceIndex | None) -> bool:
        """Whether the user changed ``layer`` (slice ``index``, or anywhere for None).

        For a result this widget made: painted on, or its foreground differs from the
        model's proposal (edits napari's paint events do not report). A Labels layer the
        user made or opened counts as corrections whenever it has foreground.
        """
        track = self._tracks.get(_real(layer))
        data = layer.data
        if track is None:
            return bool(np.asarray(data if index is None else data[index]).any())
        if index is None:
            if track.edited:
                return True
            n_leading = data.ndim - 2
            slices: Any = iter_slices(data.shape[:n_leading])
        else:
            if index in track.edited:
                return True
            slices = [index]
        for i in slices:
            proposal = track.proposal.get(i)
            current = np.asarray(data[i])
            if (proposal is None and current.any()) or (
                proposal is not None and slice_digest(current) != proposal
            ):
                return True
        return False

    def _note_proposal(self, layer: Labels, result: _Result) -> None:
        """Remember what the model wrote into ``layer``, and how, to tell corrections from it."""
        request = result.request
        index = request.index
        track = self._tracks[_real(layer)]
        data = layer.data
        slices = list(iter_slices(data.shape[:-2])) if index is None else [index]
        if index is None:
            track.proposal, track.masks, track.provenance = {}, {}, {}
        made = {
            "model": request.model_key,
            "weights_name": result.weights_name,
            "weights_sha256": result.weights_sha256,
            "threshold": request.threshold,
            "sizing": request.sizing,
            "output": request.output,
        }
        for i in slices:
            current = np.asarray(data[i])
            track.proposal[i] = slice_digest(current)
            track.masks[i] = np.packbits(current.reshape(-1) > 0)
            track.provenance[i] = made

    def proposal_mask(self, layer: Labels, index: SliceIndex | None = None) -> np.ndarray | None:
        """The model's foreground in ``layer`` as the widget wrote it (before any correction).

        Args:
            layer: A Labels layer.
            index: The slice, for a stack; ``None`` (or ``()``) for a 2D layer.

        Returns:
            A bool ``(H, W)`` array, or None when the widget did not make that layer or slice.
        """
        track = self._tracks.get(_real(layer))
        packed = track.masks.get(tuple(index or ())) if track is not None else None
        if packed is None:
            return None
        shape = layer.data.shape[-2:]
        return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)

    def provenance(self, layer: Labels, index: SliceIndex | None = None) -> dict[str, Any]:
        """How the widget made a slice of ``layer``: its model, weights and settings.

        Args:
            layer: A Labels layer.
            index: The slice; ``None`` for a 2D layer, or for the last slice segmented.

        Returns:
            ``model``, ``weights_name``, ``weights_sha256``, ``threshold``, ``sizing`` and
            ``output``; empty for a layer or slice the widget did not make.
        """
        track = self._tracks.get(_real(layer))
        if track is None or not track.provenance:
            return {}
        if index is None and () not in track.provenance:
            return dict(list(track.provenance.values())[-1])
        return dict(track.provenance.get(tuple(index or ()), {}))

    def _keep_replaced(self, layer: Labels, index: SliceIndex | None) -> None:
        """Keep what an overwrite is about to replace (it holds corrections)."""
        track = self._tracks[_real(layer)]
        data = np.array(layer.data if index is None else layer.data[index], copy=True)
        self._replaced = _Replaced(
            layer=weakref.ref(_real(layer)),
            index=index,
            data=data,
            edited=set(track.edited),
            proposal=dict(track.proposal),
            masks=dict(track.masks),
            provenance=dict(track.provenance),
        )
        self.restore_button.enabled = True
        self.restore_button.tooltip = (
            f"Put back the labels of {layer.name!r} that the last Segment replaced."
        )

    def restore_replaced(self) -> bool:
        """Put back the labels the last overwrite replaced (the Restore button).

        Returns:
            Whether anything was restored.
        """
        kept, self._replaced = self._replaced, None
        self.restore_button.enabled = False
        layer = kept.layer() if kept is not None else None
        if kept is None or layer is None or not any(_real(x) is layer for x in self.viewer.layers):
            show_warning("LV-UNet: nothing to restore (the layer was closed).")
            return False
        if kept.index is None:
            if layer.data.shape != kept.data.shape:
                show_warning(f"LV-UNet: {layer.name!r} changed shape; nothing restored.")
                return False
            layer.data = kept.data
        else:
            layer.data[kept.index] = kept.data
            layer.refresh()
        track = self._tracks[layer]
        track.edited, track.proposal = kept.edited, kept.proposal
        track.masks, track.provenance = kept.masks, kept.provenance
        self.status.value = f"restored the replaced labels of {layer.name}"
        show_info(f"LV-UNet: restored the labels of {layer.name!r} that Segment replaced.")
        return True

    def _ask(self, title: str, text: str, buttons: tuple[str, ...]) -> str | None:
        """Ask the user; returns the button text chosen, or None for Cancel."""
        return _ask_user(self.native, title, text, buttons)

    def _show_probabilities(self, image: Image, request: _Request, probs: np.ndarray) -> None:
        shape = _yx_shape(image)
        existing = None
        for lay in self.viewer.layers:  # the most recent one made from this image
            source = self._probability_sources.get(_real(lay))
            if source is not None and source() is _real(image):
                existing = lay
        if request.overwrite and existing is not None and existing.data.shape == shape:
            layer = existing
        else:
            with self._adding_layer():
                layer = self.viewer.add_image(
                    np.zeros(shape, dtype=np.float32),
                    name=f"{image.name} probability",
                    colormap="magma",
                    blending="additive",
                    opacity=0.5,
                    contrast_limits=(0.0, 1.0),
                    scale=image.scale,
                    translate=image.translate,
                )
            self._probability_sources[_real(layer)] = weakref.ref(_real(image))
        if request.index is None:
            layer.data = probs.astype(np.float32, copy=False)
        else:
            layer.data[request.index] = probs
            layer.refresh()

    # ---------------------------------------------------------- live preview
    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self._request_preview()

    @_if_alive
    def _on_step(self, _event: Any = None) -> None:
        if self.live.value:
            # Called before napari slices the layers for the new point: a slice written
            # now needs no refresh of its own.
            self._sliced_after = True
            try:
                self._request_preview()
            finally:
                self._sliced_after = False

    def _request_preview(self) -> None:
        """Segment the displayed slice; while one runs, only the latest request waits."""
        image = self.image.value
        if image is None:
            return
        if image.ndim > 2 and tuple(self.viewer.dims.displayed) != tuple(
            range(self.viewer.dims.ndim - 2, self.viewer.dims.ndim)
        ):
            return  # a rolled or 3D view has no single displayed YX slice
        self._preview_pending = (image, self._displayed_index(image))
        if self._preview_worker is None:
            self._next_preview()

    def _next_preview(self) -> None:
        if self._preview_pending is None or not self.live.value:
            return
        image, index = self._preview_pending
        self._preview_pending = None
        target = self._result_layer(image)
        if (
            target is not None
            and target.data.shape == _yx_shape(image)
            and index in self._tracks[_real(target)].edited
        ):
            return  # never repaint a slice the user corrected
        try:
            request = self._gather(preview_index=index)
        except ValueError as err:
            self.live.value = False
            show_error(f"Live preview stopped: {err}")
            return
        cost_key = (
            request.model_key,
            request.device,
            request.sizing,
            tuple(request.data.shape),
            str(request.data.dtype),
        )
        segmenter = self._inline_segmenter(request, cost_key)
        if segmenter is not None:
            # Measured quick and loaded: done now, the slice and its labels show in one
            # repaint (a background job would let napari repaint the new slice first, then
            # again for its labels, each repaint taking the CPU the job needs).
            try:
                result = self._run(request, None, segmenter)
            except Exception as err:  # shown as the job thread's would be
                self._on_preview_error(err)
                return
            # Slower than the budget (a slow machine, a heavy load): the job thread next.
            self._preview_cost[cost_key] = result.seconds
            self._on_preview(result)
            return
        self._preview_worker = run_in_background(
            self._run,
            request,
            None,
            returned=functools.partial(self._on_background_preview, cost_key),
            errored=self._on_preview_error,
            finished=self._on_preview_finished,
        )

    def _inline_segmenter(self, request: _Request, cost_key: tuple) -> Segmenter | None:
        """The pooled segmenter to run this preview slice with in the GUI thread, or None
        for the job thread: a run of this kind was measured at most _INLINE_PREVIEW_S, the
        slice is small enough, and the model is still in the pool (never loaded here)."""
        cost = self._preview_cost.get(cost_key)
        if cost is None or cost > _INLINE_PREVIEW_S:
            return None
        if int(np.prod(request.data.shape[:2])) > _INLINE_PREVIEW_PIXELS:  # Y and X
            return None
        try:
            return default_pool().peek(request.model_key, device=request.device)
        except OSError:  # the weights file went away: the job thread reports it
            return None

    def _on_background_preview(self, cost_key: tuple, result: _Result) -> None:
        self._preview_cost[cost_key] = result.seconds  # decides where the next one runs
        self._on_preview(result)

    @_if_alive
    def _on_preview(self, result: _Result) -> None:
        request = result.request
        image = request.image
        if image not in self.viewer.layers:
            return
        if not self._fits_image(result):
            # The layer's data was replaced while this slice was computing: segment anew.
            self.status.value = "live preview: the image changed, segmenting again"
            self._request_preview()
            return
        self._show_device(result)
        target = self._result_layer(image)
        if target is not None and target.data.shape != _yx_shape(image):
            show_info(
                f"LV-UNet: {image.name!r} changed size; live preview now writes to a new "
                f"labels layer and leaves {target.name!r} as it was."
            )
            target = None
        if target is None:
            target = self._new_labels(image, result.labels.dtype, output=request.output)
        if request.index in self._tracks[_real(target)].edited:
            return  # painted while the preview was computing
        _fit_dtype(target, result.labels)
        target.data[request.index] = result.labels
        if not self._sliced_after:
            target.refresh()
        self._note_proposal(target, result)
        self.status.value = f"live preview: {target.name}, slice {request.index}"

    @_if_alive
    def _on_preview_error(self, err: BaseException) -> None:
        self.live.value = False
        self._preview_pending = None
        self._on_error(err)
        show_warning("Live preview was turned off after the error above.")

    @_if_alive
    def _on_preview_finished(self) -> None:
        self._preview_worker = None
        self._next_preview()

    # --------------------------------------------------- correction -> training
    def save_for_training(self) -> list[tuple[Path, Path]]:
        """Save the corrected labels as training pairs (see :class:`CorrectSection`)."""
        return self.correct_section.save_for_training()

    def finetune(self) -> None:
        """Fine-tune on the saved pairs in a child process (see :class:`RetrainSection`)."""
        self.retrain.finetune()

    def _show_details(self, text: str, *, error: bool = False) -> None:
        """Put a long message (a command, an error's details) where it can be read whole.

        The message starts with its time. When a later action changes the status (a new
        job starts, or another action succeeds or fails), the message is marked as
        earlier, so a past error never reads as the state of things. Status changes of
        the job that wrote it (its progress) leave it as it is.

        Args:
            text: The message.
            error: Whether it reports a failure (a failure's status never marks it).
        """
        self._details_text = f"{time.strftime('%H:%M:%S')}  {text}"
        self._details_job = self._running_job()
        self._details_stale = False
        self.details.value = self._details_text
        if not self.advanced.expanded:
            self.advanced.note = "new message" if not error else "error message"

    def _on_status(self, _text: str) -> None:
        """A new status: a message in Messages from before it is now an earlier one."""
        if self._details_stale or not self._details_text:
            return
        job = self._running_job()
        if job is not None and job is self._details_job:
            return  # the progress of the job that wrote the message
        self._details_stale = True
        self.details.value = f"Earlier message:\n{self._details_text}"
        if self.advanced.note:
            self.advanced.note = ""
