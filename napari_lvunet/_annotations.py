"""The widget's logic that needs no Qt: axes, slice bookkeeping, saving corrections.

Everything here works on numpy arrays and paths, so it is tested without a display; the
dock widget (``_widget.py``) only gathers the user's choices and calls these functions.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .io import atomic_write
from .preprocess import to_unit_rgb

__all__ = [
    "RESULT_COLOURS",
    "SliceIndex",
    "edited_slices",
    "finetune_command",
    "iter_slices",
    "layer_axes",
    "next_colour",
    "safe_stem",
    "save_for_training",
    "slice_digest",
    "slice_stem",
]

logger = logging.getLogger(__name__)

#: Position of one 2D slice in a stack: its indices along the leading (non-YX) axes;
#: ``()`` for a plain 2D image.
SliceIndex = tuple[int, ...]

_LEADING_AXES = "TZ"

#: Colours of successive results, chosen to stand out on red and pink mucosa (no reds,
#: no pinks) and from each other: the first result is cyan, the next yellow, and so on.
RESULT_COLOURS = ("#00ffff", "#ffff00", "#00ff00", "#4da6ff", "#ffffff", "#ff8c00")


def next_colour(used: Iterable[str]) -> str:
    """The first result colour no other open result uses (cycling when all are taken)."""
    taken = [c.lower() for c in used]
    for colour in RESULT_COLOURS:
        if colour not in taken:
            return colour
    return RESULT_COLOURS[len(taken) % len(RESULT_COLOURS)]


def slice_digest(labels2d: np.ndarray) -> bytes:
    """A digest of one labels slice's values: tells a correction from the model's result.

    Only foreground matters for training (``save_for_training`` writes ``labels > 0``),
    so a relabelled instance is not a change, a painted or erased pixel is.
    """
    mask = np.packbits(np.asarray(labels2d) > 0)
    return hashlib.blake2b(mask.tobytes(), digest_size=16).digest()


def layer_axes(ndim: int, rgb: bool) -> str:
    """Napari-style axis letters for an image layer's data.

    Args:
        ndim: The layer's number of spatial dimensions (napari's ``layer.ndim``, which does
            not count the colour channel of an RGB layer): 2, 3 or 4.
        rgb: Whether the last data axis holds colour channels.

    Returns:
        e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"ZYXC"``, ``"TZYX"``.

    Raises:
        ValueError: For fewer than 2 or more than 4 spatial dimensions.
    """
    if not 2 <= ndim <= 4:
        raise ValueError(
            f"unsupported image with {ndim} spatial dimensions: LV-UNet segments 2D images "
            "and stacks of them (2 to 4 dimensions, e.g. YX, ZYX, TZYX)"
        )
    return _LEADING_AXES[2 - (ndim - 2) :] + "YX" + ("C" if rgb else "")


def iter_slices(leading_shape: Sequence[int]) -> Iterable[SliceIndex]:
    """All slice indices of a stack with the given leading shape, in C order."""
    return (tuple(int(i) for i in idx) for idx in np.ndindex(*leading_shape))


def edited_slices(history_item: Iterable[Any], n_leading: int) -> set[SliceIndex]:
    """The slices touched by one napari Labels edit (brush, eraser, fill, polygon).

    napari's ``Labels.events.paint`` carries the undo-history item of the edit: a list of
    atoms, each either a masked atom with a ``slice_key`` (a bounding box of slices) or an
    ``(indices, old_values, new_values)`` tuple of fancy indices.

    Args:
        history_item: The ``value`` of a ``Labels.events.paint`` event.
        n_leading: Number of leading (stack) axes of the labels data; 0 for 2D.

    Returns:
        The set of edited slice indices (``{()}`` for any edit of a 2D layer).
    """
    touched: set[SliceIndex] = set()
    for atom in history_item:
        slice_key = getattr(atom, "slice_key", None)
        if slice_key is not None:
            ranges = [range(s.start or 0, s.stop) for s in slice_key[:n_leading]]
            touched.update(itertools.product(*ranges))
        else:
            indices = atom[0]
            if n_leading == 0:
                touched.add(())
                continue
            lead = np.stack([np.asarray(ix).ravel() for ix in indices[:n_leading]], axis=1)
            touched.update(tuple(int(v) for v in row) for row in np.unique(lead, axis=0))
    return touched


def safe_stem(name: str) -> str:
    """A file-name stem from a layer name: letters, digits, ``-`` and ``_`` only."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return stem or "image"


def slice_stem(stem: str, index: SliceIndex) -> str:
    """The stem of one slice's pair, e.g. ``scan_z003`` or ``movie_t001_z003``."""
    axes = _LEADING_AXES[len(_LEADING_AXES) - len(index) :]
    return stem + "".join(f"_{ax.lower()}{i:03d}" for ax, i in zip(axes, index, strict=True))


