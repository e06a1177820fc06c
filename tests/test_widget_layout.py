"""The dock widget as a clinician reads and drives it (issue 10): groups, model panel,
slice shortcuts, status and messages. Real napari viewers, under Xvfb::

    xvfb-run -a pytest tests/test_widget_layout.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from lvunet_test_helpers import weights_in_child

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return weights_in_child(tmp_path_factory.mktemp("weights") / "random.safetensors")


@pytest.fixture
def docked(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    return viewer, dock, widget


def _wait_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)


def _shown(widget, control) -> bool:
    return control.native.isVisibleTo(widget.native)


def test_groups_in_reading_order_advanced_folded(docked, qtbot) -> None:
    from magicgui.widgets import Label

    _viewer, _dock, widget = docked
    groups = [widget.segment_group, widget.correct_group, widget.retrain_group, widget.advanced]
    assert list(widget) == groups
    assert [g.header.native.text()[2:] for g in groups] == [
        "Segment",
        "Correct and save",
        "Retrain",
        "Advanced",
    ]
    assert [g.expanded for g in groups] == [True, True, True, False]
    for control in (widget.image, widget.model, widget.threshold, widget.segment_button,
                    widget.cancel_button, widget.progress, widget.status):  # fmt: skip
        assert control in widget.segment_group.body and _shown(widget, control)
    assert widget.correct_section in widget.correct_group.body
    assert widget.restore_button in widget.correct_group.body
    assert widget.retrain in widget.retrain_group.body
    advanced = (widget.device, widget.device_in_use, widget.sizing, widget.output,
                widget.probabilities, widget.overwrite, widget.outline, widget.load_file,
                widget.details)  # fmt: skip
    for control in advanced:
        assert control in widget.advanced.body and not _shown(widget, control)

    # The header folds and unfolds its group, as a click does.
    qtbot.mouseClick(widget.advanced.header.native, _left())
    assert widget.advanced.expanded and all(_shown(widget, c) for c in advanced)
    assert widget.advanced.header.native.text().startswith("\u25be")
    qtbot.mouseClick(widget.segment_group.header.native, _left())
    assert not _shown(widget, widget.segment_button)
    assert widget.segment_group.header.native.text().startswith("\u25b8")

    # Another panel appended to "Correct and save" goes inside it, after what is there.
    extra = Label(value="another panel")
    widget.correct_group.append(extra)
    assert list(widget.correct_group.body)[-1] is extra
    assert list(widget) == groups


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def test_model_panel_follows_the_model(docked, qtbot, weights_file, tmp_path) -> None:
    from napari_lvunet import weights

    _viewer, dock, widget = docked
    qtbot.wait(100)
    width = dock.width()
    assert widget.model.value == weights.DEFAULT_MODEL
    assert widget.about.expanded and _shown(widget, widget.model_panel)
    test = weights.open_weights(weights.DEFAULT_MODEL).metadata["metrics"]["test"]
    text = widget.model_panel.native.text()
    assert f"Dice {test['dice']:.3f}, IoU {test['iou']:.3f}" in text
    assert "not diagnosis" in text and "Licence" in text and "polyps" in text
    # Tall enough for all its lines: no line is cut off at the bottom.
    panel = widget.model_panel.native
    assert panel.height() >= panel.heightForWidth(panel.width()) > 5 * panel.fontMetrics().height()

    long_name = "lvunet-finetuned-" + "a-long-folder-name-" * 6 + "x.safetensors"
    shutil.copyfile(weights_file, tmp_path / long_name)
    widget.add_weights_file(tmp_path / long_name)
    qtbot.wait(100)
    text = widget.model_panel.native.text()
    assert "none recorded in the weights" in text and "Dice" not in text
    assert dock.width() == width  # a long model name and text never widen the dock
    widget.model.value = weights.DEFAULT_MODEL
    assert f"Dice {test['dice']:.3f}" in widget.model_panel.native.text()


def test_slice_shortcuts_step_napari_dims(docked, qtbot) -> None:
    """Ctrl+Shift+Right / Left move napari's slider, even with the focus in the dock."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    viewer, _dock, widget = docked
    viewer.add_image(np.zeros((4, 64, 64), np.uint8), name="stack")
    window = viewer.window._qt_window
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    viewer.dims.set_current_step(0, 0)
    ctrl_shift = Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier
    for key, expected in ((Qt.Key.Key_Right, 1), (Qt.Key.Key_Right, 2), (Qt.Key.Key_Left, 1)):
        QTest.keyClick(window, key, ctrl_shift)
        assert viewer.dims.current_step[0] == expected
    widget.threshold.native.setFocus()  # the focus in the widget: the keys still step
    focused = window.focusWidget()
    QTest.keyClick(focused, Qt.Key.Key_Right, ctrl_shift)
    assert viewer.dims.current_step[0] == 2
    for _ in range(3):  # stops at the last slice
        QTest.keyClick(focused, Qt.Key.Key_Right, ctrl_shift)
    assert viewer.dims.current_step[0] == 3
    assert widget.threshold.value == 0.5  # the slider under the focus did not move
    assert "Ctrl+Shift+Right / Left" in widget.scope.tooltip
    assert "Ctrl+Shift+Right / Left" in widget.live.tooltip


