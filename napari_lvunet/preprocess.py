"""The one preprocessing shared by inference and training.

Whatever the source (a napari layer, a JPEG in a training folder), an image reaches the
network as RGB in [0, 1], normalised with the ImageNet mean and standard deviation the
MobileNetV3 encoder expects. Training (``training.data``) and inference
(``napari_lvunet.inference``) both call these functions, so the model always sees at
inference exactly what it saw in training.

The module imports no PyTorch: :func:`resize` and :func:`normalize` take numpy arrays
(inference on the CPU) or torch tensors (training, GPU inference) and give the same
numbers for both (bilinear with antialiasing, as ``torch.nn.functional.interpolate(...,
antialias=True)`` computes it; the tests hold the two together).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIZE_DIVISOR",
    "TRAIN_SIZE",
    "normalize",
    "resize",
    "resize_matrix",
    "to_unit_rgb",
    "unit_range",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The paper's training resolution (height, width).
TRAIN_SIZE = (256, 256)
#: LV-UNet downsamples seven times and joins its skips by addition: its input height and
#: width must be multiples of this.
SIZE_DIVISOR = 128


def _check_pixels(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"unsupported image dtype {image.dtype}: expected integers or floats")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    return image[..., :3]


def unit_range(image: np.ndarray) -> tuple[float, float] | None:
    """The ``(low, high)`` that :func:`to_unit_rgb` maps to [0, 1] for ``image``.

    ``None`` for uint8 (divided by 255, pixel by pixel). For any other dtype, the image's
    minimum and maximum, computed without a float copy of the whole image, so that a
    caller can then convert it piece by piece (tiles, row blocks) with the same result.

    Raises:
        ValueError: For non-numeric dtypes, or NaN or infinite values.
    """
    if image.dtype == np.uint8:
        return None
    pixels = _check_pixels(image)
    lo, hi = float(pixels.min()), float(pixels.max())
    # min/max propagate NaN; infinities show as themselves: no float copy is needed.
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("image contains NaN or infinite values")
    return lo, hi


def to_unit_rgb(image: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Convert one channel-last image to float32 RGB in [0, 1].

    Args:
        image: ``(H, W)`` grayscale, or ``(H, W, C)`` with C = 1 (grayscale), 3 (RGB) or
            4 (RGBA; alpha is dropped). uint8 is divided by 255, the scale of the
            training images; any other numeric dtype is min-max scaled over this image.
        value_range: The ``(low, high)`` to scale from instead of this image's own
            minimum and maximum: a piece of a larger image passes the whole image's
            :func:`unit_range`. Ignored for uint8.

    Returns:
        ``(H, W, 3)`` float32 array in [0, 1]; grayscale is replicated to three channels.

    Raises:
        ValueError: For other shapes, non-numeric dtypes, or non-finite values.
    """
    pixels = _check_pixels(image)
    if pixels.dtype == np.uint8:
        out = pixels.astype(np.float32) / 255.0
    else:
        lo, hi = unit_range(pixels) if value_range is None else value_range
        if hi > lo:
            # float64 for the subtraction: finite float64 values beyond float32's range
            # (or int64 beyond its precision) scale correctly.
            wide = pixels.astype(np.float64)
            out = ((wide - lo) / (hi - lo)).astype(np.float32)
        else:
            out = np.zeros(pixels.shape, np.float32)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def normalize(batch: Any) -> Any:
    """Apply the ImageNet normalisation to an ``(N, 3, H, W)`` batch in [0, 1].

    Args:
        batch: A torch tensor or a numpy array.

    Raises:
        ValueError: If ``batch`` is not ``(N, 3, H, W)`` (a one-channel batch would
            otherwise broadcast silently to three channels).
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
    if isinstance(batch, np.ndarray):
        mean = np.asarray(IMAGENET_MEAN, batch.dtype).reshape(1, 3, 1, 1)
        std = np.asarray(IMAGENET_STD, batch.dtype).reshape(1, 3, 1, 1)
    else:
        mean = batch.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = batch.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, antialias: bool = True) -> Any:
    """The ``(out_size, in_size)`` sparse matrix of a 1D bilinear resize.

    Half-pixel centres (``align_corners=False``). Downscaling with ``antialias`` widens
    the triangle filter by the scale factor, as torch's and PIL's antialiased bilinear
    do; without it (or when enlarging) it is plain linear interpolation with edge
    clamping, as ``F.interpolate(mode="bilinear")``. Rows sum to 1.
    """
    from scipy.sparse import csr_matrix

    scale = in_size / out_size
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    if antialias and scale > 1.0:
        support = scale
        lo = np.maximum((centres - support + 0.5).astype(np.int64), 0)
        hi = np.minimum((centres + support + 0.5).astype(np.int64), in_size)
        width = int((hi - lo).max())
        taps = lo[:, None] + np.arange(width)[None, :]
        weights = np.clip(1.0 - np.abs((taps + 0.5 - centres[:, None]) / support), 0.0, None)
        weights[taps >= hi[:, None]] = 0.0
        weights /= weights.sum(axis=1, keepdims=True)
        taps = np.minimum(taps, in_size - 1)
    else:
        src = np.maximum(centres - 0.5, 0.0)
        left = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        right = np.minimum(left + 1, in_size - 1)
        frac = src - left
        taps = np.stack([left, right], axis=1)
        weights = np.stack([1.0 - frac, frac], axis=1)
    rows = np.repeat(np.arange(out_size), taps.shape[1])
    matrix = csr_matrix(
        (weights.ravel().astype(np.float32), (rows, taps.ravel())), shape=(out_size, in_size)
    )
    matrix.sum_duplicates()
    return matrix


def _resize_numpy(images: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """``(..., H, W)`` float32 -> ``(..., h, w)``, separably: rows, then columns."""
    h, w = images.shape[-2:]
    lead = images.shape[:-2]
    my = resize_matrix(h, size[0], antialias)
    mx = resize_matrix(w, size[1], antialias)
    flat = images.reshape(-1, h, w)
    out = np.empty((flat.shape[0], size[0], size[1]), np.float32)
    for i, plane in enumerate(flat):
        # (h_out, H) @ (H, W) -> (h_out, W); then (h_out, W) @ (W, w_out)
        out[i] = np.asarray((mx @ (my @ plane).T).T, dtype=np.float32)
    return out.reshape(*lead, size[0], size[1])


def resize(
    images: Any, size: tuple[int, int], *, antialias: bool = True, clamp: bool = True
) -> Any:
    """Resize ``(N, C, H, W)`` (or any ``(..., H, W)``) float images to ``size``.

    Bilinear with antialiasing, clamped to [0, 1]: the one resize that training (cache,
    augmentation, evaluation) and inference (the "resize" sizing policy) share, so that
    an image reaches the network at 256x256 looking the same in both.

    Args:
        images: A numpy array (resized with :func:`resize_matrix`) or a torch tensor
            (``F.interpolate``); the two agree to float32 rounding.
        size: ``(height, width)``.
        antialias: Widen the filter when shrinking (images); off for logits, which are
            resized back as plain bilinear.
        clamp: Clamp to [0, 1] (images); off for logits.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if isinstance(images, np.ndarray):
        out = _resize_numpy(images.astype(np.float32, copy=False), size, antialias)
        return np.clip(out, 0.0, 1.0, out=out) if clamp else out
    import torch.nn.functional as F

    out = F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=antialias
    )
    return out.clamp_(0.0, 1.0) if clamp else out
