"""Which dimension of an image is what: ``T Z Y X C``.

``axes`` names an image's dimensions with the letters ``T Z Y X C`` (napari's order is
e.g. ``"TZYXC"``; any order is accepted, each letter at most once, ``Y`` and ``X``
required). Without ``axes`` the layout is inferred:

* 2D: ``YX``.
* 3D: ``YXC`` if the last dimension is 1, 3 or 4 (grayscale, RGB, RGBA), else ``ZYX``.
  A small *first* dimension (3 or 4) is ambiguous (a 3-slice stack or channel-first
  RGB): it is read as a stack; pass ``axes="CYX"`` for channel-first colour.
* 4D: ``ZYXC`` if the last dimension is 1, 3 or 4, else ``TZYX``.
* 5D: ``TZYXC`` if the last dimension is 1, 3 or 4; anything else is refused.

An inference that would make frames narrower than :data:`MIN_INFERRED_SIDE` pixels (an
``(H, W, 2)`` two-channel image read as a stack of ``W x 2`` frames, say) is refused
with a message asking for explicit axes: a silent guess there is always wrong.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "CHANNEL_SIZES",
    "MIN_INFERRED_SIDE",
    "STACK_AXES",
    "check_axes",
    "check_image",
    "infer_axes",
]

AXIS_LETTERS = "TZYXC"
#: Canonical order of the leading (stack) axes.
STACK_AXES = "TZ"
#: Channel counts the engine reads: grayscale, RGB, RGBA.
CHANNEL_SIZES = (1, 3, 4)
#: Inferred frames must be at least this wide and high; below it, ask for axes.
MIN_INFERRED_SIDE = 16


def infer_axes(shape: tuple[int, ...]) -> str:
    """The axes string :meth:`Segmenter.segment` assumes for an image of ``shape``.

    See the module docstring for the rule.

    Args:
        shape: The image's shape.

    Returns:
        An axes string such as ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"ZYXC"``, ``"TZYX"``.

    Raises:
        ValueError: For fewer than 2 or more than 4 spatial/stack dimensions, or a shape
            whose reading is ambiguous (frames narrower than 16 px, e.g. ``(H, W, 2)``).
    """
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"an image needs at least 2 dimensions (Y, X), got shape {shape}")
    channel_last = shape[-1] in CHANNEL_SIZES
    if ndim == 2:
        axes = "YX"
    elif ndim == 3:
        axes = "YXC" if channel_last else "ZYX"
    elif ndim == 4:
        axes = "ZYXC" if channel_last else "TZYX"
    elif ndim == 5 and channel_last:
        axes = "TZYXC"
    else:
        raise ValueError(
            f"image of shape {shape} has more than 4 spatial/stack dimensions "
            "(at most T, Z, Y, X plus a channel axis)"
        )
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    if ndim > 2 and min(height, width) < MIN_INFERRED_SIDE:
        raise ValueError(
            f"cannot tell what the axes of an image of shape {shape} are: read as "
            f"{axes!r} its frames would be {height} x {width} pixels. If the last axis "
            f"holds {shape[-1]} channels, keep 1, 3 or 4 of them (or pick one); otherwise "
            "give the axes explicitly (e.g. 'ZYX' or 'YXC')"
        )
    return axes


def check_axes(axes: str, shape: tuple[int, ...]) -> str:
    """Validate an explicit axes string for ``shape``; return it upper-cased."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes!r} has {len(axes)} letters but the image has shape {shape}")
    bad = sorted(set(axes) - set(AXIS_LETTERS))
    if bad:
        raise ValueError(f"axes {axes!r}: unknown letters {bad}; use T, Z, Y, X and C")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} repeats a letter")
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes!r} must contain Y and X")
    if "C" in axes and shape[axes.index("C")] not in CHANNEL_SIZES:
        raise ValueError(
            f"the channel axis has {shape[axes.index('C')]} channels; expected 1 (grayscale), "
            "3 (RGB) or 4 (RGBA)"
        )
    return axes


def check_image(image: Any) -> Any:
    """Validate everything that can be checked without reading pixels.

    Returns ``image`` itself when it is array-like (numpy, dask, a lazy video), else
    ``np.asarray(image)``.
    """
    if not (hasattr(image, "shape") and hasattr(image, "dtype") and hasattr(image, "ndim")):
        image = np.asarray(image)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 2 and math.prod(shape) != 0:
        raise ValueError(f"an image needs at least 2 dimensions (Y, X), got shape {shape}")
    if math.prod(shape) == 0:
        what = "has a zero-size axis" if len(shape) >= 2 else "is empty"
        raise ValueError(f"image {what}: shape {shape}")
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "uif":
        raise ValueError(
            f"unsupported image dtype {dtype}: expected integers or floats "
            "(bool, complex, object and text arrays cannot be segmented)"
        )
    return image