def test_status_and_messages_move_on_after_a_later_success(
    docked, qtbot, weights_file, tmp_path
) -> None:
    """A failure shows until a later action: then the new status, and the old message
    marked earlier."""
    viewer, _dock, widget = docked
    widget.add_weights_file(weights_file)
    widget.segment()  # no image layer yet
    assert widget.status.value.startswith("not segmented: No image layer")

    rng = np.random.default_rng(3)
    viewer.add_image(rng.integers(0, 256, (128, 128), dtype=np.uint8), name="img")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not weights at all")
    widget.add_weights_file(broken)
    widget.segment()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("failed: ") and "broken.safetensors" in (
        widget.status.value
    )
    message = widget.details.value
    assert "broken.safetensors" in message and not message.startswith("Earlier")
    assert widget.advanced.note == "error message"  # folded: the header says so

    widget.add_weights_file(weights_file)
    widget.segment()
    _wait_idle(qtbot, widget)
    assert widget.status.value == "done: img labels"
    assert widget.details.value.startswith("Earlier message:\n")
    assert "broken.safetensors" in widget.details.value
    assert widget.advanced.note == ""
    widget.advanced.expanded = True
    assert _shown(widget, widget.details)


def test_quick_jobs_answer_without_a_busy_flash(docked, qtbot, weights_file, monkeypatch) -> None:
    """Speed (issue 10): a quick Segment shows only its result; a warm live preview of a
    small slice is segmented at once, with the slider step, and a slow one is not."""
    from napari_lvunet import _widget

    viewer, _dock, widget = docked
    widget.add_weights_file(weights_file)
    widget.threshold.value = 0.05  # a random network: make sure slices get foreground
    viewer.add_image(np.random.default_rng(5).integers(0, 256, (5, 128, 128), dtype=np.uint8),
                     name="vol")  # fmt: skip
    monkeypatch.setattr(_widget, "_BUSY_LOOK_MS", 60_000)  # "quick": any job in this test
    widget.scope.value = "slice"
    widget.segment()
    assert widget.busy and widget.segment_button.enabled  # no busy look yet...
    _wait_idle(qtbot, widget)
    assert "vol labels" in viewer.layers and widget.status.value == "done: vol labels"
    assert widget.segment_button.enabled and not widget.cancel_button.enabled

    monkeypatch.setattr(_widget, "_INLINE_PREVIEW_S", 10.0)  # any time is quick enough
    viewer.dims.set_current_step(0, 0)
    widget.live.value = True  # the first slice of a kind: on the job thread
    assert widget._preview_worker is not None
    _wait_idle(qtbot, widget)
    layer = viewer.layers["vol labels"]
    viewer.dims.set_current_step(0, 3)  # warm and small: done within the step itself
    assert widget._preview_worker is None and layer.data[3].any()

    monkeypatch.setattr(_widget, "_INLINE_PREVIEW_S", 0.0)  # what it took is too slow now
    viewer.dims.set_current_step(0, 1)  # so the job thread again: the GUI never waits long
    assert widget._preview_worker is not None
    _wait_idle(qtbot, widget)
    assert layer.data[1].any()


def _stack_with_live_preview(viewer, widget, weights_file) -> None:
    """A 5-slice stack, a random network, live preview on (its first slice on the job
    thread), slice 0 on display."""
    widget.add_weights_file(weights_file)
    widget.threshold.value = 0.05  # a random network: make sure slices get foreground
    viewer.add_image(np.random.default_rng(5).integers(0, 256, (5, 128, 128), dtype=np.uint8),
                     name="vol")  # fmt: skip
    viewer.dims.set_current_step(0, 0)
    widget.live.value = True
    assert widget._preview_worker is not None  # nothing measured yet: the job thread


