"""The dock widget and its Qt-free logic (``_annotations``).

GUI tests use a real napari viewer (pytest-qt's ``make_napari_viewer``) and run under
Xvfb: ``xvfb-run -a pytest tests/test_widget.py``. Models are random fused LV-UNets saved to
``tmp_path``; images are 128-256 px, so every segmentation takes milliseconds.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lvunet_test_helpers import (
    assert_only_a_resume_state,
    process_gone,
    tiny_pairs_folder,
    weights_in_child,
)
from PIL import Image as PILImage

from napari_lvunet._annotations import (
    edited_slices,
    finetune_command,
    layer_axes,
    safe_stem,
    save_for_training,
    slice_stem,
)

# ------------------------------------------------------------------ no Qt needed


@pytest.mark.parametrize(
    ("ndim", "rgb", "axes"),
    [(2, False, "YX"), (2, True, "YXC"), (3, False, "ZYX"), (3, True, "ZYXC"), (4, False, "TZYX")],
)
def test_layer_axes(ndim: int, rgb: bool, axes: str) -> None:
    assert layer_axes(ndim, rgb) == axes


def test_layer_axes_rejects_5d() -> None:
    with pytest.raises(ValueError, match="5 spatial dimensions"):
        layer_axes(5, False)


def test_stems() -> None:
    assert safe_stem("polyp stack [1]") == "polyp_stack_1"
    assert safe_stem("***") == "image"
    assert slice_stem("scan", ()) == "scan"
    assert slice_stem("scan", (3,)) == "scan_z003"
    assert slice_stem("movie", (1, 12)) == "movie_t001_z012"
    assert finetune_command("/data/my folder", "w.safetensors") == (
        "python -m training.finetune --data '/data/my folder' --weights w.safetensors"
    )


def test_edited_slices_from_napari_history_atoms() -> None:
    from napari.layers.labels.labels import _MaskedPaintAtom

    masked = _MaskedPaintAtom(
        slice_key=(slice(2, 4), slice(0, 5), slice(1, 3)),
        mask=None,
        old_values=np.zeros((2, 5, 2)),
        new_value=1,
    )
    fancy = ((np.array([7, 7, 9]), np.array([0, 1, 2]), np.array([0, 0, 0])), np.zeros(3), 1)
    assert edited_slices([masked, fancy], 1) == {(2,), (3,), (7,), (9,)}
    assert edited_slices([fancy], 0) == {()}
    assert edited_slices([masked], 2) == {(2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (3, 0),
                                          (3, 1), (3, 2), (3, 3), (3, 4)}  # fmt: skip


def test_save_for_training_stack_pairs_never_overwrite(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8)
    labels = np.zeros((3, 64, 80), dtype=np.int32)
    labels[1, 10:20, 30:50] = 2  # an instance label: any non-zero is foreground
    pairs = save_for_training(image, labels, tmp_path, "scan", rgb=True)
    assert [p.name for p, _ in pairs] == ["scan_z000.png", "scan_z001.png", "scan_z002.png"]
    for z, (img_path, mask_path) in enumerate(pairs):
        assert mask_path == tmp_path / "masks" / img_path.name
        np.testing.assert_array_equal(np.asarray(PILImage.open(img_path)), image[z])
        np.testing.assert_array_equal(np.asarray(PILImage.open(mask_path)), (labels[z] > 0) * 255)
    before = {p: p.read_bytes() for p in (tmp_path / "images").iterdir()}

    again = save_for_training(image[:, ::-1], labels, tmp_path, "scan", rgb=True, slices=[(1,)])
    assert [p.name for p, _ in again] == ["scan-2_z001.png"]
    assert {p: p.read_bytes() for p in before} == before  # nothing replaced

    # The pairs are what the training package reads back.
    from training.data import find_pairs, load_pair

    found = find_pairs(tmp_path)
    assert len(found) == 4
    rgb, mask = load_pair(next(p for p in found if p.image.name == "scan_z001.png"))
    np.testing.assert_allclose(rgb, image[1] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(mask, labels[1] > 0)


def test_save_for_training_scales_float_gray_and_checks_shapes(tmp_path: Path) -> None:
    image = np.linspace(-1.0, 3.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    ((img_path, _),) = save_for_training(
        image, np.ones((64, 64), np.uint8), tmp_path, "g", rgb=False
    )
    saved = np.asarray(PILImage.open(img_path))
    assert saved.dtype == np.uint8 and saved.shape == (64, 64)
    assert saved.min() == 0 and saved.max() == 255
    with pytest.raises(ValueError, match="does not match"):
        save_for_training(image, np.ones((32, 64), np.uint8), tmp_path, "g", rgb=False)
    with pytest.raises(ValueError, match="outside the stack"):
        save_for_training(image[None], np.ones((1, 64, 64)), tmp_path, "g", rgb=False,
                          slices=[(4,)])  # fmt: skip
    assert len(list((tmp_path / "images").iterdir())) == 1


# ------------------------------------------------------------- the dock widget


# Random fused weights, written by a child so that this process never imports torch.
@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LV-UNet at the end of deep training, fused and saved like a real model."""
    path = tmp_path_factory.mktemp("weights") / "random.safetensors"
    return weights_in_child(path)