def finetune_command(data_dir: str | Path, weights: str | Path) -> str:
    """The shell command that fine-tunes ``weights`` on a saved corrections folder."""
    return (
        f"python -m training.finetune --data {shlex.quote(str(data_dir))} "
        f"--weights {shlex.quote(str(weights))}"
    )


def _to_png_array(image2d: np.ndarray) -> np.ndarray:
    """The pixels of one slice as a uint8 PNG array the training loader reads back.

    uint8 data is written unchanged (alpha dropped), so a training image is bit-identical
    to what was segmented; other dtypes go through the shared preprocessing's scaling.
    """
    if image2d.dtype == np.uint8:
        return image2d[..., :3] if image2d.ndim == 3 else image2d
    unit = to_unit_rgb(image2d)
    if image2d.ndim == 2 or image2d.shape[-1] == 1:
        unit = unit[..., 0]
    return np.round(unit * 255.0).astype(np.uint8)


def _free_stem(images_dir: Path, masks_dir: Path, stem: str, slice_ids: list[SliceIndex]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... : the first with no existing file of any pair."""

    def taken(candidate: str) -> bool:
        for index in slice_ids:
            name = slice_stem(candidate, index)
            for folder in (images_dir, masks_dir):
                if any(folder.glob(f"{glob.escape(name)}.*")):
                    return True
        return False

    candidate, n = stem, 1
    while taken(candidate):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _write_png_exclusive(path: Path, array: np.ndarray) -> None:
    # overwrite=False: refuse to replace a file that appeared since the name was chosen;
    # the atomic write also means a crash never leaves half a PNG in the training data.
    atomic_write(path, lambda fh: Image.fromarray(array).save(fh, format="PNG"), overwrite=False)


def save_for_training(
    image: np.ndarray,
    labels: np.ndarray,
    data_dir: str | Path,
    stem: str,
    *,
    rgb: bool,
    slices: Iterable[SliceIndex] | None = None,
) -> list[tuple[Path, Path]]:
    """Write image/mask pairs in the ``images/`` + ``masks/`` layout ``training`` reads.

    Each 2D slice becomes ``images/<stem>[_zNNN].png`` and ``masks/<stem>[_zNNN].png``
    (mask: 255 where the label is non-zero, else 0). Existing files are never replaced:
    if any pair name is taken, the whole batch gets the next free stem (``<stem>-2``...).

    Args:
        image: Image layer data, ``(..., H, W)`` or ``(..., H, W, C)`` when ``rgb``.
        labels: Labels layer data, ``(..., H, W)``, same leading and YX shape as ``image``.
        data_dir: Dataset folder; ``images/`` and ``masks/`` are created inside it.
        stem: Base file name (sanitised with :func:`safe_stem`).
        rgb: Whether the last axis of ``image`` is colour.
        slices: Which slices to write; all of them when None.

    Returns:
        The ``(image_path, mask_path)`` pairs written, in order.

    Raises:
        ValueError: If the shapes do not match or no slice is selected.
    """
    spatial_shape = image.shape[:-1] if rgb else image.shape
    if tuple(labels.shape) != tuple(spatial_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the image's "
            f"{tuple(spatial_shape)}: save the Labels layer made from this image"
        )
    n_leading = len(spatial_shape) - 2
    slice_ids = list(iter_slices(spatial_shape[:n_leading]) if slices is None else slices)
    if not slice_ids:
        raise ValueError("no slice selected to save")
    for index in slice_ids:
        if len(index) != n_leading or any(
            not 0 <= i < n for i, n in zip(index, spatial_shape, strict=False)
        ):
            raise ValueError(f"slice {index} is outside the stack {spatial_shape[:n_leading]}")

    root = Path(data_dir)
    images_dir, masks_dir = root / "images", root / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    base = _free_stem(images_dir, masks_dir, safe_stem(stem), slice_ids)
    if base != safe_stem(stem):
        logger.info("pairs named %r exist already in %s; writing %r", stem, root, base)

    written: list[tuple[Path, Path]] = []
    for index in slice_ids:
        name = slice_stem(base, index)
        image_path, mask_path = images_dir / f"{name}.png", masks_dir / f"{name}.png"
        mask = (np.asarray(labels[index]) > 0).astype(np.uint8) * 255
        _write_png_exclusive(image_path, _to_png_array(np.asarray(image[index])))
        try:
            _write_png_exclusive(mask_path, mask)
        except BaseException:
            image_path.unlink()  # never leave an image without its mask
            raise
        written.append((image_path, mask_path))
    logger.info("saved %d training pair(s) to %s", len(written), root)
    return written
