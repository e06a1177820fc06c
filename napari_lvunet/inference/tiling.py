"""Geometry: how a frame becomes network inputs, and how outputs become a frame again.

Three sizings:

* ``"resize"``: the frame is resized to the training size (one input), as the model saw
  its training images; the logits are resized back.
* ``"tiles"``: overlapping tiles blended with smooth weights, at the scale the model was
  trained at: the frame is first scaled so that the weights' ``source_size`` (the typical
  source image that training mapped whole to the training size) maps to the training
  size, and the probabilities are scaled back. For images wider than one field of view
  (mosaics, whole slides), whose objects have the pixel size of the training images.
  Weights that do not record ``source_size`` tile at native resolution.
* ``"auto"``: ``"resize"`` for any frame up to twice the largest training source image
  (``source_size_max``) in height and width: that is one field of view, at whatever
  resolution, as every training image was. Larger frames take ``"tiles"``.

Why not tile every large frame at the trained scale: a frame that is one field of view at
a higher resolution (an HD endoscope, an upscaled image) shows its objects larger in
pixels, and tiles at the trained pixel scale then see them several times larger than any
the model learnt. Measured on the sample polyp upscaled 2x: resize Dice 0.958, trained-scale
tiles 0.73; on a 3 x 3 mosaic of it at native resolution: resize 0.64, trained-scale tiles
0.955, native tiles 0.78.

Large frames are converted, resized and thresholded in row blocks, so that no float32 copy
of a whole large image is ever made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..preprocess import SIZE_DIVISOR, resize_matrix, to_unit_rgb, unit_range
from .postprocess import activate, to_labels

__all__ = ["SIZINGS", "Frame", "Item", "ResizeGeometry", "TileGeometry", "finish", "plan"]

Sizing = Literal["auto", "resize", "tiles"]
SIZINGS = ("auto", "resize", "tiles")
# Under "auto", frames up to this factor of the largest training image (each side) are
# one field of view and resized whole.
_AUTO_RESIZE_FACTOR = 2.0
# Rows converted or resized at once: about 64 MB of float32 RGB.
_BLOCK_BYTES = 64 * 1024**2


@dataclass
class Frame:
    """One 2D frame in flight: its pixels, pending tiles and accumulator."""

    index: tuple[int, ...]
    where: str  # "Z=3, T=1" for error messages; "" for a single image
    raw: np.ndarray | None  # (H, W[, C]) as stored; dropped once all inputs are queued
    height: int
    width: int
    pending: int = 0
    acc: np.ndarray | None = None  # (C, h, w) blended probabilities, in working space
    value_range: tuple[float, float] | None = None

    def _named(self, err: ValueError) -> ValueError:
        return ValueError(f"frame {self.where}: {err}") if self.where else err

    def prepare(self) -> None:
        """Find the frame's value range (min-max scaling) once, without a float copy."""
        assert self.raw is not None
        try:
            self.value_range = unit_range(self.raw)
        except ValueError as err:
            raise self._named(err) from err

    def unit(self, region: tuple[slice, slice] | None = None) -> np.ndarray:
        """``to_unit_rgb`` of the frame or a region of it, scaled as the whole frame."""
        assert self.raw is not None
        try:
            return to_unit_rgb(self.raw if region is None else self.raw[region], self.value_range)
        except ValueError as err:
            raise self._named(err) from err


@dataclass
class Item:
    """One network input: a resized frame or a tile, with where its output goes."""

    frame: Frame
    pixels: np.ndarray  # (3, h, w) float32 in [0, 1]
    y: int = 0
    x: int = 0


