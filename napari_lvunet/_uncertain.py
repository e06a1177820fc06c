"""The dock widget's "Next uncertain slice" panel: which slice of a stack to correct next.

Image layer -> the widget's segmenter -> ``uncertainty.score_slices`` (in a napari thread
worker, a few slices at a time, only the scores kept) -> ``uncertainty.rank`` -> napari's
dims jump to the most uncertain slice not corrected and not yet shown by the button. The
optional band layer outlines, on the slice shown, the pixels whose foreground probability
lies in the uncertain band (``uncertainty.uncertain_band``); it is computed for that one
slice, again in a worker, whenever the shown slice changes.

Scores are kept per image layer, keyed by the weights' sha256, the threshold, the sizing
and the axes; they are dropped when the layer's data is replaced or the model picker
changes.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, Container, Label, ProgressBar, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QSizePolicy

from ._qt_util import if_alive, real
from .cancel import Cancelled
from .uncertainty import SliceIndex, band_limits, foreground, rank, score_slices, uncertain_band

if TYPE_CHECKING:
    from ._widget import LVUNetWidget, _Request

__all__ = ["BAND_COLOUR", "UncertaintyPanel", "is_band_layer"]

#: Colour of the uncertain band's outline: violet, which no result colour
#: (``_annotations.RESULT_COLOURS``) uses and which stands apart from red mucosa.
BAND_COLOUR = "#bf7fff"

_NOT_A_STACK = (
    "Only for stacks and videos: a single image has no other slice to go to. "
    "Pick a stack or a video under 'Image'."
)

# The band layer's metadata key (where it comes from: image, slice, band limits).
_BAND_KEY = "lvunet_band"

# (weights sha256, threshold, sizing, axes): what a slice's score depends on.
_Key = tuple[str, float, str, str]


@dataclass
class _ImageState:
    """What the panel knows about one image layer."""

    scores: dict[_Key, dict[SliceIndex, float]] = field(default_factory=dict)
    visited: set[SliceIndex] = field(default_factory=set)  # shown by the button
    generation: int = 0  # counts replacements of the layer's data


@dataclass
class _Job:
    """One ranking pass, gathered in the GUI thread before the worker starts."""

    image: Image  # the layer itself (not napari's proxy)
    generation: int
    request: _Request  # the widget's choices (model, device, threshold, sizing)
    data: Any  # the whole stack, read slice by slice in the worker
    axes: str  # the stack's axes, e.g. "ZYX", "TZYXC"
    known: dict[_Key, dict[SliceIndex, float]]  # scores already computed for this image


def is_band_layer(layer: Any) -> bool:
    """Whether ``layer`` is an uncertain-band layer of this panel: never a correction.

    Pickers of labels to save or train on leave it out; it is marked from its creation.
    """
    return isinstance(layer, Labels) and _BAND_KEY in layer.metadata


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _percent(share: float) -> str:
    value = 100.0 * share
    return f"{value:.0f} %" if value >= 10 or value == 0 else f"{value:.2g} %"


def _where(index: SliceIndex, leading: tuple[int, ...]) -> str:
    """``slice 12 of 40``; ``slice 1, 12 of 2 x 40`` in a 4D stack (napari's numbers)."""
    at = ", ".join(str(i) for i in index)
    of = " x ".join(str(n) for n in leading)
    return f"slice {at} of {of}"


class UncertaintyPanel(Container):
    """The button "Next uncertain slice", where it went in the ranking, "Show uncertain band".

    Args:
        widget: The dock widget the panel belongs to, with its controls made. The panel
            reads its ``viewer``, ``image``, ``model``, ``threshold``, ``sizing`` and
            ``corrected`` (and, through ``_gather``, ``device``), and uses its
            ``_gather``, ``_image_axes``, ``_segmenter``, ``_displayed_index``,
            ``edited_slices``, ``_adding_layer`` and ``_on_error``.
    """

    def __init__(self, widget: LVUNetWidget) -> None:
        super().__init__(labels=False)
        self._main = widget
        self.viewer = widget.viewer
        self._states: weakref.WeakKeyDictionary[Image, _ImageState] = weakref.WeakKeyDictionary()
        self._cancel = threading.Event()
        self._worker: Any = None  # the ranking pass
        self._band_worker: Any = None
        self._band_pending: tuple[Image, SliceIndex] | None = None
        self._band_layer: weakref.ReferenceType | None = None

        self.next_button = PushButton(text="Next uncertain slice")
        self.cancel_button = PushButton(text="Cancel ranking", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, visible=False)
        self.where = Label(value="")
        self.where.native.setWordWrap(True)  # long texts wrap, never widen the dock
        self.where.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.show_band = CheckBox(text="Show uncertain band")
        self.extend(
            [self.next_button, self.cancel_button, self.progress, self.where, self.show_band]
        )
        self._tips = {
            self.next_button: "Go to the slice the model is least sure about, skipping the "
            "slices you corrected (painted in 'Corrected labels') and those this button "
            "already showed you. The first press ranks all slices in the background.",
            self.cancel_button: "Stop ranking the slices.",
            self.progress: "How many slices are ranked.",
            self.where: "The slice the button showed: its share of uncertain pixels, and its "
            "place among all slices, most uncertain first.",
            self.show_band: "Outline the pixels of the shown slice that the model is unsure "
            "about (confidence within 0.2 of the threshold): where a correction is most "
            "likely needed.",
        }

        self.next_button.changed.connect(self.next_uncertain)
        self.cancel_button.changed.connect(self.cancel)
        self.show_band.changed.connect(self._on_show_band)
        widget.image.changed.connect(self._on_image_changed)
        widget.model.changed.connect(self._on_model_changed)
        widget.threshold.changed.connect(self._on_band_settings)
        widget.sizing.changed.connect(self._on_band_settings)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self._on_image_changed()

    def _alive(self) -> bool:
        try:
            self.native.objectName()
        except RuntimeError:  # deleted with its window: stop listening to the viewer
            self._cancel.set()
            self.viewer.dims.events.current_step.disconnect(self._on_step)
            return False
        return True

    @property
    def busy(self) -> bool:
        """Whether a ranking pass or an uncertain band is being computed."""
        return self._worker is not None or self._band_worker is not None

    # ------------------------------------------------------------ state
    def _image(self) -> Image | None:
        """The widget's picked image when it is a stack, else None."""
        image = self._main.image.value
        return image if image is not None and image.ndim > 2 else None

    def _state(self, image: Image) -> _ImageState:
        layer = real(image)
        state = self._states.get(layer)
        if state is None:
            state = self._states[layer] = _ImageState()
            # Replaced data makes every score of this layer stale.
            layer.events.data.connect(functools.partial(self._on_data, weakref.ref(layer)))
        return state

    def scores(self, image: Image) -> dict[_Key, dict[SliceIndex, float]]:
        """The slice scores computed for ``image``, per (sha256, threshold, sizing, axes)."""
        state = self._states.get(real(image))
        return {} if state is None else {k: dict(v) for k, v in state.scores.items()}

    @if_alive
    def _on_data(self, layer_ref: weakref.ReferenceType, _event: Any = None) -> None:
        layer = layer_ref()
        state = self._states.get(layer) if layer is not None else None
        if state is None:
            return
        state.generation += 1
        state.scores.clear()
        state.visited.clear()
        if self._image() is not None and real(self._image()) is layer:
            self.where.value = "the image changed: press again to rank its slices"
            self._request_band()

    @if_alive
    def _on_model_changed(self, _value: Any = None) -> None:
        self._cancel.set()
        for state in self._states.values():
            state.scores.clear()
            state.visited.clear()
        self.where.value = ""
        self._request_band()

    @if_alive
    def _on_image_changed(self, _value: Any = None) -> None:
        stack = self._image() is not None
        for control in (self.next_button, self.show_band):
            control.enabled = stack and (control is not self.next_button or self._worker is None)
        for control, tip in self._tips.items():
            control.tooltip = tip if stack else _NOT_A_STACK
        self.where.value = "" if stack else "only for stacks and videos"
        if not stack:
            self._remove_band()
        else:
            self._request_band()

    def _corrected(self, image: Image) -> set[SliceIndex]:
        """Slices painted in the picked "Corrected labels" layer, if it belongs to ``image``."""
        layer = self._main.corrected.value
        n_leading = image.ndim - 2
        if not isinstance(layer, Labels) or (
            tuple(layer.data.shape[:n_leading]) != tuple(image.data.shape[:n_leading])
        ):
            return set()
        return self._main.edited_slices(layer)

    # ------------------------------------------------------------ ranking
    def next_uncertain(self) -> None:
        """Jump to the most uncertain slice not corrected nor shown yet (the button).

        The first press for an image, model, threshold and sizing ranks the slices in a
        worker and jumps when it is done; later presses reuse the scores.
        """
        image = self._image()
        if image is None:
            show_error(f"LV-UNet: {_NOT_A_STACK}")
            return
        if self._worker is not None:
            return
        leading = tuple(int(n) for n in image.data.shape[: image.ndim - 2])
        try:
            request = self._main._gather(preview_index=(0,) * len(leading))
            axes = self._main._image_axes(image)
        except ValueError as err:
            show_error(str(err))
            return
        state = self._state(image)
        job = _Job(real(image), state.generation, request, image.data, axes, dict(state.scores))
        self._cancel = threading.Event()
        self.next_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value = max(math.prod(leading), 1), 0
        self._worker = create_worker(
            self._rank_slices,
            job,
            self._cancel,
            _start_thread=True,
            _connect={
                "yielded": self._on_ranked_slice,
                "returned": self._on_ranked,
                "errored": self._on_rank_error,
                "finished": self._on_rank_finished,
            },
        )

    def _rank_slices(
        self, job: _Job, cancel: threading.Event
    ) -> Iterator[int]:  # worker: yields slices done, returns (job, key, scores)
        request = job.request
        segmenter = self._main._segmenter(request.model_key, request.device)
        sha = segmenter.info.sha256 if segmenter.info is not None else request.model_key
        key: _Key = (sha, round(float(request.threshold), 6), request.sizing, job.axes)
        if key in job.known:
            return job, key, job.known[key]
        scores: dict[SliceIndex, float] = {}
        for index, score in score_slices(
            segmenter,
            job.data,
            job.axes,
            threshold=request.threshold,
            sizing=request.sizing,
            cancel=cancel,
        ):
            scores[index] = score
            yield len(scores)
        return job, key, scores

    @if_alive
    def _on_ranked_slice(self, done: int) -> None:
        if not self.progress.visible:
            self.progress.visible = True
            self.where.value = "ranking the slices..."
        self.progress.value = min(done, self.progress.max)

    @if_alive
    def _on_ranked(self, out: tuple[_Job, _Key, dict[SliceIndex, float]]) -> None:
        job, key, scores = out
        state = self._states.get(job.image)
        if state is None or state.generation != job.generation:
            self.where.value = "the image changed while ranking: press again"
            return
        state.scores[key] = scores
        image = self._image()
        if image is not None and real(image) is job.image:
            self._jump(image, scores)

    @if_alive
    def _on_rank_error(self, err: BaseException) -> None:
        if isinstance(err, Cancelled):
            self.where.value = "ranking cancelled"
            show_info("LV-UNet: ranking the slices was cancelled.")
            return
        self.where.value = "ranking failed"
        self._main._on_error(err)

    @if_alive
    def _on_rank_finished(self) -> None:
        self._worker = None
        self.progress.visible = False
        self.cancel_button.enabled = False
        self.next_button.enabled = self._image() is not None

    def cancel(self) -> None:
        """Stop the ranking pass (the Cancel button); no partial ranking is kept."""
        self._cancel.set()
        if self._worker is not None:
            self.where.value = "cancelling..."

    def _jump(self, image: Image, scores: dict[SliceIndex, float]) -> SliceIndex | None:
        state = self._state(image)
        corrected = self._corrected(image)
        order = rank(scores, skip=corrected | state.visited)
        restarted = False
        if not order and state.visited - corrected:
            state.visited.clear()  # every slice was shown: walk the ranking again
            order = rank(scores, skip=corrected)
            restarted = True
        leading = tuple(int(n) for n in image.data.shape[: image.ndim - 2])
        if not order:
            self.where.value = f"all {len(scores)} slices are corrected"
            return None
        index = order[0]
        state.visited.add(index)
        self._go_to(image, index)
        place = rank(scores).index(index) + 1
        text = (
            f"{_where(index, leading)}: {_percent(scores[index])} uncertain pixels, "
            f"{_ordinal(place)} of {len(scores)}"
        )
        self.where.value = ("all shown, from the top again: " if restarted else "") + text
        return index

    def _go_to(self, image: Image, index: SliceIndex) -> None:
        """Show slice ``index`` of ``image``: move napari's dims along its stack axes."""
        dims = self.viewer.dims
        point = np.asarray(image.world_to_data(dims.point[-image.ndim :]), dtype=float)
        point[: len(index)] = index
        world = image.data_to_world(point)
        first = dims.ndim - image.ndim
        dims.set_point(
            [first + i for i in range(len(index))], [float(world[i]) for i in range(len(index))]
        )

    # ------------------------------------------------------------ the band
    @if_alive
    def _on_show_band(self, on: bool) -> None:
        if on:
            self._request_band()
        else:
            self._band_pending = None
            self._remove_band()

    @if_alive
    def _on_band_settings(self, _value: Any = None) -> None:
        self._request_band()

    @if_alive
    def _on_step(self, _event: Any = None) -> None:
        self._request_band()

    def _request_band(self) -> None:
        """Compute the shown slice's band; while one computes, only the latest waits."""
        image = self._image()
        if not self.show_band.value or image is None:
            return
        dims = self.viewer.dims
        if tuple(dims.displayed) != (dims.ndim - 2, dims.ndim - 1):
            return  # a rolled or 3D view shows no single slice of the stack
        index = self._main._displayed_index(image)
        layer = self._band()
        if layer is not None and layer.metadata.get(_BAND_KEY, {}).get("slice") != [*index]:
            layer.data = np.zeros_like(layer.data)  # never another slice's band meanwhile
        self._band_pending = (image, index)
        if self._band_worker is None:
            self._next_band()

    def _next_band(self) -> None:
        if self._band_pending is None or not self.show_band.value:
            return
        image, index = self._band_pending
        self._band_pending = None
        if self._image() is None or real(self._image()) is not real(image):
            return  # another image was picked: its own request follows
        try:
            request = self._main._gather(preview_index=index)
        except ValueError as err:
            self.show_band.value = False
            show_error(f"Uncertain band turned off: {err}")
            return
        self._band_worker = create_worker(
            self._band_of_slice,
            request,
            _start_thread=True,
            _connect={
                "returned": self._on_band,
                "errored": self._on_band_error,
                "finished": self._on_band_finished,
            },
        )

    def _band_of_slice(self, request: _Request) -> tuple[_Request, np.ndarray]:
        """Worker: the uncertain band of one slice."""
        segmenter = self._main._segmenter(request.model_key, request.device)
        probs = foreground(
            segmenter,
            request.data,
            request.axes,
            threshold=request.threshold,
            sizing=request.sizing,
        )
        return request, uncertain_band(probs, *band_limits(request.threshold))

    @if_alive
    def _on_band(self, out: tuple[_Request, np.ndarray]) -> None:
        request, band = out
        image = self._image()
        if (
            not self.show_band.value
            or image is None
            or real(image) is not real(request.image)
            or self._main._displayed_index(image) != request.index
            or tuple(band.shape) != tuple(image.data.shape[image.ndim - 2 : image.ndim])
        ):
            return  # moved on meanwhile: the pending request brings the right band
        self._write_band(image, request, band)

    @if_alive
    def _on_band_error(self, err: BaseException) -> None:
        self.show_band.value = False
        self._band_pending = None
        self._main._on_error(err)

    @if_alive
    def _on_band_finished(self) -> None:
        self._band_worker = None
        self._next_band()

    def _band(self) -> Labels | None:
        """The band layer, while it is open."""
        layer = self._band_layer() if self._band_layer is not None else None
        if layer is None or not any(real(lay) is layer for lay in self.viewer.layers):
            return None
        return layer

    def _write_band(self, image: Image, request: _Request, band: np.ndarray) -> None:
        low, high = band_limits(request.threshold)
        data = band.astype(np.uint8)
        where = {"image": image.name, "slice": [*request.index], "low": low, "high": high}
        layer = self._band()
        if layer is None:
            active = self.viewer.layers.selection.active
            with self._main._adding_layer():
                layer = self.viewer.add_labels(
                    data,
                    name=f"{image.name} uncertain band",
                    colormap=DirectLabelColormap(color_dict={None: BAND_COLOUR, 0: "transparent"}),
                    opacity=1.0,
                    scale=image.scale[-2:],
                    translate=image.translate[-2:],
                    metadata={_BAND_KEY: where},
                )
            layer.contour = 1
            self._band_layer = weakref.ref(real(layer))
            if active is not None:  # napari activated the new layer; painting stays put
                self.viewer.layers.selection.active = active
        else:
            layer.data = data
            layer.name = f"{image.name} uncertain band"
            layer.scale, layer.translate = image.scale[-2:], image.translate[-2:]
        layer.metadata[_BAND_KEY] = where

    def _remove_band(self) -> None:
        layer = self._band()
        if layer is not None:
            self.viewer.layers.remove(layer)
        self._band_layer = None
