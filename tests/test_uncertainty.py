"""Per-slice boundary uncertainty (``napari_lvunet.uncertainty``): no Qt, no torch.

Synthetic probability maps whose answer is known, then the bundled model (ONNX Runtime,
shipped with the package) on the sample polyp stack.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_lvunet.inference import SegmentationCancelled, Segmenter
from napari_lvunet.uncertainty import (
    band_limits,
    band_share,
    foreground,
    foreground_probability,
    rank,
    score_slices,
    uncertain_band,
)


def test_band_limits_follow_the_threshold() -> None:
    assert band_limits() == pytest.approx((0.3, 0.7))
    assert band_limits(0.1) == pytest.approx((0.0, 0.3))  # clipped at 0
    assert band_limits(0.9, half_width=0.05) == pytest.approx((0.85, 0.95))
    with pytest.raises(ValueError, match="threshold"):
        band_limits(1.5)
    with pytest.raises(ValueError, match="half_width"):
        band_limits(0.5, half_width=0.0)


def test_uncertain_band_marks_exactly_the_band() -> None:
    # 11 columns 0.0, 0.1, ..., 1.0: the band [0.3, 0.7] holds columns 3..7, ends included.
    probs = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (4, 1))
    band = uncertain_band(probs, 0.3, 0.7)
    assert band.dtype == bool and band.shape == probs.shape
    expected = np.zeros((4, 11), bool)
    expected[:, 3:8] = True
    np.testing.assert_array_equal(band, expected)
    assert band_share(probs, 0.3, 0.7) == pytest.approx(5 / 11)
    assert band_share(probs, 0.95, 1.0) == pytest.approx(1 / 11)
    with pytest.raises(ValueError, match="low <= high"):
        uncertain_band(probs, 0.7, 0.3)
    with pytest.raises(ValueError, match="empty"):
        band_share(np.zeros((0, 5)))


def test_band_share_is_a_share_of_pixels_not_of_probability_mass() -> None:
    # Equally far below and above 0.5: the same uncertainty, whatever the frame size.
    below = np.full((10, 10), 0.35)
    above = np.full((30, 20), 0.65)
    below[:5] = above[:15] = 0.99
    assert band_share(below) == band_share(above) == pytest.approx(0.5)


def test_rank_most_uncertain_first_ties_stable_skipping() -> None:
    scores = {(0,): 0.10, (1,): 0.30, (2,): 0.10, (3,): 0.50, (4,): 0.30, (5,): 0.0}
    assert rank(scores) == [(3,), (1,), (4,), (0,), (2,), (5,)]
    assert rank(scores, skip={(3,), (4,)}) == [(1,), (0,), (2,), (5,)]
    assert rank(scores, skip=set(scores)) == []
    assert rank({}) == []
    assert scores == {(0,): 0.10, (1,): 0.30, (2,): 0.10, (3,): 0.50, (4,): 0.30, (5,): 0.0}


def test_foreground_probability_of_a_multiclass_output_is_not_background() -> None:
    binary = np.full((2, 3, 4), 0.25, np.float32)
    assert foreground_probability(binary, labels_ndim=3) is binary
    classes = np.stack([np.full((3, 4), 0.6), np.full((3, 4), 0.3), np.full((3, 4), 0.1)])
    np.testing.assert_allclose(foreground_probability(classes, labels_ndim=2), 0.4)


# ------------------------------------------------------------ with the real engine


@pytest.fixture(scope="module")
def bundled() -> Segmenter:
    return Segmenter("lvunet-kvasir-seg", device="cpu")


@pytest.fixture(scope="module")
def polyp_stack() -> np.ndarray:
    from napari_lvunet._sample_data import polyp_stack

    return polyp_stack()[0][0]  # (5, 256, 320, 3) uint8


def test_score_slices_scores_each_slice_as_its_own_probabilities(bundled, polyp_stack) -> None:
    for threshold in (0.5, 0.35):
        scores = dict(score_slices(bundled, polyp_stack, "ZYXC", threshold=threshold))
        assert list(scores) == [(i,) for i in range(5)]
        low, high = band_limits(threshold)
        for (i,), score in scores.items():
            probs = foreground(bundled, polyp_stack[i], "YXC", threshold=threshold)
            assert probs.shape == (256, 320)
            assert score == pytest.approx(band_share(probs, low, high), rel=1e-6)
    # The sample's frames differ in uncertainty: the ranking is not the stack's order.
    scores = dict(score_slices(bundled, polyp_stack, "ZYXC"))
    assert len(set(scores.values())) == 5
    assert rank(scores) != sorted(scores)


def test_score_slices_walks_a_4d_stack_in_c_order(bundled, polyp_stack) -> None:
    gray = polyp_stack[..., 1]
    tz = np.stack([gray[:3], gray[2:]])  # (2, 3, H, W): slice (0, 2) is slice (1, 0)
    scores = dict(score_slices(bundled, tz, "TZYX"))
    assert list(scores) == [(t, z) for t in range(2) for z in range(3)]
    assert scores[(0, 2)] == pytest.approx(scores[(1, 0)], rel=1e-6)
    flat = dict(score_slices(bundled, gray, "ZYX"))
    assert scores[(1, 2)] == pytest.approx(flat[(4,)], rel=1e-6)


def test_score_slices_refuses_a_single_image_and_stops_on_cancel(bundled, polyp_stack) -> None:
    with pytest.raises(ValueError, match="slices of a stack"):
        next(score_slices(bundled, polyp_stack[0], "YXC"))
    cancel = threading.Event()
    scores = score_slices(bundled, polyp_stack, "ZYXC", cancel=cancel)
    cancel.set()
    with pytest.raises(SegmentationCancelled):
        next(scores)


def test_score_slices_keeps_scores_not_probability_maps(bundled) -> None:
    import tracemalloc

    n = 96
    data = np.random.default_rng(0).integers(0, 256, (n, 512, 512), dtype=np.uint8)
    foreground(bundled, data[:8], "ZYX")  # warm up the session outside the measurement
    tracemalloc.start()
    try:
        scores = dict(score_slices(bundled, data, "ZYX"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(scores) == n
    all_maps = n * 512 * 512 * np.dtype(np.float32).itemsize
    assert peak < all_maps / 2, f"peak {peak / 2**20:.0f} MiB for {all_maps / 2**20:.0f} MiB"


def test_uncertainty_and_its_panel_import_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, napari_lvunet.uncertainty, napari_lvunet._uncertain; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