def _rows_per_block(width: int) -> int:
    return max(1, _BLOCK_BYTES // max(1, width * 3 * 4))


def resize_frame(frame: Frame, size: tuple[int, int]) -> np.ndarray:
    """The frame as ``(h, w, 3)`` RGB in [0, 1] at ``size``, read in row blocks.

    The stored pixels are resized first and scaled to [0, 1] after: the scaling
    (``/ 255``, or min-max) is affine and every resize weight row sums to 1, so the order
    does not change the result, and no float copy of a large frame is ever made. Each
    row block is resized along its rows, then added into the output: memory is the
    output plus one block, whatever the frame's size.
    """
    height, width = frame.height, frame.width
    if (height, width) == tuple(size):
        return frame.unit()
    assert frame.raw is not None
    pixels = frame.raw[..., None] if frame.raw.ndim == 2 else frame.raw[..., :3]
    channels = pixels.shape[-1]
    small = pixels.dtype.itemsize <= 2 or pixels.dtype == np.float32
    dtype = np.float32 if small else np.float64  # int32/64, float64: keep their range
    my = resize_matrix(height, size[0]).tocsc()
    mx = resize_matrix(width, size[1])
    out = np.zeros((size[0], size[1] * channels), dtype)
    step = _rows_per_block(width)
    for r0 in range(0, height, step):
        r1 = min(height, r0 + step)
        block = pixels[r0:r1]
        narrow = np.empty((r1 - r0, size[1], channels), dtype)
        for c in range(channels):
            narrow[:, :, c] = (mx @ block[:, :, c].T).T
        out += my[:, r0:r1] @ narrow.reshape(r1 - r0, size[1] * channels)
    out = out.reshape(size[0], size[1], channels)
    if pixels.dtype == np.uint8:
        out /= 255.0
    else:
        lo, hi = frame.value_range if frame.value_range is not None else (0.0, 0.0)
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    out = out.astype(np.float32, copy=False)
    if channels == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.clip(out, 0.0, 1.0, out=out)


class ResizeGeometry:
    """``"resize"``: one network input per frame, at the training size."""

    items_per_frame = 1

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.input_pixels = size[0] * size[1]

    def items(self, frames: Iterator[Frame]) -> Iterator[Item]:
        for frame in frames:
            frame.prepare()
            pixels = np.ascontiguousarray(resize_frame(frame, self.size).transpose(2, 0, 1))
            frame.raw = None
            frame.pending = 1
            yield Item(frame, pixels)

    def accumulate(
        self, item: Item, logits: np.ndarray, num_classes: int
    ) -> tuple[Frame, np.ndarray, bool]:
        # Resized back as logits (smooth, unbounded), then squashed: bilinear on
        # probabilities would blur the decision boundary's position.
        return item.frame, logits, True


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Evenly spread tile starts covering ``[0, length)``; one tile if it fits."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(size: int, ramp: int, left: bool, right: bool) -> np.ndarray:
    """1D blending weights: 1 inside, a raised-cosine ramp over ``ramp`` px at the
    sides that overlap a neighbouring tile, never exactly 0."""
    w = np.ones(size, np.float32)
    if ramp > 0:
        r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp, dtype=np.float32) + 0.5) / ramp)
        if left:
            w[:ramp] = r
        if right:
            w[size - ramp :] = np.minimum(w[size - ramp :], r[::-1])
    return w


