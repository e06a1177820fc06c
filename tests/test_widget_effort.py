"""Correction effort and duplicate-safe saving in the dock widget, in a real napari viewer.

Run under Xvfb: ``xvfb-run -a pytest tests/test_widget_effort.py``. The model is the
bundled one (ONNX Runtime, torch-free) on the sample polyp, so its proposal has both
foreground and background to correct. The tests segment, paint known pixels with the
Labels layer's own paint API, save, and check that the record, the plot and the CSV
count exactly the pixels painted; then save the same image again: the widget asks,
Cancel writes nothing, Update keeps the old mask.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

pytestmark = pytest.mark.gui

UPDATE = "Update its mask"


@pytest.fixture
def viewer_widget(make_napari_viewer, monkeypatch, tmp_path: Path):
    from napari_lvunet import weights

    monkeypatch.setenv("NAPARI_LVUNET_MODELS", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    assert widget.model.value == weights.DEFAULT_MODEL  # the bundled model
    return viewer, widget


@pytest.fixture
def questions(viewer_widget, monkeypatch) -> _Questions:
    """The widget's questions, answered as the test scripts them."""
    _viewer, widget = viewer_widget
    asked = _Questions()
    # On the class: magicgui containers treat deleting an instance attribute as removing
    # a child widget, which monkeypatch's undo would do.
    monkeypatch.setattr(type(widget), "_ask", lambda _self, *args: asked(*args))
    return asked