class _Notes:
    """napari notifications dispatched during a test, by severity."""

    def __init__(self) -> None:
        from napari.utils.notifications import notification_manager

        self.records: list = []
        self._manager = notification_manager
        notification_manager.notification_ready.connect(self._on)

    def _on(self, notification) -> None:
        self.records.append(notification)

    def messages(self, severity: str) -> list[str]:
        return [n.message for n in self.records if str(n.severity).lower().endswith(severity)]

    def close(self) -> None:
        self._manager.notification_ready.disconnect(self._on)


@pytest.fixture
def notes() -> Iterator[_Notes]:
    recorder = _Notes()
    yield recorder
    recorder.close()


@pytest.fixture
def viewer_widget(make_napari_viewer, weights_file: Path):
    viewer = make_napari_viewer()
    # Through napari's own plugin machinery: the manifest's widget, as a user opens it.
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    widget.add_weights_file(weights_file)
    return viewer, widget


def _wait_idle(qtbot, widget, timeout: int = 60_000) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _start_live_preview(viewer, widget, qtbot, step: int):
    """Show slice ``step`` of the "vol" layer, turn live preview on, return its first result."""
    viewer.dims.set_current_step(0, step)
    widget.threshold.value = 0.05  # a random network: make sure slices get foreground
    widget.live.value = True
    qtbot.waitUntil(lambda: "vol labels" in viewer.layers, timeout=60_000)
    _wait_idle(qtbot, widget)
    return viewer.layers["vol labels"]


_EXPECTED_DIALOGS: list[str] = []


@pytest.fixture(autouse=True)
def _no_unexpected_dialogs() -> Iterator[None]:
    """Fail a test whose widget asks a question the test did not answer, instead of hanging.

    The widget's questions are modal: unanswered, they would block the test forever.
    """
    if "qtpy" not in sys.modules:
        yield
        return
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    unexpected: list[str] = []

    def check() -> None:
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox) and not _EXPECTED_DIALOGS:
            unexpected.append(box.text())
            box.reject()

    timer = QTimer()
    timer.timeout.connect(check)
    timer.start(100)
    yield
    timer.stop()
    _EXPECTED_DIALOGS.clear()
    assert not unexpected, f"the widget asked, and the test did not answer: {unexpected}"


def _answer(button: str) -> list[str]:
    """Click ``button`` in the next dialog the widget opens; returns [its text] once shown.

    The widget's questions are real modal ``QMessageBox`` es; this answers them as a user
    would, from inside their event loop.
    """
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    seen: list[str] = []
    _EXPECTED_DIALOGS.append(button)

    def click(attempts_left: int = 200) -> None:
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox):
            if attempts_left:
                QTimer.singleShot(10, lambda: click(attempts_left - 1))
            return
        seen.append(box.text())
        _EXPECTED_DIALOGS.remove(button)
        for candidate in box.buttons():
            if candidate.text().replace("&", "") == button:
                candidate.click()
                return
        box.reject()
        raise AssertionError(f"no {button!r} button in {[b.text() for b in box.buttons()]}")

    QTimer.singleShot(0, click)
    return seen


def _labels_layers(viewer) -> list:
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


def _reference(weights_file: Path, data: np.ndarray, axes: str, **kw) -> np.ndarray:
    from napari_lvunet.inference import Segmenter

    # A segmenter of its own (not the widget's pool), on the same file, torch-free.
    return Segmenter(weights_file, device="cpu").segment(data, axes=axes, **kw)


@pytest.mark.gui
def test_widget_lists_image_layers_only_and_follows_the_layer_list(viewer_widget) -> None:
    viewer, widget = viewer_widget
    assert widget.image.choices == ()
    first = viewer.add_image(np.zeros((64, 64)), name="a")
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="not an image")
    second = viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="b", rgb=True)
    assert widget.image.choices == (first, second)
    assert widget.image.value is second  # napari makes a new layer the active one
    # napari refreshes docked pickers itself; the widget must also work undocked.
    from napari_lvunet._widget import LVUNetWidget

    undocked = LVUNetWidget(viewer)
    second.name = "renamed"
    undocked.image.value = second
    assert undocked.image.current_choice == "renamed"
    viewer.layers.remove(first)
    assert widget.image.choices == undocked.image.choices == (second,)
    assert widget.image.value is second
    assert [c for c in widget.model.choices if c.endswith("random.safetensors")]
    assert widget.device.choices == ("auto", "cpu", "cuda", "mps")
    assert widget.device_in_use.value == "cpu (from the next run)"


@pytest.mark.gui
def test_segment_rgb_image(viewer_widget, qtbot, weights_file: Path) -> None:
    viewer, widget = viewer_widget
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    image = viewer.add_image(data, name="photo", rgb=True, scale=(0.5, 2.0), translate=(3, -4))
    widget.threshold.value = 0.45
    widget.probabilities.value = True
    widget.segment()
    _wait_idle(qtbot, widget)
    labels = viewer.layers["photo labels"]
    assert labels.data.shape == (150, 200) and labels.data.dtype == np.uint8
    np.testing.assert_array_equal(labels.scale, image.scale)
    np.testing.assert_array_equal(labels.translate, image.translate)
    expected = _reference(weights_file, data, "YXC", threshold=0.45)
    np.testing.assert_array_equal(labels.data, expected)
    probability = viewer.layers["photo probability"]
    assert probability.data.shape == (150, 200) and 0 <= probability.data.min() <= 1
    np.testing.assert_array_equal(labels.data, (probability.data > 0.45).astype(np.uint8))
    assert widget.device_in_use.value == "cpu (onnxruntime)"
    assert widget.corrected.value is labels


