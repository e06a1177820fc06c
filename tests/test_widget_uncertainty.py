"""The "Next uncertain slice" panel (``_uncertain.UncertaintyPanel``) in a real napari viewer.

Run under Xvfb: ``xvfb-run -a pytest tests/test_widget_uncertainty.py``. The model is the
bundled one (ONNX Runtime, torch-free) and the stack is the sample polyp stack, whose five
frames leave the model uncertain to different degrees, so the expected jump order is known
from ``uncertainty`` computed directly on the same frames.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from napari_lvunet.uncertainty import (
    band_limits,
    band_share,
    foreground,
    rank,
    score_slices,
    uncertain_band,
)

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    from napari_lvunet._sample_data import polyp_stack

    return polyp_stack()[0][0]  # (5, 256, 320, 3) uint8


@pytest.fixture(scope="module")
def segmenter():
    from napari_lvunet.inference import Segmenter

    # A segmenter of its own (not the widget's pool), on the same bundled model.
    return Segmenter("lvunet-kvasir-seg", device="cpu")


@pytest.fixture(scope="module")
def expected(segmenter, stack) -> list[tuple[int, ...]]:
    """The ranking computed without the panel, checked to be neither trivial nor tied."""
    scores = {(z,): band_share(foreground(segmenter, stack[z], "YXC")) for z in range(5)}
    assert dict(score_slices(segmenter, stack, "ZYXC")) == pytest.approx(scores, rel=1e-6)
    values = sorted(scores.values())
    assert min(b / a for a, b in itertools.pairwise(values)) > 1.05  # no near-ties
    order = rank(scores)
    assert order not in (sorted(scores), sorted(scores)[::-1])
    return order


@pytest.fixture
def panel_setup(make_napari_viewer, qtbot):
    from napari_lvunet import weights
    from napari_lvunet._uncertain import UncertaintyPanel

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    assert widget.model.value == weights.DEFAULT_MODEL  # the bundled model
    panel = UncertaintyPanel(widget)
    viewer.window.add_dock_widget(panel, name="uncertain")
    return viewer, widget, panel


def _idle(qtbot, *workers, timeout: int = 60_000) -> None:
    qtbot.waitUntil(lambda: not any(w.busy for w in workers), timeout=timeout)


def _press(qtbot, panel, viewer) -> int:
    panel.next_uncertain()
    _idle(qtbot, panel)
    return int(viewer.dims.current_step[0])


def test_jumps_walk_the_ranking_and_scores_are_cached(
    panel_setup, qtbot, stack, expected, monkeypatch
) -> None:
    import napari_lvunet._uncertain as uncertain_mod

    viewer, widget, panel = panel_setup
    image = viewer.add_image(stack, name="stack", rgb=True)
    passes = []
    counted = uncertain_mod.score_slices

    def counting(*args, **kwargs):
        passes.append(args[2])
        return counted(*args, **kwargs)

    monkeypatch.setattr(uncertain_mod, "score_slices", counting)
    order = [_press(qtbot, panel, viewer) for _ in range(5)]
    assert order == [z for (z,) in expected]
    assert len(passes) == 1  # ranked once, then the cached scores
    ((key, scores),) = panel.scores(image).items()
    assert key[1:] == (0.5, "auto", "ZYXC") and len(key[0]) == 64  # the weights' sha256
    top = expected[0][0]
    # Once every slice was shown, the walk starts again from the top.
    assert _press(qtbot, panel, viewer) == top
    assert panel.where.value.startswith("all shown, from the top again: ")
    assert panel.where.value.endswith(
        f"slice {top} of 5: {100 * scores[(top,)]:.2g} % uncertain pixels, 1st of 5"
    )

    # Another threshold is another ranking (the band follows it); the old one is kept.
    widget.threshold.value = 0.3
    _press(qtbot, panel, viewer)
    assert len(passes) == 2 and len(panel.scores(image)) == 2
    # Replaced image data drops the scores and the visited slices: ranked anew.
    image.data = np.ascontiguousarray(stack[::-1])
    assert panel.scores(image) == {}
    widget.threshold.value = 0.5
    assert _press(qtbot, panel, viewer) == 4 - top
    assert len(passes) == 3


def test_jump_skips_the_slices_painted_in_corrected_labels(panel_setup, qtbot, stack, expected):
    viewer, widget, panel = panel_setup
    image = viewer.add_image(stack, name="stack", rgb=True)
    e0, e1, e2, e3, e4 = (z for (z,) in expected)
    assert _press(qtbot, panel, viewer) == e0
    widget.segment()
    _idle(qtbot, widget)
    assert len(panel.scores(image)) == 1  # a Segment run leaves the ranking alone
    labels = viewer.layers["stack labels"]
    widget.corrected.value = labels
    labels.brush_size = 9
    labels.paint((e1, 100, 100), 7)
    assert widget.edited_slices(labels) == {(e1,)}
    assert _press(qtbot, panel, viewer) == e2  # e0 was shown, e1 is corrected
    assert panel.where.value.startswith(f"slice {e2} of 5: ")
    assert panel.where.value.endswith(", 3rd of 5")  # its place among all slices
    labels.paint((e3, 100, 100), 7)
    assert _press(qtbot, panel, viewer) == e4
    # All shown or corrected: the walk starts again, still without the corrected ones.
    assert _press(qtbot, panel, viewer) == e0
    assert _press(qtbot, panel, viewer) == e2
    labels.paint((e0, 100, 100), 7)
    labels.paint((e2, 100, 100), 7)
    labels.paint((e4, 100, 100), 7)
    shown = viewer.dims.current_step[0]
    assert _press(qtbot, panel, viewer) == shown
    assert panel.where.value == "all 5 slices are corrected"


def test_band_layer_marks_the_uncertain_pixels_of_the_shown_slice(
    panel_setup, qtbot, stack, segmenter, expected
) -> None:
    from napari.layers import Labels

    from napari_lvunet._annotations import RESULT_COLOURS
    from napari_lvunet._uncertain import BAND_COLOUR, is_band_layer

    viewer, widget, panel = panel_setup
    image = viewer.add_image(stack, name="stack", rgb=True, scale=(1, 0.5, 0.5))
    viewer.layers.selection.active = image

    def band_of(z: int):
        qtbot.waitUntil(
            lambda: (
                "stack uncertain band" in viewer.layers
                and viewer.layers["stack uncertain band"].metadata["lvunet_band"]["slice"] == [z]
            ),
            timeout=60_000,
        )
        _idle(qtbot, panel)
        return viewer.layers["stack uncertain band"]

    viewer.dims.set_current_step(0, 1)
    panel.show_band.value = True
    band = band_of(1)
    assert isinstance(band, Labels) and band.ndim == 2 and band.contour == 1
    assert is_band_layer(band) and not is_band_layer(image)
    # Never offered as the labels to save: it would become a training mask.
    widget.corrected.reset_choices()
    assert all(not is_band_layer(choice) for choice in widget.corrected.choices)
    assert tuple(band.scale) == (0.5, 0.5)
    from napari.utils.colormaps.standardize_color import transform_color

    np.testing.assert_allclose(band.colormap.color_dict[None], transform_color(BAND_COLOUR)[0])
    assert BAND_COLOUR.lower() not in RESULT_COLOURS
    assert viewer.layers.selection.active is image  # the band never takes the brush
    probs = foreground(segmenter, stack[1], "YXC")
    np.testing.assert_array_equal(band.data.astype(bool), uncertain_band(probs, 0.3, 0.7))
    assert band.data.any()

    # The button's jump moves the band with it; a new threshold moves the band.
    top = _press(qtbot, panel, viewer)
    assert top == expected[0][0]
    band = band_of(top)
    probs = foreground(segmenter, stack[top], "YXC")
    np.testing.assert_array_equal(band.data.astype(bool), uncertain_band(probs, 0.3, 0.7))
    widget.threshold.value = 0.3
    qtbot.waitUntil(lambda: band.metadata["lvunet_band"]["high"] == pytest.approx(0.5))
    _idle(qtbot, panel)
    probs = foreground(segmenter, stack[top], "YXC", threshold=0.3)
    assert band_limits(0.3) == pytest.approx((0.1, 0.5))
    np.testing.assert_array_equal(band.data.astype(bool), uncertain_band(probs, 0.1, 0.5))

    panel.show_band.value = False
    assert "stack uncertain band" not in viewer.layers


def test_cancel_stops_the_ranking_and_keeps_nothing(panel_setup, qtbot) -> None:
    viewer, _widget, panel = panel_setup
    frames = np.random.default_rng(3).integers(0, 256, (400, 256, 256), dtype=np.uint8)
    image = viewer.add_image(frames, name="long")
    shown = viewer.dims.current_step[0]
    panel.next_uncertain()
    assert panel.cancel_button.enabled and not panel.next_button.enabled
    qtbot.waitUntil(lambda: panel.progress.value >= 8, timeout=60_000)  # mid-pass
    started = time.perf_counter()
    panel.cancel()
    _idle(qtbot, panel, timeout=5_000)
    assert time.perf_counter() - started < 5
    assert panel.progress.value < 400
    assert panel.where.value == "ranking cancelled"
    assert panel.scores(image) == {}
    assert panel.next_button.enabled and not panel.cancel_button.enabled
    assert viewer.dims.current_step[0] == shown  # no jump


def test_panel_is_off_for_single_images_and_drops_scores_on_a_new_model(
    panel_setup, qtbot, stack, tmp_path: Path
) -> None:
    from napari_lvunet import weights

    viewer, widget, panel = panel_setup
    viewer.add_image(stack[0], name="one", rgb=True)
    assert not panel.next_button.enabled and not panel.show_band.enabled
    assert "Only for stacks and videos" in panel.next_button.tooltip
    assert "Only for stacks and videos" in panel.show_band.tooltip

    image = viewer.add_image(stack, name="stack", rgb=True)
    widget.image.value = image
    assert panel.next_button.enabled and panel.show_band.enabled
    assert "least sure" in panel.next_button.tooltip
    _press(qtbot, panel, viewer)
    assert len(panel.scores(image)) == 1
    # Picking another model (here a copy of the bundled weights) drops every score.
    copy = tmp_path / "copy.safetensors"
    entry = weights.registry()[weights.DEFAULT_MODEL]
    shutil.copy(weights.bundled_dir() / entry.filename, copy)
    widget.add_weights_file(copy)
    assert panel.scores(image) == {}


def test_ranks_a_lazy_video_layer(panel_setup, qtbot, segmenter) -> None:
    from napari_lvunet._sample_data import polyp_video

    viewer, _widget, panel = panel_setup
    ((video, kwargs, _kind), _truth) = polyp_video()
    viewer.add_image(video, **kwargs)  # (100, 360, 448, 3), decoded frame by frame
    expected = rank(dict(score_slices(segmenter, video, "ZYXC")))
    assert [_press(qtbot, panel, viewer) for _ in range(3)] == [z for (z,) in expected[:3]]
    assert panel.where.value.startswith(f"slice {expected[2][0]} of 100: ")
    assert panel.where.value.endswith(", 3rd of 100")
