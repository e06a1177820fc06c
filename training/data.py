"""Folder datasets for training: pairs, splits, a decoded-once cache, tensor augmentation.

A dataset is a folder with ``images/`` and ``masks/``; an image and its mask share a file
stem (``images/case01.jpg`` + ``masks/case01.png``), in any of png / jpg / tif. An
optional ``splits.json`` holds ``train`` / ``val`` / ``test`` stem lists; without it a
seeded 80/20 train/val split is drawn.

Every image goes through :func:`napari_lvunet.preprocess.to_unit_rgb` exactly as at
inference, is resized once and cached as uint8, so an epoch never decodes a file again.
Training images are cached a little larger than the training size so that the random
scale/crop has margin; at crop scale 1 an augmented image is the whole image resized to
the training size, which is what inference's resize policy feeds the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_lvunet.cancel import CancelToken, check_cancelled
from napari_lvunet.io import read_image
from napari_lvunet.preprocess import resize, to_unit_rgb

__all__ = [
    "IMAGE_SUFFIXES",
    "Augment",
    "CachedSegmentationDataset",
    "DatasetError",
    "Pair",
    "binarize_mask",
    "find_pairs",
    "load_pair",
    "read_array",
    "resize_mask",
    "resolve_splits",
    "split_digest",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_JPEG_SUFFIXES = (".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset folder cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Pair:
    """One image and its mask, matched by file stem."""

    stem: str
    image: Path
    mask: Path


def _files_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.suffix.lower() not in IMAGE_SUFFIXES
        ):
            continue
        if path.stem in found:
            raise DatasetError(
                f"two files in {folder} share the stem {path.stem!r} "
                f"({found[path.stem].name}, {path.name}): keep one"
            )
        found[path.stem] = path
    return found


def find_pairs(root: str | Path) -> list[Pair]:
    """List the image/mask pairs of a dataset folder, sorted by stem.

    Args:
        root: Folder holding ``images/`` and ``masks/``.

    Returns:
        One :class:`Pair` per image.

    Raises:
        DatasetError: If a folder is missing, holds no images, or an image has no mask.
    """
    root = Path(root)
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DatasetError(
                f"{root} has no {sub}/ folder (expected {root}/images and {root}/masks)"
            )
    images = _files_by_stem(root / "images")
    masks = _files_by_stem(root / "masks")
    if not images:
        raise DatasetError(f"no images (png/jpg/tif) in {root / 'images'}")
    missing = sorted(set(images) - set(masks))
    if missing:
        shown = ", ".join(images[s].name for s in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"{len(missing)} image(s) have no mask with the same stem in {root / 'masks'}: "
            f"{shown}{more}"
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        logger.warning("%d mask(s) without an image are ignored: %s", len(orphans), orphans[:5])
    return [Pair(s, images[s], masks[s]) for s in sorted(images)]


def resolve_splits(
    root: str | Path, stems: Sequence[str], *, seed: int = 0, val_fraction: float = 0.2
) -> dict[str, list[str]]:
    """Return the ``train`` / ``val`` / ``test`` stem lists of a dataset.

    ``splits.json`` in ``root`` is used when present; otherwise all stems are split at
    random (seeded) into train and ``val_fraction`` validation, with an empty test split.

    Args:
        root: The dataset folder.
        stems: The stems that have image/mask pairs.
        seed: Seed of the random split.
        val_fraction: Share of the images held out for validation without splits.json.

    Returns:
        A dict with the keys ``train``, ``val`` and ``test``.

    Raises:
        DatasetError: If splits.json is malformed, names stems that have no pair, or
            the split leaves no training or validation image.
    """
    path = Path(root) / "splits.json"
    available = set(stems)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot read {path}: {err}") from err
        if not isinstance(raw, dict) or not all(
            isinstance(raw.get(k, []), list) for k in ("train", "val", "test")
        ):
            raise DatasetError(f"{path} must be a JSON object of stem lists: train, val, test")
        splits = {k: [str(s) for s in raw.get(k, [])] for k in ("train", "val", "test")}
        named = [s for k in splits for s in splits[k]]
        missing = sorted({s for s in named if s not in available})
        if missing:
            raise DatasetError(
                f"{path} names {len(missing)} stem(s) with no image/mask pair: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
    else:
        order = sorted(available)
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_fraction * len(order))) if len(order) > 1 else 0
        splits = {"train": sorted(order[n_val:]), "val": sorted(order[:n_val]), "test": []}
    if not splits["train"]:
        raise DatasetError(f"the train split of {root} is empty")
    if not splits["val"]:
        raise DatasetError(
            f"the val split of {root} is empty: add images (at least 2) or a val list "
            "to splits.json"
        )
    return splits


def split_digest(splits: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """Counts and SHA-256 of each split's stems: a compact record of which images it holds.

    Exported weights store this instead of the stem lists; the same digest of a
    dataset's split (:func:`resolve_splits`) shows whether it is the split a model was
    trained and selected on.

    Args:
        splits: Stem lists by split name.

    Returns:
        ``{"counts": {split: n}, "sha256": {split: hex digest of the sorted stems, one
        per line}}``.
    """
    return {
        "counts": {k: len(v) for k, v in splits.items()},
        "sha256": {
            k: hashlib.sha256("\n".join(sorted(v)).encode("utf-8")).hexdigest()
            for k, v in splits.items()
        },
    }


def read_array(path: Path, *, mask: bool = False) -> np.ndarray:
    """Read an image file into a numpy array (2-D, or channel-last 3-D).

    Args:
        path: A png, jpg or tif file.
        mask: Read a mask: a palette image gives its indices (label values), where an
            image gives its colours.

    Raises:
        DatasetError: If the file cannot be decoded or is not a 2-D image.
    """
    try:
        array = read_image(path, mask=mask)
    except Exception as err:  # any decoder failure is the file's fault: say which file
        raise DatasetError(f"cannot read {path}: {err}") from err
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first TIFF
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise DatasetError(f"{path} is not a 2-D image (array shape {array.shape})")
    return array


def binarize_mask(mask: np.ndarray, *, lossy: bool = False) -> np.ndarray:
    """Turn a mask array into a boolean foreground map.

    Any value > 0 is foreground ({0, 1}, {0, 255} and label images). JPEG masks
    (``lossy=True``) carry compression noise around 0 and 255; with values above 1 they
    are binarised at 128 instead (Kvasir-SEG's masks).

    Args:
        mask: ``(H, W)`` or ``(H, W, C)`` array; channels are combined by maximum.
        lossy: Whether the mask came from a lossy (JPEG) file.

    Returns:
        ``(H, W)`` bool array.
    """
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=-1)
    if lossy and mask.dtype == np.uint8 and mask.max() > 1:
        return mask >= 128
    return mask > 0


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair: the image through ``to_unit_rgb`` and the binarised mask.

    Returns:
        ``(H, W, 3)`` float32 image in [0, 1] and ``(H, W)`` bool mask.

    Raises:
        DatasetError: If a file is unreadable, the image is not usable, or the sizes differ.
    """
    image = read_array(pair.image)
    mask = read_array(pair.mask, mask=True)
    if image.shape[:2] != mask.shape[:2]:
        raise DatasetError(
            f"mask {pair.mask.name} is {mask.shape[1]}x{mask.shape[0]} px but image "
            f"{pair.image.name} is {image.shape[1]}x{image.shape[0]} px (width x height)"
        )
    try:
        rgb = to_unit_rgb(image)
    except ValueError as err:
        raise DatasetError(f"cannot use {pair.image}: {err}") from err
    return rgb, binarize_mask(mask, lossy=pair.mask.suffix.lower() in _JPEG_SUFFIXES)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, 1, H, W)`` {0, 1} float masks; the result is {0, 1} again."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return (resize(mask, size) >= 0.5).to(mask.dtype)