@pytest.mark.gui
def test_segment_grayscale_float_image_as_instances(viewer_widget, qtbot, weights_file) -> None:
    viewer, widget = viewer_widget
    data = np.random.default_rng(1).normal(100.0, 20.0, (128, 160)).astype(np.float32)
    viewer.add_image(data, name="ct")
    widget.output.value = "instances"
    widget.threshold.value = 0.3
    widget.segment()
    _wait_idle(qtbot, widget)
    expected = _reference(weights_file, data, "YX", threshold=0.3, output="instances")
    np.testing.assert_array_equal(viewer.layers["ct labels"].data, expected)


@pytest.mark.gui
def test_segment_stack_whole_and_current_slice(viewer_widget, qtbot, weights_file) -> None:
    viewer, widget = viewer_widget
    data = np.random.default_rng(2).integers(0, 256, (4, 128, 128), dtype=np.uint8)
    viewer.add_image(data, name="stack", scale=(5.0, 1.0, 1.0))
    progress: list[tuple[int, int]] = []
    widget._progress.changed.connect(lambda done, total: progress.append((done, total)))
    widget.segment()
    _wait_idle(qtbot, widget)
    whole = viewer.layers["stack labels"]
    np.testing.assert_array_equal(whole.data, _reference(weights_file, data, "ZYX"))
    np.testing.assert_array_equal(whole.scale, (5.0, 1.0, 1.0))
    assert progress and progress[-1] == (4, 4)  # the stack reported its progress
    assert (widget.progress.value, widget.progress.max) == (4, 4)

    widget.scope.value = "slice"
    viewer.dims.set_current_step(0, 2)
    widget.segment()
    _wait_idle(qtbot, widget)
    one = _labels_layers(viewer)[-1]
    assert one is not whole and one.data.shape == data.shape
    np.testing.assert_array_equal(one.data[2], whole.data[2])
    assert not one.data[[0, 1, 3]].any()


@pytest.mark.gui
def test_rerun_keeps_hand_corrections_unless_overwrite(viewer_widget, qtbot) -> None:
    viewer, widget = viewer_widget
    data = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    viewer.add_image(data, name="img", rgb=True)
    widget.segment()
    _wait_idle(qtbot, widget)
    first = viewer.layers["img labels"]
    first.brush_size = 9
    first.paint((64, 64), 7)  # a hand correction with napari's brush
    assert first.data[64, 64] == 7
    assert widget.edited_slices(first) == {()}
    corrected = first.data.copy()

    widget.segment()  # overwrite unticked: a new layer, the corrections untouched
    _wait_idle(qtbot, widget)
    layers = _labels_layers(viewer)
    assert len(layers) == 2 and layers[0] is first
    np.testing.assert_array_equal(first.data, corrected)
    assert not (layers[1].data == 7).any()

    widget.overwrite.value = True  # ticked: the latest result layer is replaced in place
    layers[1].paint((10, 10), 5)
    asked = _answer("Replace")
    widget.segment()
    _wait_idle(qtbot, widget)
    assert asked and "img labels 2" in asked[0]
    assert _labels_layers(viewer) == layers
    assert not (layers[1].data == 5).any()
    assert widget.edited_slices(layers[1]) == set()
    np.testing.assert_array_equal(first.data, corrected)


@pytest.mark.gui
def test_overwrite_asks_first_and_keeps_the_corrections(viewer_widget, qtbot, notes) -> None:
    """Issue 10 #1: Overwrite never silently destroys hand corrections."""
    viewer, widget = viewer_widget
    data = np.random.default_rng(3).integers(0, 256, (128, 128), dtype=np.uint8)
    viewer.add_image(data, name="img")
    widget.threshold.value = 0.05
    widget.segment()
    _wait_idle(qtbot, widget)
    layer = viewer.layers["img labels"]
    proposal = layer.data.copy()
    widget.overwrite.value = True

    widget.segment()  # nothing corrected yet: replaced without a question
    _wait_idle(qtbot, widget)
    assert _labels_layers(viewer) == [layer] and not widget.restore_button.enabled

    layer.brush_size = 20
    layer.paint((30, 30), 1)
    layer.paint((100, 100), 0)  # the eraser too
    corrected = layer.data.copy()
    assert not np.array_equal(corrected, proposal)

    asked = _answer("Cancel")
    widget.segment()
    assert asked and "holds corrections" in asked[0] and not widget.busy
    np.testing.assert_array_equal(layer.data, corrected)

    asked = _answer("New layer")
    widget.segment()
    _wait_idle(qtbot, widget)
    assert asked and len(_labels_layers(viewer)) == 2
    np.testing.assert_array_equal(layer.data, corrected)
    viewer.layers.remove(_labels_layers(viewer)[1])

    asked = _answer("Replace")
    widget.segment()
    _wait_idle(qtbot, widget)
    assert asked and _labels_layers(viewer) == [layer]
    np.testing.assert_array_equal(layer.data, proposal)  # replaced by the model's result
    assert widget.restore_button.enabled
    assert widget.restore_replaced()  # one click brings the corrections back
    np.testing.assert_array_equal(layer.data, corrected)
    assert widget.edited_slices(layer) == {()} and not widget.restore_button.enabled
    assert any("restored" in m for m in notes.messages("info"))

    # Corrections made by writing into the data (no paint event) count as well.
    layer.data = proposal.copy()
    layer.data[0:5, 0:5] = 1 - layer.data[0:5, 0:5]
    widget._tracks[layer].edited.clear()
    asked = _answer("Cancel")
    widget.segment()
    assert asked and not widget.busy


