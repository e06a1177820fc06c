"""Which slice of a stack or video to correct next: the model's boundary uncertainty.

No Qt, no torch: numpy probabilities in, per-slice scores and a ranking out. The napari
panel (``_uncertain.py``) runs :func:`score_slices` in a thread worker and jumps to the
first slice of :func:`rank`.

The score of a slice is the share of its pixels whose foreground probability lies in the
uncertain band around the threshold (:func:`band_limits`: [0.3, 0.7] at the default
threshold 0.5). Why this and not the alternatives:

* the share of *pixels*, not the probability mass in the band: the mass counts a pixel at
  0.65 almost twice as much as one at 0.35, although both are equally far from the
  decision; the share is symmetric, bounded in [0, 1], comparable between frames of
  different sizes, and reads as it is shown ("8 % uncertain pixels");
* the band, not disagreement under a horizontal flip: the flip needs a second forward
  pass per slice, and where the two passes disagree the probability is near the
  threshold anyway, which the band already sees. On the sample video (100 frames, the
  bundled model, 2-core CPU) the band ranked the frames in 2.7 s, the flip in 6.8 s,
  and the two rankings agreed closely (Spearman 0.89);
* the band follows the threshold the user segments with: a pixel is uncertain when a
  small change of the model's confidence would flip its label *at that threshold*.

Scores are computed at the frame's own size from the probabilities the engine returns,
a few slices at a time, so a long video never holds more than a handful of probability
maps in memory.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np

from .cancel import CancelToken

__all__ = [
    "BAND_HALF_WIDTH",
    "band_limits",
    "band_share",
    "foreground",
    "foreground_probability",
    "rank",
    "score_slices",
    "uncertain_band",
]

#: Position of one 2D slice in a stack: its indices along the stack axes (as in the widget).
SliceIndex = tuple[int, ...]

#: Half the width of the uncertain band: at threshold 0.5 the band is [0.3, 0.7].
BAND_HALF_WIDTH = 0.2

# score_slices feeds the engine at most this many pixels at a time (a few frames): enough
# for the CPU backend's batches, small enough for the float32 probabilities of 4K frames.
_CHUNK_PIXELS = 1 << 22
_CHUNK_FRAMES = 8


def band_limits(threshold: float = 0.5, half_width: float = BAND_HALF_WIDTH) -> tuple[float, float]:
    """The uncertain band ``(low, high)`` around a threshold, clipped to [0, 1].

    Args:
        threshold: The probability above which a pixel is foreground.
        half_width: How far from the threshold a probability still counts as uncertain.

    Raises:
        ValueError: For a threshold outside [0, 1] or a half width outside (0, 0.5].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 < half_width <= 0.5:
        raise ValueError(f"half_width must be in (0, 0.5], got {half_width}")
    return max(0.0, threshold - half_width), min(1.0, threshold + half_width)


