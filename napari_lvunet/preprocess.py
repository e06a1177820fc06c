"""The one preprocessing shared by inference and training.

Whatever the source (a napari layer, a JPEG in a training folder), an image reaches the
network as RGB in [0, 1], normalised with the ImageNet mean and standard deviation the
MobileNetV3 encoder expects. Training (``training.data``) and inference
(``napari_lvunet.inference``) both call these functions, so the model always sees at
inference exactly what it saw in training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_SIZE", "normalize", "resize", "to_unit_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The paper's training resolution (height, width).
TRAIN_SIZE = (256, 256)


def to_unit_rgb(image: np.ndarray) -> np.ndarray:
    """Convert one channel-last image to float32 RGB in [0, 1].

    Args:
        image: ``(H, W)`` grayscale, or ``(H, W, C)`` with C = 1 (grayscale), 3 (RGB) or
            4 (RGBA; alpha is dropped). uint8 is divided by 255, the scale of the
            training images; any other numeric dtype is min-max scaled over this image.

    Returns:
        ``(H, W, 3)`` float32 array in [0, 1]; grayscale is replicated to three channels.

    Raises:
        ValueError: For other shapes, non-numeric dtypes, or non-finite values.
    """
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"unsupported image dtype {image.dtype}: expected integers or floats")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint8:
        out = image.astype(np.float32) / 255.0
    else:
        out = image.astype(np.float32)
        if not np.isfinite(out).all():
            raise ValueError("image contains NaN or infinite values")
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """Apply the ImageNet normalisation to an ``(N, 3, H, W)`` batch in [0, 1].

    Raises:
        ValueError: If ``batch`` is not ``(N, 3, H, W)`` (a one-channel batch would
            otherwise broadcast silently to three channels).
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
    mean = batch.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = batch.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` float images in [0, 1] to ``size`` (height, width).

    Bilinear with antialiasing, clamped to [0, 1]: the one resize that training (cache,
    augmentation, evaluation) and inference (the "resize" sizing policy) share, so that
    an image reaches the network at 256x256 looking the same in both.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(
        images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True
    ).clamp_(0.0, 1.0)