@pytest.mark.gui
def test_resegment_keeps_the_corrected_layer_picked(viewer_widget, qtbot, notes, tmp_path) -> None:
    """Issue 10 #2: a new result never takes over Save's picker, and looks different."""
    viewer, widget = viewer_widget
    data = np.random.default_rng(11).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    viewer.add_image(data, name="img", rgb=True)
    widget.threshold.value = 0.05
    widget.segment()
    _wait_idle(qtbot, widget)
    first = viewer.layers["img labels"]
    assert widget.corrected.value is first
    first.brush_size = 15
    first.paint((64, 64), 1 - int(first.data[64, 64]))  # brush or eraser: a real change

    widget.segment()
    _wait_idle(qtbot, widget)
    second = _labels_layers(viewer)[-1]
    assert second is not first and second.name == "img labels 2"
    assert widget.corrected.value is first  # still the layer the user corrected
    colour_first = first.colormap.map(np.array([1]))[0]
    colour_second = second.colormap.map(np.array([1]))[0]
    assert not np.allclose(colour_first, colour_second)
    # High contrast on red mucosa: neither result is drawn in a red.
    for r, g, b, _a in (colour_first, colour_second):
        assert not (r > 0.6 and g < 0.4 and b < 0.4)

    # Saving the never-corrected result asks first; Cancel saves nothing.
    widget.data_dir.value = tmp_path / "corrections"
    widget.corrected.value = second
    asked = _answer("Cancel")
    assert widget.save_for_training() == []
    assert asked and "never corrected" in asked[0]
    assert not (tmp_path / "corrections" / "masks").exists() or not any(
        (tmp_path / "corrections" / "masks").iterdir()
    )
    asked = _answer("Save anyway")
    assert len(widget.save_for_training()) == 1 and asked
    widget.corrected.value = first  # corrected: not that question, but its image is saved
    asked = _answer("Update its mask")  # already (from `second`): update, never a twin
    result = widget.save_for_training()
    assert len(result) == 1 and result.updated and "saved already" in asked[0]


@pytest.mark.gui
def test_pickers_follow_the_layer_selected_in_napari(viewer_widget, qtbot) -> None:
    """Issue 10 #5: selecting a layer in napari's list is what the widget acts on."""
    viewer, widget = viewer_widget
    rng = np.random.default_rng(12)
    a = viewer.add_image(rng.integers(0, 256, (128, 128), dtype=np.uint8), name="a")
    b = viewer.add_image(rng.integers(0, 256, (128, 128), dtype=np.uint8), name="b")
    viewer.layers.selection.active = a
    assert widget.image.value is a
    viewer.layers.selection.active = b
    assert widget.image.value is b
    widget.segment()
    _wait_idle(qtbot, widget)
    result = viewer.layers["b labels"]
    viewer.layers.selection.active = a
    assert widget.image.value is a
    viewer.layers.selection.active = result  # a result: its own image, and Save's layer
    assert widget.image.value is b and widget.corrected.value is result


@pytest.mark.gui
def test_dock_keeps_its_width_with_long_texts(make_napari_viewer, qtbot, weights_file, tmp_path):
    """Issue 10 #6: long statuses and file names are elided, never widen the dock."""
    import shutil

    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    viewer.add_image(np.zeros((128, 128), np.uint8), name="img")
    qtbot.wait(200)
    width, hint = dock.width(), widget.native.minimumSizeHint().width()

    long_name = "lvunet-finetuned-" + "my-very-long-corrections-folder-" * 4 + "x.safetensors"
    shutil.copyfile(weights_file, tmp_path / long_name)
    widget.add_weights_file(tmp_path / long_name)
    widget.segment()
    _wait_idle(qtbot, widget)
    long_status = "fine-tuning: " + "a status that goes on and on, " * 20
    widget.status.value = long_status
    qtbot.wait(200)
    assert dock.width() == width
    assert widget.native.minimumSizeHint().width() <= hint
    assert widget.status.value == long_status  # the full text is kept...
    assert long_status in widget.status.native.toolTip()  # ...and shown on hover
    assert widget.status.native.text().endswith("…")  # elided on screen


@pytest.mark.gui
def test_ambiguous_two_channel_image_asks_for_axes(viewer_widget, qtbot, notes) -> None:
    """Issue 10 #4: an (H, W, 2) image is never silently a stack of W x 2 images."""
    viewer, widget = viewer_widget
    data = np.random.default_rng(13).integers(0, 256, (128, 96, 2), dtype=np.uint8)
    viewer.add_image(data, name="two")
    assert widget.axes.value == "auto"
    widget.segment()
    assert not widget.busy and "two labels" not in viewer.layers
    message = notes.messages("error")[-1]
    assert "(128, 96, 2)" in message and "Axes" in message
    assert widget.axes.native.isVisibleTo(widget.native)  # the choice is on show
    assert widget.status.value == "choose the image's axes"
    widget.axes.value = "ZYX"  # the user says: it really is a stack
    widget.segment()
    _wait_idle(qtbot, widget)
    assert viewer.layers["two labels"].data.shape == (128, 96, 2)