def uncertain_band(probs: np.ndarray, low: float = 0.3, high: float = 0.7) -> np.ndarray:
    """Where the foreground probability lies in ``[low, high]``: a bool mask of ``probs``'s shape.

    Args:
        probs: Foreground probabilities (any shape, values in [0, 1]).
        low: Lower end of the band, included.
        high: Upper end of the band, included.

    Raises:
        ValueError: If ``low > high`` or either lies outside [0, 1].
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"the uncertain band needs 0 <= low <= high <= 1, got [{low}, {high}]")
    probs = np.asarray(probs)
    return (probs >= low) & (probs <= high)


def band_share(probs: np.ndarray, low: float = 0.3, high: float = 0.7) -> float:
    """The share of pixels of one slice in the uncertain band: its uncertainty score, in [0, 1].

    Raises:
        ValueError: For an empty array, or a bad band (see :func:`uncertain_band`).
    """
    probs = np.asarray(probs)
    if probs.size == 0:
        raise ValueError("no pixels to score: the probability map is empty")
    return float(np.count_nonzero(uncertain_band(probs, low, high))) / probs.size


def foreground_probability(probs: np.ndarray, labels_ndim: int) -> np.ndarray:
    """The probability of *any* foreground class, from what ``Segmenter.segment`` returns.

    A binary model's probabilities have the labels' shape and are returned as they are; a
    multi-class model's have a leading class axis, and foreground is "not background".
    """
    probs = np.asarray(probs)
    return 1.0 - probs[0] if probs.ndim > labels_ndim else probs


def rank(
    scores: Mapping[SliceIndex, float], skip: Collection[SliceIndex] | None = None
) -> list[SliceIndex]:
    """Slices from the most uncertain to the least, leaving out ``skip``.

    Args:
        scores: Each slice's score (:func:`band_share`); higher is more uncertain.
        skip: Slices to leave out (corrected ones, ones already visited).

    Returns:
        The slice indices, highest score first; equal scores keep their order in
        ``scores`` (the stack's order, for the scores :func:`score_slices` yields).
    """
    skipped = set(skip or ())
    kept = [index for index in scores if index not in skipped]
    return sorted(kept, key=lambda index: -scores[index])  # sorted() is stable


def foreground(
    segmenter: Any,
    data: Any,
    axes: str,
    *,
    threshold: float = 0.5,
    sizing: str = "auto",
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Foreground probabilities of an image or stack, as the engine segments it.

    Args:
        segmenter: A :class:`~napari_lvunet.inference.Segmenter` (or anything with its
            ``segment`` method).
        data: The image or stack (numpy, or a lazy array such as a video's frames).
        axes: ``data``'s axes (e.g. ``"YXC"``, ``"ZYX"``).
        threshold: The threshold the user segments with.
        sizing: The engine's sizing (``"auto"``, ``"resize"``, ``"tiles"``).
        cancel: A cancel token, checked by the engine before every batch.

    Returns:
        float32 probabilities with ``data``'s non-channel shape.
    """
    labels, probs = segmenter.segment(
        data,
        axes=axes,
        threshold=threshold,
        sizing=sizing,
        return_probabilities=True,
        cancel=cancel,
    )
    return foreground_probability(probs, labels.ndim)


def score_slices(
    segmenter: Any,
    data: Any,
    axes: str,
    *,
    threshold: float = 0.5,
    sizing: str = "auto",
    cancel: CancelToken | None = None,
) -> Iterator[tuple[SliceIndex, float]]:
    """Score every slice of a stack: ``(slice index, band share)``, in the stack's order.

    The slices go through the engine a few at a time (along the last stack axis), with
    the uncertain band around ``threshold``; only the scores are kept.

    Args:
        segmenter: As for :func:`foreground`.
        data: The stack, stack axes first, as napari holds it.
        axes: ``data``'s axes, stack axes first (e.g. ``"ZYX"``, ``"TZYXC"``).
        threshold: The threshold the user segments with; the band is centred on it.
        sizing: The engine's sizing.
        cancel: A cancel token, checked by the engine before every batch.

    Raises:
        ValueError: If ``axes`` has no stack axis in front, or for what the engine refuses.
        napari_lvunet.inference.SegmentationCancelled: If ``cancel`` was set.
    """
    n_leading = axes.index("Y") if "Y" in axes else 0
    if n_leading == 0 or any(a not in "TZ" for a in axes[:n_leading]):
        raise ValueError(f"uncertainty ranks the slices of a stack; axes {axes!r} are one image")
    low, high = band_limits(threshold)
    leading = tuple(int(n) for n in data.shape[:n_leading])
    frame_pixels = math.prod(int(n) for n in data.shape[n_leading : n_leading + 2])
    chunk = max(1, min(_CHUNK_FRAMES, _CHUNK_PIXELS // max(frame_pixels, 1)))
    for outer in np.ndindex(*leading[:-1]):
        outer = tuple(int(i) for i in outer)
        for start in range(0, leading[-1], chunk):
            stop = min(start + chunk, leading[-1])
            probs = foreground(
                segmenter,
                data[(*outer, slice(start, stop))],
                axes[n_leading - 1 :],
                threshold=threshold,
                sizing=sizing,
                cancel=cancel,
            )
            for offset, frame in enumerate(probs):
                yield (*outer, start + offset), band_share(frame, low, high)