@dataclass(frozen=True)
class Augment:
    """Random augmentation of training samples, applied to cached tensors.

    Attributes:
        min_scale: Smallest crop area as a fraction of the cached image (random scale/crop).
        max_aspect: Crops have an aspect ratio in [1/max_aspect, max_aspect].
        flips: Random horizontal and vertical flips.
        rot90: Random multiples of 90 degrees (square training sizes only).
        color: Strength of the brightness, contrast and saturation jitter (0 = off).
    """

    min_scale: float = 0.5
    max_aspect: float = 4 / 3
    flips: bool = True
    rot90: bool = True
    color: float = 0.15

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one ``(3, H, W)`` uint8 image and ``(1, H, W)`` uint8 mask.

        Returns:
            ``(3, *size)`` float image in [0, 1] and ``(1, *size)`` {0, 1} float mask.
        """

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=gen))

        h, w = image.shape[-2:]
        area = uniform(self.min_scale, 1.0) * h * w
        aspect = math.exp(uniform(-math.log(self.max_aspect), math.log(self.max_aspect)))
        ch = min(h, max(8, round(math.sqrt(area / aspect))))
        cw = min(w, max(8, round(math.sqrt(area * aspect))))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        img = image[None, :, top : top + ch, left : left + cw].float().div_(255.0)
        msk = mask[None, :, top : top + ch, left : left + cw].float()
        img = resize(img, size)[0]
        msk = resize_mask(msk, size)[0]
        if self.flips:
            if float(torch.rand((), generator=gen)) < 0.5:
                img, msk = img.flip(-1), msk.flip(-1)
            if float(torch.rand((), generator=gen)) < 0.5:
                img, msk = img.flip(-2), msk.flip(-2)
        if self.rot90 and size[0] == size[1]:
            k = int(torch.randint(0, 4, (), generator=gen))
            if k:
                img, msk = img.rot90(k, (-2, -1)), msk.rot90(k, (-2, -1))
        if self.color > 0:
            img = self._jitter(img, gen)
        return img.contiguous(), msk.contiguous()

    def _jitter(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Mild photometric jitter only: hue is left alone because colour carries meaning
        # in medical images (a reddish polyp should stay reddish).
        s = self.color
        factors = 1.0 + s * (2.0 * torch.rand(3, generator=gen) - 1.0)
        img = img * factors[0]  # brightness
        gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        img = (img - gray.mean()) * factors[1] + gray.mean()  # contrast
        gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        img = (img - gray) * factors[2] + gray  # saturation
        return img.clamp_(0.0, 1.0)


class CachedSegmentationDataset(Dataset):
    """Image/mask pairs decoded and resized once, held in memory as uint8.

    Without ``augment`` the images are cached at ``size`` and returned as they are (for
    validation). With ``augment`` they are cached at ``cache_size`` and every item is a
    fresh random augmentation, a pure function of ``(seed, epoch, index)``: the same on
    a resumed run, with any number of loader workers, on any DDP rank layout.

    Args:
        pairs: The pairs to load.
        size: Output (height, width) of every item.
        augment: Augmentation for training, or ``None``.
        cache_size: Cached (height, width) when augmenting; defaults to ``size`` * 9/8.
        seed: Seed of the augmentation.
        cancel: Checked before each file is decoded (see :mod:`napari_lvunet.cancel`).

    Raises:
        DatasetError: If any pair cannot be loaded (see :func:`load_pair`).
        Cancelled: If ``cancel`` was set.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        size: tuple[int, int],
        *,
        augment: Augment | None = None,
        cache_size: tuple[int, int] | None = None,
        seed: int = 0,
        cancel: CancelToken | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.size = (int(size[0]), int(size[1]))
        self.augment = augment
        if augment is None:
            cache_size = self.size
        elif cache_size is None:
            cache_size = (math.ceil(self.size[0] * 9 / 8), math.ceil(self.size[1] * 9 / 8))
        self.cache_size = (int(cache_size[0]), int(cache_size[1]))
        self.seed = seed
        self.epoch = 0
        n, (h, w) = len(self.pairs), self.cache_size
        self.images = torch.empty((n, 3, h, w), dtype=torch.uint8)
        self.masks = torch.empty((n, 1, h, w), dtype=torch.uint8)
        for i, pair in enumerate(self.pairs):
            check_cancelled(cancel, message="cancelled while reading the images")
            rgb, mask = load_pair(pair)
            img = resize(torch.from_numpy(rgb).permute(2, 0, 1)[None], self.cache_size)
            self.images[i] = img[0].clamp_(0, 1).mul_(255).round_().to(torch.uint8)
            msk = torch.from_numpy(mask)[None, None].float()
            self.masks[i] = resize_mask(msk, self.cache_size)[0].to(torch.uint8)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a ``(3, H, W)`` float image in [0, 1] and a ``(1, H, W)`` {0, 1} mask."""
        if self.augment is None:
            return self.images[index].float().div_(255.0), self.masks[index].float()
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**63)
        )
        return self.augment(self.images[index], self.masks[index], self.size, gen)