@pytest.mark.gui
def _controls(container):
    """Every control of the widget, inside its sections too."""
    from magicgui.widgets import Container

    for control in container:
        if isinstance(control, Container):
            yield from _controls(control)
        else:
            yield control


def test_controls_explain_themselves_and_results_can_be_outlines(viewer_widget, qtbot) -> None:
    """Issue 10 clarity: tooltips everywhere, stack controls only for stacks, outlines."""
    from napari_lvunet._qt_util import WrappedText

    viewer, widget = viewer_widget
    for control in _controls(widget):
        if isinstance(control, WrappedText):
            continue  # a text to read (the model panel, a result): it is its own explanation
        name = control.label or getattr(control, "text", "") or type(control).__name__
        assert control.tooltip, f"{name!r} has no tooltip"
    assert "Ctrl+Shift+Return" in widget.segment_button.tooltip
    assert "Ctrl+Shift+S" in widget.save_button.tooltip
    keys = [shortcut.key().toString() for shortcut in widget._shortcuts]
    assert keys == ["Ctrl+Shift+Return", "Ctrl+Shift+S", "Ctrl+Shift+Right", "Ctrl+Shift+Left"]

    def shown(control) -> bool:
        return control.native.isVisibleTo(widget.native)

    widget.advanced.expanded = True  # live preview and axes are advanced choices
    viewer.add_image(np.zeros((128, 128), np.uint8), name="flat")
    assert not shown(widget.scope) and not shown(widget.live) and not shown(widget.axes)
    assert not shown(widget.uncertain)
    viewer.add_image(np.zeros((3, 128, 128), np.uint8), name="stack")
    assert shown(widget.scope) and shown(widget.live) and shown(widget.axes)
    assert shown(widget.uncertain)

    widget.outline.value = True
    widget.segment()
    _wait_idle(qtbot, widget)
    result = viewer.layers["stack labels"]
    assert result.contour > 0
    widget.outline.value = False
    assert result.contour == 0


@pytest.mark.gui
def test_live_preview_segments_displayed_slice_and_skips_edited(viewer_widget, qtbot) -> None:
    viewer, widget = viewer_widget
    data = np.random.default_rng(4).integers(0, 256, (5, 128, 128), dtype=np.uint8)
    viewer.add_image(data, name="vol")
    layer = _start_live_preview(viewer, widget, qtbot, step=1)
    assert layer.data[1].any() and not layer.data[[0, 2, 3, 4]].any()

    viewer.dims.set_current_step(0, 3)
    qtbot.waitUntil(lambda: layer.data[3].any(), timeout=10_000)
    _wait_idle(qtbot, widget)
    assert not layer.data[[0, 2, 4]].any()

    # Correct slice 3 with the brush, then scroll away and back.
    layer.brush_size = 15
    layer.paint((3, 64, 64), 9)
    assert widget.edited_slices(layer) == {(3,)}
    corrected = layer.data[3].copy()
    viewer.dims.set_current_step(0, 4)
    qtbot.waitUntil(lambda: layer.data[4].any(), timeout=10_000)
    viewer.dims.set_current_step(0, 3)
    _wait_idle(qtbot, widget)
    qtbot.wait(50)
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(layer.data[3], corrected)  # not repainted
    widget.live.value = False
    viewer.dims.set_current_step(0, 0)
    qtbot.wait(100)
    assert widget._preview_worker is None and not layer.data[0].any()


@pytest.mark.gui
def test_cancel_stops_a_stack(viewer_widget, qtbot, notes) -> None:
    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((200, 128, 128), np.uint8), name="long")
    widget.segment()
    assert widget.busy
    # A job that lasts shows as busy (a quick one never does): Cancel on, Segment off.
    qtbot.waitUntil(lambda: widget.cancel_button.enabled, timeout=5000)
    assert not widget.segment_button.enabled and widget.status.value == "segmenting long..."
    widget.cancel()
    _wait_idle(qtbot, widget)
    assert widget.status.value == "cancelled"
    assert "long labels" not in viewer.layers
    assert any("cancelled" in m for m in notes.messages("info"))
    assert widget.segment_button.enabled and not widget.cancel_button.enabled