def _round_up(n: int) -> int:
    return -(-n // SIZE_DIVISOR) * SIZE_DIVISOR


def _pad_to(tile: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an ``(h, w, 3)`` tile to ``(height, width, 3)`` by mirroring its edges."""
    ph, pw = height - tile.shape[0], width - tile.shape[1]
    if ph == 0 and pw == 0:
        return tile
    # "symmetric" works for any pad width, even beyond the tile's own size, and keeps
    # the border's texture, which a constant pad would turn into a false edge.
    return np.pad(tile, ((0, ph), (0, pw), (0, 0)), mode="symmetric")


class TileGeometry:
    """Overlapping tiles, blended with smooth weights, over the frame at native size or,
    with ``work_size``, over the frame scaled to that size first (``"auto"``)."""

    def __init__(
        self,
        tile: int,
        stride: int,
        height: int,
        width: int,
        work_size: tuple[int, int] | None = None,
    ) -> None:
        self.scaled = work_size is not None and tuple(work_size) != (height, width)
        height, width = work_size if self.scaled else (height, width)
        # A frame smaller than a tile is one tile, padded up to a multiple of 128.
        self.tile_h = tile if height > tile else _round_up(height)
        self.tile_w = tile if width > tile else _round_up(width)
        self.ys = _tile_starts(height, tile, stride)
        self.xs = _tile_starts(width, tile, stride)
        self.items_per_frame = len(self.ys) * len(self.xs)
        self.input_pixels = self.tile_h * self.tile_w
        self.height, self.width = height, width
        self._wy, self._sum_y = self._weights(self.ys, self.tile_h, height, tile - stride)
        self._wx, self._sum_x = self._weights(self.xs, self.tile_w, width, tile - stride)

    @staticmethod
    def _weights(
        starts: list[int], tile: int, length: int, ramp: int
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Per-start 1D blending weights (cropped to the image) and their sum."""
        weights, total = {}, np.zeros(length, np.float32)
        for start in starts:
            size = min(tile, length - start)
            w = _ramp(size, ramp, start > 0, start + size < length)
            weights[start] = w
            total[start : start + size] += w
        return weights, total

    def items(self, frames: Iterator[Frame]) -> Iterator[Item]:
        th, tw = self.tile_h, self.tile_w
        for frame in frames:
            frame.prepare()
            # Native tiles are converted one by one, so a large image never exists as
            # float32; a scaled frame is small and converted whole.
            work = resize_frame(frame, (self.height, self.width)) if self.scaled else None
            frame.pending = self.items_per_frame
            for y in self.ys:
                for x in self.xs:
                    region = (slice(y, y + th), slice(x, x + tw))
                    unit = frame.unit(region) if work is None else work[region]
                    tile = _pad_to(unit, th, tw)
                    yield Item(frame, np.ascontiguousarray(tile.transpose(2, 0, 1)), y, x)
            frame.raw = None

    def accumulate(
        self, item: Item, logits: np.ndarray, num_classes: int
    ) -> tuple[Frame, np.ndarray, bool] | None:
        frame = item.frame
        h = min(self.tile_h, self.height - item.y)
        w = min(self.tile_w, self.width - item.x)
        p = activate(logits[:, :h, :w], num_classes)
        if self.items_per_frame == 1:
            return frame, p, False
        if frame.acc is None:
            frame.acc = np.zeros((num_classes, self.height, self.width), np.float32)
        region = (slice(None), slice(item.y, item.y + h), slice(item.x, item.x + w))
        frame.acc[region] += p * self._wy[item.y][:, None] * self._wx[item.x][None, :]
        frame.pending -= 1
        if frame.pending:
            return None
        probs, frame.acc = frame.acc, None
        # Every tile's weight is wy (x) wx on a product grid of tiles, so the sum of the
        # weights is the outer product of the 1D sums: no (H, W) weight image is needed.
        probs /= self._sum_y[None, :, None]
        probs /= self._sum_x[None, None, :]
        return frame, probs, False


def plan(
    sizing: str,
    height: int,
    width: int,
    *,
    train_size: tuple[int, int],
    source_size: tuple[int, int] | None,
    source_size_max: tuple[int, int] | None,
    tile_size: int,
    overlap: float,
) -> ResizeGeometry | TileGeometry:
    """The geometry for frames of ``height x width`` under ``sizing`` (module docstring)."""
    if sizing == "auto":
        largest = source_size_max or source_size
        one_view = largest is None or (
            height <= _AUTO_RESIZE_FACTOR * largest[0] and width <= _AUTO_RESIZE_FACTOR * largest[1]
        )
        sizing = "resize" if one_view else "tiles"
    if sizing == "resize":
        return ResizeGeometry(train_size)
    stride = tile_size - round(overlap * tile_size)
    if source_size is None:
        return TileGeometry(tile_size, stride, height, width)
    scale = math.sqrt(math.prod(train_size) / math.prod(source_size))
    work = (max(1, round(height * scale)), max(1, round(width * scale)))
    return TileGeometry(tile_size, stride, height, width, work_size=work)


def finish(
    values: np.ndarray,
    are_logits: bool,
    frame: Frame,
    num_classes: int,
    threshold: float,
    labels: np.ndarray,
    probs: np.ndarray | None,
) -> None:
    """Write a frame's labels (and probabilities) from its working-space outputs.

    ``values`` is ``(C, h, w)``: logits (activated here) or probabilities. Where ``(h, w)``
    is not the frame's size it is resized back, bilinear, in row blocks, straight into
    ``labels`` ``(H, W)`` and ``probs`` ``(C, H, W)`` (views into the caller's outputs).
    """
    height, width = frame.height, frame.width

    def write(rows: slice, block: np.ndarray) -> None:
        if probs is None and are_logits:
            # Labels straight from logits: sigmoid(z) > t exactly when z > logit(t), and
            # softmax keeps the argmax; the activation at full size is only for probs.
            if num_classes == 1:
                with np.errstate(divide="ignore"):
                    cut = np.log(threshold) - np.log1p(-threshold)
                labels[rows] = block[0] > cut
            else:
                labels[rows] = block.argmax(axis=0)
            return
        p = activate(block, num_classes) if are_logits else block
        labels[rows] = to_labels(p, threshold)
        if probs is not None:
            probs[:, rows] = p

    if values.shape[1:] == (height, width):
        write(slice(None), values)
        return
    my = resize_matrix(values.shape[1], height, False)
    mx = resize_matrix(values.shape[2], width, False)
    step = max(1, _rows_per_block(width) * 3 // max(1, num_classes))
    for r0 in range(0, height, step):
        r1 = min(height, r0 + step)
        # Rows first (a few source rows per output row), then columns: one block at a time.
        block = np.stack([(mx @ (my[r0:r1] @ plane).T).T for plane in values])
        write(slice(r0, r1), block.astype(np.float32, copy=False))
