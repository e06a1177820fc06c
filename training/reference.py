"""The shipped reference set, and Dice scoring of weights files without PyTorch.

The package ships two small, fixed sets of Kvasir-SEG images with their masks in
``sample_data/reference/`` (see the README there for the sources and the licence):

* ``images/`` + ``masks/``: the **reference** set, Kvasir-SEG *test* images that no
  bundled model was trained on. A fine-tune's result is scored on it before and after
  (:func:`score_reference`): a drop says the model is forgetting what it knew.
* ``replay/images/`` + ``replay/masks/``: the **replay** set, Kvasir-SEG *train* images
  that the bundled model learnt from. Fine-tuning mixes some of them into every batch
  (see :mod:`training.adapt`), which keeps the model from forgetting; they are never
  scored, so the reference score stays an honest check.

Scoring runs the inference engine (:mod:`napari_lvunet.inference`, ONNX Runtime on the
CPU), so the napari widget can show it in a process without torch: this module imports
neither torch nor the rest of :mod:`training`. The Dice of an image is computed at its
own resolution with the engine's ``resize`` sizing (what the widget does at the training
size), and the score is the per-image mean, as :mod:`training.metrics` averages.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_lvunet.cancel import CancelToken, check_cancelled
from napari_lvunet.io import read_image

__all__ = [
    "REFERENCE_DIR",
    "ReferencePair",
    "Score",
    "binary_dice",
    "list_pairs",
    "reference_pairs",
    "replay_pairs",
    "score_pairs",
    "score_reference",
]

#: Where the package keeps the reference and replay sets.
REFERENCE_DIR = (
    Path(__file__).resolve().parent.parent / "napari_lvunet" / "sample_data" / "reference"
)
_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class ReferencePair:
    """One image and its mask file, matched by stem."""

    stem: str
    image: Path
    mask: Path


@dataclass
class Score:
    """The Dice of one weights file on a set of pairs.

    Attributes:
        dice: Per-image mean Dice.
        per_image: Dice by stem.
    """

    dice: float
    per_image: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.per_image)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.per_image.values()) if self.per_image else math.nan


def _by_stem(folder: Path) -> dict[str, Path]:
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _SUFFIXES
    }


def list_pairs(folder: str | Path) -> list[ReferencePair]:
    """The image/mask pairs of a folder with ``images/`` and ``masks/``, sorted by stem.

    Raises:
        ValueError: If a subfolder is missing or empty, or an image has no mask.
    """
    folder = Path(folder)
    for sub in ("images", "masks"):
        if not (folder / sub).is_dir():
            raise ValueError(f"{folder} has no {sub}/ folder")
    images, masks = _by_stem(folder / "images"), _by_stem(folder / "masks")
    if not images:
        raise ValueError(f"no images in {folder / 'images'}")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in {folder / 'images'} have no mask: {missing[:5]}"
        )
    return [ReferencePair(s, images[s], masks[s]) for s in sorted(images)]


def reference_pairs(folder: str | Path | None = None) -> list[ReferencePair]:
    """The shipped reference set (Kvasir-SEG test images), or the set in ``folder``."""
    return list_pairs(REFERENCE_DIR if folder is None else folder)


def replay_pairs(folder: str | Path | None = None) -> list[ReferencePair]:
    """The shipped replay set (Kvasir-SEG train images), or the set in ``folder``."""
    return list_pairs(REFERENCE_DIR / "replay" if folder is None else folder)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a boolean array: > 0, or >= 128 for 8-bit JPEG masks (noise)."""
    path = Path(path)
    mask = read_image(path, mask=True)
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=-1)
    if path.suffix.lower() in (".jpg", ".jpeg") and mask.dtype == np.uint8 and mask.max() > 1:
        return mask >= 128
    return mask > 0


def binary_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (:mod:`training.metrics`)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != mask shape {truth.shape}")
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & truth).sum()) / total


def score_pairs(
    weights: Any,
    pairs: Sequence[ReferencePair],
    *,
    threshold: float = 0.5,
    sizing: str = "resize",
    device: str = "cpu",
    pool: Any = None,
    progress: Callable[[int, int], object] | None = None,
    cancel: CancelToken | None = None,
) -> Score:
    """Per-image mean Dice of ``weights`` on ``pairs``, through the inference engine.

    Args:
        weights: A registry name or a ``.safetensors`` path (anything
            :meth:`~napari_lvunet.inference.SegmenterPool.get` takes).
        pairs: The images and masks (:func:`list_pairs`, :func:`reference_pairs`).
        threshold: Foreground probability threshold.
        sizing: The engine's sizing (``resize`` is how the model was trained).
        device: The engine's device; ``cpu`` runs ONNX Runtime, without torch.
        pool: A :class:`~napari_lvunet.inference.SegmenterPool`; default the shared one.
        progress: Called as ``progress(done, total)`` after each image.
        cancel: Checked before each image.

    Returns:
        The mean Dice and the Dice of each image.

    Raises:
        ValueError: With no pairs, or an image and mask of different sizes.
        napari_lvunet.weights.WeightsError: For unusable weights.
        napari_lvunet.cancel.Cancelled: When ``cancel`` was set.
    """
    from napari_lvunet.inference import default_pool

    if not pairs:
        raise ValueError("no image/mask pairs to score")
    segmenter = (pool or default_pool()).get(weights, device=device)
    per_image: dict[str, float] = {}
    for i, pair in enumerate(pairs):
        check_cancelled(cancel, message="cancelled while scoring")
        image = read_image(pair.image)
        truth = read_mask(pair.mask)
        if image.shape[:2] != truth.shape:
            raise ValueError(
                f"mask {pair.mask.name} is {truth.shape[1]}x{truth.shape[0]} px but image "
                f"{pair.image.name} is {image.shape[1]}x{image.shape[0]} px"
            )
        axes = "YXC" if image.ndim == 3 else "YX"
        labels = segmenter.segment(image, axes=axes, threshold=threshold, sizing=sizing)
        per_image[pair.stem] = binary_dice(np.asarray(labels) > 0, truth)
        if progress is not None:
            progress(i + 1, len(pairs))
    return Score(statistics.fmean(per_image.values()), per_image)


def score_reference(weights: Any, **kwargs: Any) -> Score:
    """Per-image mean Dice of ``weights`` on the shipped reference set (see
    :func:`score_pairs` for the keyword arguments)."""
    return score_pairs(weights, reference_pairs(), **kwargs)