@pytest.mark.gui
def test_save_for_training_from_widget(viewer_widget, qtbot, notes, tmp_path, weights_file):
    viewer, widget = viewer_widget
    data = np.random.default_rng(5).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    viewer.add_image(data, name="frames", rgb=True)
    widget.segment()
    _wait_idle(qtbot, widget)
    layer = viewer.layers["frames labels"]
    # Every frame corrected: the whole-stack scope saves only corrected frames of a result.
    layer.data[:, 20:40, 20:40] = 3 * (1 - np.sign(layer.data[:, 20:40, 20:40]))
    widget.data_dir.value = tmp_path / "corrections"
    pairs = widget.save_for_training()
    assert [p.name for p, _ in pairs] == ["frames_z000.png", "frames_z001.png", "frames_z002.png"]
    mask = np.asarray(PILImage.open(pairs[1][1]))
    np.testing.assert_array_equal(mask, (layer.data[1] > 0) * 255)
    expected = finetune_command(tmp_path / "corrections", weights_file)
    assert widget.command.value == expected
    assert any(expected in m for m in notes.messages("info"))

    widget.scope.value = "slice"  # only the slice on display, whose image is saved already:
    viewer.dims.set_current_step(0, 2)  # asked, it updates that pair (never a twin)
    layer.data[2, 0:9, 0:9] = 1 - np.sign(layer.data[2, 0:9, 0:9])  # corrected too
    asked = _answer("Update its mask")
    again = widget.save_for_training()
    assert [p.name for p, _ in again] == ["frames_z002.png"] and asked
    assert [item.status for item in again.items] == ["updated"]
    np.testing.assert_array_equal(np.asarray(PILImage.open(again[0][1])), (layer.data[2] > 0) * 255)
    assert len(list((tmp_path / "corrections" / "masks").iterdir())) == 3


@pytest.mark.gui
def test_save_for_training_pairs_a_result_with_its_own_image(viewer_widget, qtbot, notes, tmp_path):
    viewer, widget = viewer_widget
    rng = np.random.default_rng(8)
    a = viewer.add_image(rng.integers(0, 256, (128, 128), dtype=np.uint8), name="A")
    b = viewer.add_image(rng.integers(0, 256, (128, 128), dtype=np.uint8), name="B")
    widget.image.value = a
    widget.segment()
    _wait_idle(qtbot, widget)
    assert widget.corrected.value is viewer.layers["A labels"]
    a_labels = viewer.layers["A labels"]
    a_labels.paint((64, 64), 1 - int(a_labels.data[64, 64]))  # corrected: no question
    widget.image.value = b  # same size as A: a shape check cannot tell them apart
    widget.data_dir.value = tmp_path / "corrections"
    ((img_path, _),) = widget.save_for_training()
    assert img_path.name == "A.png"
    np.testing.assert_array_equal(np.asarray(PILImage.open(img_path)), a.data)
    assert any("segmented from 'A'" in m for m in notes.messages("info"))

    # A Labels layer the user drew is saved with the image they picked.
    mine = viewer.add_labels(np.zeros((128, 128), np.uint8), name="mine")
    mine.data[5:9, 5:9] = 1
    widget.image.value, widget.corrected.value = b, mine
    ((img_path, _),) = widget.save_for_training()
    np.testing.assert_array_equal(np.asarray(PILImage.open(img_path)), b.data)

    # A result whose image was closed is refused, not paired with the picked one.
    viewer.layers.remove(a)
    widget.image.value, widget.corrected.value = b, viewer.layers["A labels"]
    assert widget.save_for_training() == []
    assert "no longer open" in notes.messages("error")[-1]
    assert len(list((tmp_path / "corrections" / "images").iterdir())) == 2


@pytest.mark.gui
def test_stale_results_for_resized_image_data_are_dropped(viewer_widget, notes) -> None:
    viewer, widget = viewer_widget
    rng = np.random.default_rng(9)
    image = viewer.add_image(rng.integers(0, 256, (3, 128, 128), dtype=np.uint8), name="vol")
    resized = rng.integers(0, 256, (2, 128, 192), dtype=np.uint8)

    # Results computed for the old data, arriving after the data was replaced: dropped.
    widget.scope.value = "slice"
    viewer.dims.set_current_step(0, 1)
    stale = widget._run(widget._gather(), None)
    stale_preview = widget._run(widget._gather(preview_index=(1,)), None)
    image.data = resized
    widget._on_segmented(stale)
    widget._on_preview(stale_preview)
    assert _labels_layers(viewer) == []
    assert "changed size while it was being segmented" in notes.messages("warning")[-1]


@pytest.mark.gui
def test_live_preview_after_image_data_resized(viewer_widget, qtbot, notes) -> None:
    viewer, widget = viewer_widget
    rng = np.random.default_rng(9)
    image = viewer.add_image(rng.integers(0, 256, (3, 128, 128), dtype=np.uint8), name="vol")
    resized = rng.integers(0, 256, (2, 128, 192), dtype=np.uint8)
    old = _start_live_preview(viewer, widget, qtbot, step=1)
    before = old.data.copy()
    image.data = resized
    viewer.dims.set_current_step(0, 0)
    qtbot.waitUntil(lambda: len(_labels_layers(viewer)) == 2, timeout=60_000)
    _wait_idle(qtbot, widget)
    new = _labels_layers(viewer)[-1]
    assert new.data.shape == (2, 128, 192) and new.data[0].any() and not new.data[1].any()
    np.testing.assert_array_equal(old.data, before)  # the old result is left as it was
    assert any("changed size" in m for m in notes.messages("info"))
    widget.live.value = False