class _Questions:
    """Answers the widget's questions (``widget._ask``) as scripted; keeps what it asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, tuple[str, ...]]] = []
        self.answers: list[str | None] = []

    def __call__(self, title: str, text: str, buttons: tuple[str, ...]) -> str | None:
        self.asked.append((title, text, buttons))
        assert self.answers, f"unexpected question: {title}: {text}"
        answer = self.answers.pop(0)
        assert answer is None or answer in buttons, (answer, buttons)
        return answer


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _paint(layer, coord: tuple[int, int], label: int) -> tuple[int, int]:
    """Paint (or erase, ``label`` 0) one brush dab; returns the pixels it added / removed."""
    before = np.asarray(layer.data) > 0
    layer.paint(coord, label)
    after = np.asarray(layer.data) > 0
    return int((after & ~before).sum()), int((before & ~after).sum())


def test_save_records_exactly_the_painted_pixels_and_asks_before_a_twin(
    viewer_widget, questions, qtbot, tmp_path: Path
) -> None:
    from napari_lvunet import versions
    from napari_lvunet._sample_data import polyp

    viewer, widget = viewer_widget
    section = widget.correct_section
    bundled = versions.list_versions()[0]
    viewer.add_image(polyp()[0][0], name="polyp", rgb=True)
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    layer = viewer.layers["polyp labels"]
    proposal = np.asarray(layer.data) > 0
    np.testing.assert_array_equal(widget.proposal_mask(layer), proposal)

    # Paint where the model said background, erase where it said foreground.
    layer.brush_size = 9
    background, foreground = np.argwhere(~proposal), np.argwhere(proposal)
    added = removed = 0
    if len(background):
        added += _paint(layer, tuple(int(v) for v in background[len(background) // 2]), 1)[0]
    if len(foreground):
        removed += _paint(layer, tuple(int(v) for v in foreground[len(foreground) // 2]), 0)[1]
    assert added > 0 and removed > 0  # both kinds of correction
    corrected = np.asarray(layer.data) > 0

    data_dir = tmp_path / "corrections"
    section.data_dir.value = data_dir
    result = widget.save_for_training()
    assert [i.status for i in result.items] == ["written"]
    assert "1 new pair(s) written" in widget.status.value
    record = json.loads(result.items[0].record.read_text())
    assert (record["pixels_added"], record["pixels_removed"]) == (added, removed)
    assert record["foreground"] == int(corrected.sum())
    assert (record["weights_name"], record["weights_sha256"]) == (bundled.name, bundled.sha256)
    assert record["threshold"] == pytest.approx(widget.threshold.value, rel=1e-9)
    assert record["sizing"] == widget.sizing.value
    saved_proposal = np.asarray(PILImage.open(data_dir / record["proposal"])) > 0
    np.testing.assert_array_equal(saved_proposal, proposal)
    assert not questions.asked

    # The plot under Save shows the pair, the CSV has the painted pixels.
    ((label, _colour, points, mean),) = section.effort_plot.series
    assert points == [(0, pytest.approx(record["dice"], rel=1e-12))]
    assert mean == pytest.approx(record["dice"], rel=1e-12)
    out = section.export_csv(tmp_path / "effort.csv")
    with open(out, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["pixels_added"], row["pixels_removed"]) == (str(added), str(removed))
    assert row["version"] == label == bundled.name

    # The same image and mask again: nothing to ask, nothing written.
    before = _files(data_dir)
    again = widget.save_for_training()
    assert [i.status for i in again.items] == ["unchanged"] and not questions.asked
    assert "unchanged" in widget.status.value and _files(data_dir) == before

    # The same image with another correction: asked; Cancel writes nothing at all.
    extra = _paint(layer, (2, 2), 1 - int(corrected[2, 2]))
    assert sum(extra) > 0
    questions.answers.append(None)
    assert widget.save_for_training() == []
    ((_title, text, buttons),) = questions.asked
    assert buttons == (UPDATE,) and "images/polyp.png" in text
    assert _files(data_dir) == before
    assert "nothing saved" in widget.status.value

    # Update: the new mask replaces the old one, which is kept in history/.
    questions.answers.append(UPDATE)
    updated = widget.save_for_training()
    assert [i.status for i in updated.items] == ["updated"]
    assert "updated" in widget.status.value
    mask = np.asarray(PILImage.open(data_dir / "masks" / "polyp.png")) > 0
    np.testing.assert_array_equal(mask, np.asarray(layer.data) > 0)
    history = updated.items[0].history
    assert (history / "masks" / "polyp.png").read_bytes() == before["masks/polyp.png"]
    assert (history / "records" / "polyp.json").read_bytes() == before["records/polyp.json"]
    assert sorted(p.name for p in (data_dir / "images").iterdir()) == ["polyp.png"]
    new_record = json.loads((data_dir / "records" / "polyp.json").read_text())
    total_added = int((mask & ~proposal).sum())
    assert new_record["pixels_added"] == total_added  # still against the model's proposal
    ((_, _, points, _),) = section.effort_plot.series
    assert points == [(0, pytest.approx(new_record["dice"], rel=1e-12))]


def test_a_stack_saves_only_its_corrected_slices_each_with_its_own_proposal(
    viewer_widget, questions, qtbot, tmp_path: Path
) -> None:
    """Whole-stack scope on a stack the widget segmented: only the painted slices are
    saved (an untouched frame is the model's own output, and would count as Dice 1.0 in
    the effort trend); each record is against that frame's own proposal."""
    from napari_lvunet import effort
    from napari_lvunet._sample_data import polyp_stack

    viewer, widget = viewer_widget
    section = widget.correct_section
    stack = polyp_stack()[0][0]  # (5, H, W, 3)
    viewer.add_image(stack, name="frames", rgb=True)
    assert widget.scope.value == "stack"
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    layer = viewer.layers["frames labels"]
    proposal = np.asarray(layer.data) > 0
    assert proposal[2].any() and not proposal[2].all()

    viewer.dims.set_current_step(0, 2)
    layer.brush_size = 15
    where = np.argwhere(proposal[2])[len(np.argwhere(proposal[2])) // 2]
    added, removed = _paint(layer, (2, int(where[0]), int(where[1])), 0)
    assert removed > 0 and added == 0
    np.testing.assert_array_equal(np.asarray(layer.data)[[0, 1, 3, 4]] > 0, proposal[[0, 1, 3, 4]])

    data_dir = tmp_path / "corrections"
    section.data_dir.value = data_dir
    result = widget.save_for_training()
    assert [(i.status, i.slices) for i in result.items] == [("written", ((2,),))]
    assert widget.status.value.startswith("saved 1 corrected slice(s) of 5: 1 new pair(s)")
    assert sorted(p.name for p in (data_dir / "images").iterdir()) == ["frames_z002.png"]
    (row,) = effort.read_records(data_dir)
    assert row.slice == (2,) and (row.pixels_added, row.pixels_removed) == (0, removed)
    assert row.foreground == int((np.asarray(layer.data)[2] > 0).sum()) and row.dice < 1.0
    assert not questions.asked

    # Another frame corrected: it is saved, against its own proposal; frame 2 unchanged.
    viewer.dims.set_current_step(0, 4)
    background = np.argwhere(~proposal[4])[len(np.argwhere(~proposal[4])) // 2]
    added4, _ = _paint(layer, (4, int(background[0]), int(background[1])), 1)
    assert added4 > 0
    again = widget.save_for_training()
    assert [(i.status, i.slices) for i in again.items] == [
        ("unchanged", ((2,),)),
        ("written", ((4,),)),
    ]
    assert "2 corrected slice(s) of 5" in widget.status.value
    rows = effort.read_records(data_dir)
    assert [(r.slice, r.pixels_added, r.pixels_removed) for r in rows] == [
        ((2,), 0, removed),
        ((4,), added4, 0),
    ]
    ((_label, _colour, points, _mean),) = section.effort_plot.series
    assert [p for p, _ in points] == [0, 1]

    # A stack never corrected: the question about the model's own result, as for one image.
    viewer.add_image(stack[:2], name="other", rgb=True)
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    section.corrected.value = viewer.layers["other labels"]
    questions.answers.append(None)  # Cancel
    assert widget.save_for_training() == []
    assert "never corrected" in questions.asked[-1][1]
    assert len(effort.read_records(data_dir)) == 2


@pytest.mark.gui
def test_saving_a_frame_of_a_video_reads_only_that_frame(
    viewer_widget, questions, qtbot, tmp_path: Path, monkeypatch
) -> None:
    """A video layer is read frame by frame on demand; saving the corrected frame must not
    decode the whole video (a long one would not fit in memory)."""
    from napari_lvunet import video
    from napari_lvunet._sample_data import polyp_video

    viewer, widget = viewer_widget
    data, kwargs, _kind = polyp_video()[0]
    assert isinstance(data, video.Video)
    image = viewer.add_image(data, **kwargs)
    widget.image.value = image
    widget.scope.value = "slice"
    viewer.dims.set_current_step(0, 7)
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    layer = viewer.layers[f"{image.name} labels"]
    proposal = np.asarray(layer.data[7]) > 0
    where = np.argwhere(proposal)[len(np.argwhere(proposal)) // 2]
    layer.brush_size = 9
    _paint(layer, (7, int(where[0]), int(where[1])), 0)

    decoded: list[int] = []
    real = video.Video._frame

    def counting(self, i: int) -> np.ndarray:
        decoded.append(i)
        return real(self, i)

    monkeypatch.setattr(video.Video, "_frame", counting)
    widget.correct_section.data_dir.value = tmp_path / "corrections"
    result = widget.save_for_training()
    assert [(i.status, i.slices) for i in result.items] == [("written", ((7,),))]
    assert set(decoded) == {7}, decoded
    saved = np.asarray(PILImage.open(result.items[0].image))
    np.testing.assert_array_equal(saved, np.asarray(data[7])[..., :3])