def test_live_preview_goes_inline_only_after_a_measured_quick_run(
    docked, qtbot, weights_file, monkeypatch
) -> None:
    """Issue 10 (review): the job-thread run is timed; a slow one keeps the next slider step
    off the GUI thread, and a later quick job-thread run lets steps run in-line again."""
    from napari_lvunet import _widget

    viewer, _dock, widget = docked
    monkeypatch.setattr(_widget, "_INLINE_PREVIEW_S", 0.0)  # any measured run is too slow
    _stack_with_live_preview(viewer, widget, weights_file)
    _wait_idle(qtbot, widget)
    layer = viewer.layers["vol labels"]
    assert layer.data[0].any()
    assert next(iter(widget._preview_cost.values())) > 0.0  # measured on the job thread

    viewer.dims.set_current_step(0, 2)  # the first step after warm-up: not in-line
    assert widget._preview_worker is not None and not layer.data[2].any()
    _wait_idle(qtbot, widget)
    assert layer.data[2].any()

    monkeypatch.setattr(_widget, "_INLINE_PREVIEW_S", 10.0)  # the machine got quick again
    viewer.dims.set_current_step(0, 4)  # decided by slice 2's job-thread time: in-line
    assert widget._preview_worker is None and layer.data[4].any()


def test_live_preview_never_loads_a_model_in_the_gui_thread(
    docked, qtbot, weights_file, monkeypatch
) -> None:
    """Issue 10 (review): a model the pool evicted goes back to the job thread, however
    quick its slices were; the pool's peek never builds a segmenter."""
    from napari_lvunet import _widget
    from napari_lvunet.inference import default_pool

    viewer, _dock, widget = docked
    monkeypatch.setattr(_widget, "_INLINE_PREVIEW_S", 10.0)  # any time is quick enough
    _stack_with_live_preview(viewer, widget, weights_file)
    _wait_idle(qtbot, widget)
    layer = viewer.layers["vol labels"]
    model, device = widget.model.value, widget.device.value
    assert default_pool().peek(model, device=device) is not None

    default_pool().clear()  # evicted (as by four other models)
    assert default_pool().peek(model, device=device) is None and len(default_pool()) == 0
    viewer.dims.set_current_step(0, 2)
    assert widget._preview_worker is not None and not layer.data[2].any()  # job thread
    _wait_idle(qtbot, widget)
    assert layer.data[2].any() and default_pool().peek(model, device=device) is not None

    viewer.dims.set_current_step(0, 3)  # loaded again, measured quick: in-line
    assert widget._preview_worker is None and layer.data[3].any()


def test_closing_the_dock_cancels_a_running_segment(docked, qtbot, weights_file) -> None:
    viewer, dock, widget = docked
    widget.add_weights_file(weights_file)
    viewer.add_image(np.zeros((40, 256, 256), dtype=np.uint8), name="vol")
    widget.scope.value = "stack"
    widget.segment()
    cancel = widget._cancel
    assert widget._worker is not None and not cancel.is_set()
    dock.destroyOnClose()  # the dock's close button
    assert cancel.is_set()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert "vol labels" not in viewer.layers  # stopped: no result for a closed dock


def test_job_thread_runs_jobs_in_order_and_reports_in_the_gui_thread(qtbot) -> None:
    import threading

    from napari_lvunet._qt_util import run_in_background

    gui = threading.get_ident()
    events: list[tuple[str, object, bool]] = []

    def work(value: int) -> int:
        events.append(("ran", value, threading.get_ident() == gui))
        if value < 0:
            raise ValueError("negative")
        return value * 2

    def note(kind: str):
        return lambda *args: events.append((kind, args[0] if args else None,
                                            threading.get_ident() == gui))  # fmt: skip

    callbacks = {"returned": note("returned"), "errored": note("errored")}
    jobs = [
        run_in_background(work, value, finished=note("finished"), **callbacks)
        for value in (1, -1, 3)
    ]
    done: list[int] = []
    jobs[-1].when_finished(lambda: done.append(1))
    qtbot.waitUntil(lambda: done == [1], timeout=10_000)
    assert all(job.finished for job in jobs)
    assert [(k, v) for k, v, _ in events if k == "ran"] == [("ran", 1), ("ran", -1), ("ran", 3)]
    assert not any(in_gui for k, _, in_gui in events if k == "ran")  # off the GUI thread
    reported = [(k, v if not isinstance(v, Exception) else str(v), in_gui)
                for k, v, in_gui in events if k != "ran"]  # fmt: skip
    assert reported == [
        ("returned", 2, True), ("finished", None, True),
        ("errored", "negative", True), ("finished", None, True),
        ("returned", 6, True), ("finished", None, True),
    ]  # fmt: skip
    late: list[int] = []
    jobs[0].when_finished(lambda: late.append(1))  # already finished: called at once
    assert late == [1]