@pytest.mark.gui
def test_overwrite_replaces_only_the_widgets_probability_layer(viewer_widget, qtbot) -> None:
    viewer, widget = viewer_widget
    data = np.random.default_rng(10).integers(0, 256, (128, 128), dtype=np.uint8)
    viewer.add_image(data, name="img")
    users = np.full((128, 128), 0.25, np.float32)
    viewer.add_image(users.copy(), name="img probability")  # the user's own layer
    widget.probabilities.value = widget.overwrite.value = True
    widget.segment()
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers["img probability"].data, users)
    ours = viewer.layers[-1]
    assert ours.name != "img probability" and ours.data.shape == (128, 128)
    ours.name = "renamed by the user"
    ours.data = np.zeros((128, 128), np.float32)
    n_layers = len(viewer.layers)
    widget.segment()  # overwrite: the widget's layer is replaced in place, by identity
    _wait_idle(qtbot, widget)
    assert len(viewer.layers) == n_layers and ours.data.any()
    np.testing.assert_array_equal(viewer.layers["img probability"].data, users)


@pytest.mark.gui
@pytest.mark.slow
def test_finetune_from_widget_selects_new_weights(viewer_widget, qtbot, notes, tmp_path) -> None:
    torch_before = "torch" in sys.modules
    viewer, widget = viewer_widget
    folder = tiny_pairs_folder(tmp_path / "corrections", n=5)
    widget.data_dir.value = folder
    widget.steps.value = 2
    before = widget.model.value
    statuses: list[str] = []
    # Connected after the widget's own slot: sees the status each step left.
    widget.retrain._signals.step.connect(lambda _step: statuses.append(widget.status.value))
    widget.finetune()
    job = widget.retrain.job
    assert job is not None and job.pid is not None  # a child process, not a thread here
    assert not widget.segment_button.enabled and widget.cancel_button.enabled
    _wait_idle(qtbot, widget, timeout=300_000)
    assert not notes.messages("error"), notes.messages("error")
    assert process_gone(job.pid)
    # The new model is a version, used only once the user accepts it.
    assert widget.model.value == before and widget.retrain.outcome is not None
    version = widget.retrain.outcome.version
    new = Path(version.weights)
    assert new.is_file() and list((folder / "finetuned").glob("*.safetensors"))
    # 4 training images (one of 5 held out) at 4 per step: one step per epoch, 2 in all;
    # every step was shown with its epoch, loss and time left.
    steps = [s for s in statuses if s.startswith("fine-tuning: epoch")]
    assert len(steps) == 2 and steps[0].startswith("fine-tuning: epoch 1 of ")
    assert "loss" in steps[0] and "left" in steps[0]
    assert (widget.progress.value, widget.progress.max) == (2, 2)
    widget.retrain.accept()
    assert widget.model.value == str(new) and new.suffix == ".safetensors"
    assert widget.status.value == f"using the new model {version.name}"
    assert widget.segment_button.enabled and not widget.cancel_button.enabled
    # napari's process never imported torch for this (checkable where nothing else did).
    assert ("torch" in sys.modules) == torch_before

    # The new weights are what the next segmentation uses.
    viewer.add_image(np.random.default_rng(7).integers(0, 256, (128, 128), np.uint8), name="x")
    widget.segment()
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(
        viewer.layers["x labels"].data, _reference(new, viewer.layers["x"].data, "YX")
    )


@pytest.mark.gui
@pytest.mark.slow
def test_finetune_cancel_ends_the_child_and_writes_nothing(viewer_widget, qtbot, notes, tmp_path):
    _viewer, widget = viewer_widget
    folder = tiny_pairs_folder(tmp_path / "corrections", n=5)
    widget.data_dir.value = folder
    widget.steps.value = 5000
    before = widget.model.choices
    widget.finetune()
    job = widget.retrain.job
    qtbot.waitUntil(lambda: widget.status.value.startswith("fine-tuning: epoch"), timeout=300_000)
    t0 = time.monotonic()
    widget.cancel()
    assert widget.status.value == "cancelling..."
    _wait_idle(qtbot, widget, timeout=10_000)
    assert time.monotonic() - t0 < 5.0
    assert process_gone(job.pid) and job.returncode is not None
    assert widget.status.value == "cancelled"
    assert any("cancelled" in m for m in notes.messages("info"))
    assert not notes.messages("error")
    assert widget.model.choices == before
    assert_only_a_resume_state(folder, widget.model.value)
    assert widget.segment_button.enabled and widget.finetune_button.enabled


@pytest.mark.gui
@pytest.mark.slow
def test_failing_finetune_child_is_a_notification(viewer_widget, qtbot, notes, tmp_path) -> None:
    viewer, widget = viewer_widget
    folder = tmp_path / "no pairs"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    widget.data_dir.value = folder
    widget.steps.value = 1
    widget.finetune()
    _wait_idle(qtbot, widget, timeout=300_000)
    (message,) = notes.messages("error")
    assert message.startswith("LV-UNet: fine-tuning failed: ") and "no pairs" in message
    assert widget.status.value == "fine-tuning failed"
    assert "no pairs" in widget.details.value  # the whole message, readable and copyable
    # napari and the widget carry on: the buttons work again, the viewer takes layers.
    assert widget.segment_button.enabled and widget.finetune_button.enabled
    viewer.add_image(np.zeros((64, 64), np.uint8), name="still alive")
    assert "still alive" in viewer.layers and not widget.busy


@pytest.mark.gui
def test_finetune_without_torch_names_the_install_line(viewer_widget, notes, tmp_path, monkeypatch):
    from napari_lvunet import _retrain
    from napari_lvunet._torch import TRAIN_INSTALL

    _viewer, widget = viewer_widget
    widget.data_dir.value = tiny_pairs_folder(tmp_path / "corrections")
    # The probe the widget asks, answering as it does in a core install without torch.
    monkeypatch.setattr(_retrain, "torch_installed", lambda: False)
    widget.finetune()
    assert widget.retrain.job is None and not widget.busy
    assert widget.command.value == TRAIN_INSTALL  # whole, in a field that can be copied
    assert TRAIN_INSTALL in widget.details.value
    (message,) = notes.messages("error")
    assert "needs PyTorch" in message and "Fine-tune command" in message


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch):
    """A registry with one more model, served by a real HTTP server on 127.0.0.1."""
    import shutil

    from napari_lvunet import weights
    from napari_lvunet.inference import default_pool

    root = tmp_path / "www"
    root.mkdir()
    shutil.copyfile(weights_file, root / "served.safetensors")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    entry = weights.ModelEntry(
        name="served",
        filename="served.safetensors",
        sha256=weights.file_sha256(root / "served.safetensors"),
        description="random weights served locally",
    )
    models = {**weights.registry(), "served": entry}  # the bundled model stays listed
    monkeypatch.setattr(weights, "registry", lambda: models)
    monkeypatch.setenv(weights.BASE_URL_ENV, f"http://127.0.0.1:{httpd.server_port}/")
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    # The pool keys registry models by name: this test's "served" is not another test's.
    default_pool().clear()
    yield httpd
    default_pool().clear()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.gui
def test_model_downloads_from_local_server_on_segment(served, make_napari_viewer, qtbot) -> None:
    from napari_lvunet._widget import LVUNetWidget

    viewer = make_napari_viewer()
    widget = LVUNetWidget(viewer)
    widget.model.value = "served"
    assert widget.model.current_choice == "served (will download)"
    viewer.add_image(np.zeros((128, 128), np.uint8), name="img")
    messages: list[str] = []
    widget._progress.message.connect(messages.append)
    widget.segment()
    _wait_idle(qtbot, widget)
    assert "img labels" in viewer.layers
    assert messages[:2] == ["downloading served...", "download complete"], messages
    assert widget.model.current_choice == "served (cached)"


@pytest.mark.gui
def test_download_failure_is_a_notification(served, make_napari_viewer, qtbot, notes) -> None:
    from napari_lvunet._widget import LVUNetWidget

    served.shutdown()
    served.server_close()  # the server is down: the machine looks offline
    viewer = make_napari_viewer()
    widget = LVUNetWidget(viewer)
    widget.model.value = "served"
    viewer.add_image(np.zeros((128, 128), np.uint8), name="img")
    widget.segment()
    _wait_idle(qtbot, widget)
    (message,) = notes.messages("error")
    assert "served" in message and "img labels" not in viewer.layers
    assert widget.status.value.startswith("failed: ") and widget.segment_button.enabled


@pytest.mark.gui
def test_error_paths_are_notifications(viewer_widget, qtbot, notes, tmp_path, monkeypatch):
    viewer, widget = viewer_widget

    widget.segment()  # no image layer
    assert "No image layer" in notes.messages("error")[-1]

    widget.save_for_training()  # no Labels layer
    assert "needs an image layer and a Labels layer" in notes.messages("error")[-1]

    bad = np.ones((128, 128), np.float32)
    bad[3, 3] = np.nan
    viewer.add_image(bad, name="bad")
    widget.segment()  # unsupported data, found in the worker
    _wait_idle(qtbot, widget)
    assert "NaN" in notes.messages("error")[-1]

    widget.image.value = viewer.add_image(np.zeros((2, 2, 2, 64, 64), np.uint8), name="5d")
    widget.segment()  # unsupported shape, found before any work starts
    assert "5 spatial dimensions" in notes.messages("error")[-1]

    viewer.layers.remove("5d")
    widget.image.value = viewer.add_image(np.zeros((128, 128), np.uint8), name="fine")
    widget.add_weights_file(tmp_path / "deleted.safetensors")  # weights missing
    widget.segment()
    _wait_idle(qtbot, widget)
    assert "deleted.safetensors" in notes.messages("error")[-1]

    from napari_lvunet.inference import Segmenter

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 12.0 GiB")

    widget.model.value = next(c for c in widget.model.choices if c.endswith("random.safetensors"))
    monkeypatch.setattr(Segmenter, "segment", out_of_memory)
    widget.segment()
    _wait_idle(qtbot, widget)
    assert "ran out of memory" in notes.messages("error")[-1]

    from napari_lvunet.inference.device import gpu_may_exist

    if not gpu_may_exist():  # a GPU asked for but missing: said at once
        widget.device.value = "cuda"
        assert "no CUDA GPU" in notes.messages("warning")[-1]
        assert widget.device_in_use.value == "cpu (from the next run)"

    widget.finetune()  # no dataset folder chosen
    assert "dataset folder" in notes.messages("error")[-1]

    pyramid = [np.zeros((256, 256), np.uint8), np.zeros((128, 128), np.uint8)]
    widget.image.value = viewer.add_image(pyramid, name="pyramid", multiscale=True)
    widget.segment()
    assert "multiscale" in notes.messages("error")[-1]
    assert len(notes.messages("error")) == 8
    assert widget.segment_button.enabled and not widget.cancel_button.enabled
    assert "fine labels" not in viewer.layers
