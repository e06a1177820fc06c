"""Videos in and out: a lazy frame array, mask and overlay videos, per-frame statistics.

Reading. :func:`open_video` gives a :class:`Video`, a read-only ``T x H x W x 3`` uint8
array-like (``shape``, ``dtype``, ``ndim``, numpy-style ``__getitem__``) that napari shows
as an RGB image layer with a time slider. Opening a file reads only its packet index (no
decoding): the exact frame count, each frame's time stamp and the key frames. A frame is
decoded when it is asked for, by seeking to the key frame before it and decoding forward
(or by decoding on, when frames are read in order), and kept in a small LRU cache, so a
10-minute video never sits whole in memory. :meth:`Video.iter_frames` decodes in order
with FFmpeg's own threads, for whole-video work.

Writing. :class:`VideoWriter` encodes H.264 MP4 at the input's frame rate: overlays with
the usual lossy settings (plays everywhere), masks losslessly (0 / 255 survive exactly, so
a mask video can be read back as data; lossless H.264 plays in VLC, FFmpeg-based tools and
this reader, not in every browser). :func:`overlay` draws the labels on a frame (a tint
and yellow outlines); :func:`frame_stats` measures one frame's foreground for the
per-frame CSV (:data:`FRAME_CSV_COLUMNS`).

Segmenting. :func:`segment_video` runs decode, segmentation and encoding in three stages
connected by short queues (FFmpeg and ONNX Runtime release the GIL), writes the mask
video, the overlay video and the per-frame CSV, and moves all three into place together
at the end (``io.staged_files``); memory stays flat in the video's length.

The decoder is PyAV (``av``, FFmpeg's libraries in its wheel). No Qt, no torch.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import logging
import math
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "FRAME_CSV_COLUMNS",
    "VIDEO_SUFFIXES",
    "Video",
    "VideoError",
    "VideoSummary",
    "VideoWriter",
    "frame_stats",
    "is_video",
    "open_video",
    "overlay",
    "segment_video",
]

logger = logging.getLogger(__name__)

#: File name endings read as video (compared in lower case).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
#: Columns of the per-frame CSV written by :func:`segment_video`.
FRAME_CSV_COLUMNS = (
    "frame",
    "time_s",
    "area_px",
    "area_fraction",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "n_regions",
    "mean_probability",
)
#: Default budget of decoded frames a :class:`Video` keeps (about 45 frames of 1280 x 720).
DEFAULT_CACHE_BYTES = 128 << 20
# Reading on in decode order is cheaper than a seek when the frame asked for is at most
# this many frames ahead of the decoder (a seek decodes from the key frame anyway).
_READ_ON_FRAMES = 48
# Overlay look: a translucent tint per label and yellow outlines, as in the CLI's PNGs.
_OUTLINE_RGB = np.array((255, 255, 0), np.uint8)
_TINT_ALPHA = 0.35
_PALETTE = np.array(
    [
        (255, 0, 0),
        (0, 200, 255),
        (0, 255, 0),
        (255, 0, 255),
        (255, 128, 0),
        (128, 0, 255),
        (0, 128, 128),
        (255, 255, 255),
    ],
    np.uint8,
)
_OVERLAY_PRESET = "veryfast"
_MASK_PRESET = "ultrafast"  # lossless either way; ultrafast keeps the encoder off the path
_QUEUE_CHUNKS = 2  # chunks waiting between two pipeline stages (bounds memory)


class VideoError(ValueError):
    """A file that cannot be opened or decoded as a video, or a frame out of range."""


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a video this module reads (by its file name ending)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _import_av() -> Any:
    try:
        import av
    except ImportError as err:  # declared as a core dependency; a broken install lands here
        raise ImportError(
            "reading and writing videos needs PyAV: pip install av (it ships FFmpeg)"
        ) from err
    return av


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Index:
    """What a file's packets tell without decoding: frame time stamps and key frames."""

    pts: np.ndarray  # presentation time stamps, ascending (int64, stream time base)
    keyframe_pts: list[int]  # ascending
    time_base: Fraction
    rate: Fraction | None
    fps: float
    width: int
    height: int


def _read_index(path: Path) -> _Index:
    av = _import_av()
    try:
        container = av.open(str(path))
    except Exception as err:  # FFmpeg raises many error types for a bad file
        raise VideoError(f"cannot open {path} as a video: {err}") from err
    with container:
        if not container.streams.video:
            raise VideoError(f"{path} has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        time_base = stream.time_base or Fraction(1, 1)
        pts: list[int] = []
        keys: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # flush packet / edit-list skip
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    raise VideoError(f"{path}: packets without time stamps cannot be indexed")
                pts.append(int(stamp))
                if packet.is_keyframe:
                    keys.append(int(stamp))
        except VideoError:
            raise
        except Exception as err:
            raise VideoError(f"cannot read {path} as a video: {err}") from err
        rate = stream.average_rate or stream.guessed_rate
    if not pts or width <= 0 or height <= 0:
        raise VideoError(f"{path} holds no video frames")
    stamps = np.unique(np.asarray(pts, np.int64))  # presentation order, duplicates dropped
    if rate:
        fps = float(rate)
    elif len(stamps) > 1:
        fps = float((len(stamps) - 1) / ((stamps[-1] - stamps[0]) * time_base))
    else:
        fps = 0.0
    keyframes = sorted(set(keys)) or [int(stamps[0])]
    exact = Fraction(rate) if rate else None
    return _Index(stamps, keyframes, time_base, exact, fps, width, height)


class Video:
    """A video file as a lazy, read-only ``(T, H, W, 3)`` uint8 array.

    Indexing follows numpy: ``video[7]`` is one ``(H, W, 3)`` frame, ``video[10:20, :100]``
    a ``(10, 100, W, 3)`` array, ``video[[3, 1]]`` two frames; only the frames asked for
    are decoded. ``np.asarray(video)`` decodes everything (avoid it for long videos).
    Thread-safe: napari may read frames from its slicing threads.

    Args:
        path: An MP4, AVI, MOV or MKV file (anything FFmpeg reads works).
        cache_bytes: Decoded frames kept for re-reading (LRU), in bytes; at least two
            frames are kept.

    Attributes:
        path: The file.
        fps: Frames per second (the stream's average rate), a float.
        rate: The same as an exact fraction (e.g. 30000/1001), for writing videos.
        frame_times: Each frame's presentation time in seconds from the first frame.

    Raises:
        VideoError: If the file cannot be opened or holds no video frames.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self, path: str | os.PathLike[str], *, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"no such file: {self.path}")
        self._index = _read_index(self.path)
        index = self._index
        self.shape = (len(index.pts), index.height, index.width, 3)
        self.fps = index.fps
        self.rate = index.rate or Fraction(index.fps).limit_denominator(1001)
        self.frame_times = (index.pts - index.pts[0]).astype(np.float64) * float(index.time_base)
        frame_bytes = index.height * index.width * 3
        self._cache_frames = max(2, int(cache_bytes) // frame_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._next = 0  # index of the frame the open decoder yields next
        self.decoded_frames = 0  # frames converted to RGB so far (for tests and tuning)

    # ----------------------------------------------------------------- array protocol

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        t, h, w, _ = self.shape
        return f"Video({str(self.path)!r}, frames={t}, height={h}, width={w}, fps={self.fps:g})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        frames = self[:]
        return frames if dtype is None else frames.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _expand_key(key, self.ndim)
        first, rest = key[0], key[1:]
        basic_rest = all(isinstance(k, (slice, int, np.integer)) for k in rest)
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            i = int(first) + n if int(first) < 0 else int(first)
            if not 0 <= i < n:
                raise IndexError(f"frame {int(first)} is out of range for {n} frames")
            return np.array(self._frame(i)[rest])
        if isinstance(first, slice):
            indices = np.arange(n)[first]
            inverse: np.ndarray | None = None
        else:
            wanted = np.asarray(first)
            if wanted.dtype == bool:
                if wanted.shape != (n,):
                    raise IndexError(f"boolean index of shape {wanted.shape} for {n} frames")
                wanted = np.flatnonzero(wanted)
            if wanted.dtype.kind not in "iu":
                raise IndexError(f"frames must be indexed by integers, got {wanted.dtype}")
            wanted = np.where(wanted < 0, wanted + n, wanted)
            if wanted.size and (wanted.min() < 0 or wanted.max() >= n):
                raise IndexError(f"frame index out of range for {n} frames")
            indices, inverse = np.unique(wanted, return_inverse=True)
            inverse = inverse.reshape(wanted.shape)
        if inverse is None and basic_rest:
            # Crop each frame as it is decoded: a range of crops never holds full frames.
            frames = [self._frame(int(i))[rest] for i in indices]
            if frames:
                return np.stack(frames)
            empty = np.empty(self.shape[1:], np.uint8)[rest]
            return np.empty((0, *empty.shape), np.uint8)
        stack = np.stack([self._frame(int(i)) for i in indices]) if len(indices) else None
        if stack is None:
            stack = np.empty((0, *self.shape[1:]), np.uint8)
        lead = slice(None) if inverse is None else inverse
        return np.array(stack[(lead, *rest)])

    # ----------------------------------------------------------------- decoding

    def _frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (read-only, cached)."""
        with self._lock:
            cached = self._cache.get(i)
            if cached is not None:
                self._cache.move_to_end(i)
                return cached
            if self._frames is None or not (self._next <= i <= self._next + _READ_ON_FRAMES):
                self._seek(i)
            from_start = False
            while True:
                index, frame = self._decode_next()
                if index < i:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                rgb.flags.writeable = False
                self.decoded_frames += 1
                self._cache[index] = rgb
                while len(self._cache) > self._cache_frames:
                    self._cache.popitem(last=False)
                if index == i:
                    return rgb
                if from_start:  # even decoding from the first frame skipped frame i
                    self._frames = None
                    raise VideoError(f"{self.path}: frame {i} cannot be decoded")
                # Overshot: the seek landed after frame i (a key frame the index did not
                # show as one); decode from the start, where every file begins.
                self._seek(0, from_start=True)
                from_start = True

    def _decode_next(self) -> tuple[int, Any]:
        assert self._frames is not None
        try:
            frame = next(self._frames)
        except StopIteration:
            self._frames = None
            raise VideoError(
                f"{self.path}: the stream ended before frame {self._next} "
                f"of {self.shape[0]} (a truncated file?)"
            ) from None
        except Exception as err:  # FFmpeg decode errors
            self._frames = None
            raise VideoError(f"cannot decode {self.path}: {err}") from err
        index = self._frame_index(frame.pts, self._next)
        self._next = index + 1
        return index, frame

    def _frame_index(self, pts: int | None, fallback: int) -> int:
        if pts is None:
            return fallback
        stamps = self._index.pts
        j = int(np.searchsorted(stamps, pts))
        if j < len(stamps) and stamps[j] == pts:
            return j
        return fallback  # a time stamp the index does not hold: count on

    def _seek(self, i: int, *, from_start: bool = False) -> None:
        av = _import_av()
        if self._container is None:
            self._container = av.open(str(self.path))
        stream = self._container.streams.video[0]
        keys = self._index.keyframe_pts
        target = int(self._index.pts[i])
        key = keys[0] if from_start else keys[max(0, bisect.bisect_right(keys, target) - 1)]
        self._container.seek(key, stream=stream, backward=True, any_frame=False)
        self._frames = iter(self._container.decode(stream))
        self._next = int(np.searchsorted(self._index.pts, key))

    def iter_frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Decode frames ``start`` to ``stop`` in order (a separate decoder, FFmpeg-threaded).

        For whole-video work: faster than indexing frame by frame, and it leaves the cache
        and the random-access decoder alone. Frames are fresh, writable arrays.

        Raises:
            VideoError: If the file cannot be decoded.
        """
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        if start >= stop:
            return
        av = _import_av()
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            keys = self._index.keyframe_pts
            next_index = 0
            if start > 0:
                key = keys[max(0, bisect.bisect_right(keys, int(self._index.pts[start])) - 1)]
                container.seek(key, stream=stream, backward=True, any_frame=False)
                next_index = int(np.searchsorted(self._index.pts, key))
            try:
                for frame in container.decode(stream):
                    index = self._frame_index(frame.pts, next_index)
                    next_index = index + 1
                    if index < start:
                        continue
                    yield frame.to_ndarray(format="rgb24")
                    if next_index >= stop:
                        return
            except Exception as err:
                raise VideoError(f"cannot decode {self.path}: {err}") from err
        if next_index < stop:
            raise VideoError(
                f"{self.path}: the stream ended at frame {next_index} of {stop} (a truncated file?)"
            )

    def close(self) -> None:
        """Close the random-access decoder and drop the cache (reading reopens it)."""
        with self._lock:
            if self._container is not None:
                self._container.close()
            self._container = None
            self._frames = None
            self._cache.clear()

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()


def _expand_key(key: Any, ndim: int) -> tuple[Any, ...]:
    """A full-length index tuple: ``Ellipsis`` expanded, missing axes as ``slice(None)``."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is None for k in key):
        raise IndexError("a Video cannot add axes (np.newaxis): index a numpy copy instead")
    n_ellipsis = sum(k is Ellipsis for k in key)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if n_ellipsis:
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = (slice(None),) * (ndim - len(key) + 1)
        key = (*key[:at], *fill, *key[at + 1 :])
    if len(key) > ndim:
        raise IndexError(f"too many indices for a {ndim}-dimensional video: {len(key)}")
    return key + (slice(None),) * (ndim - len(key))


def open_video(path: str | os.PathLike[str], *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Video:
    """Open a video file lazily (see :class:`Video`).

    Raises:
        VideoError: If the file does not exist, cannot be opened or holds no frames.
    """
    return Video(path, cache_bytes=cache_bytes)


# --------------------------------------------------------------------------- writing


class VideoWriter:
    """Encode frames into an H.264 MP4 file (or MKV, MOV, AVI by the file's ending).

    Args:
        path: The file to write (its folder must exist). It is written as it is: callers
            that must never leave half a file write to a temporary name
            (``io.staged_files``).
        fps: Frames per second (a float or a :class:`~fractions.Fraction`, e.g. the
            input's ``Video.fps``).
        lossless: Encode exactly (for masks); otherwise at quality ``crf``.
        crf: x264's constant rate factor for lossy video (23, its default: no visible loss
            on overlays; lower is better and larger).
        preset: x264's speed preset (default: ``"ultrafast"`` lossless, ``"veryfast"``
            lossy; slower presets make smaller files).

    Frames are ``(H, W, 3)`` RGB or ``(H, W)`` grey uint8, all of one size. Odd heights or
    widths are padded by one edge pixel (4:2:0 video needs even sizes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fps: float | Fraction,
        lossless: bool = False,
        crf: int = 23,
        preset: str | None = None,
    ) -> None:
        av = _import_av()
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        fmt = {".mkv": "matroska", ".mov": "mov", ".avi": "avi"}.get(
            self.path.suffix.lower(), "mp4"
        )
        rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        self._container = av.open(str(self.path), "w", format=fmt)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.pix_fmt = "yuv420p"
        if lossless:
            self._stream.options = {"qp": "0", "preset": preset or _MASK_PRESET}
        else:
            self._stream.options = {"crf": str(int(crf)), "preset": preset or _OVERLAY_PRESET}
        self._size: tuple[int, int] | None = None
        self._av = av
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.shape[2:] not in ((), (3,)):
            raise ValueError(f"expected (H, W) or (H, W, 3) uint8 frames, got {frame.shape}")
        height, width = frame.shape[:2]
        if self._size is None:
            self._size = (height, width)
            self._stream.height = height + height % 2
            self._stream.width = width + width % 2
        elif self._size != (height, width):
            raise ValueError(f"frame of {height} x {width} in a video of {self._size}")
        if height % 2 or width % 2:
            pad = ((0, height % 2), (0, width % 2)) + ((0, 0),) * (frame.ndim - 2)
            frame = np.pad(frame, pad, mode="edge")
        fmt = "rgb24" if frame.ndim == 3 else "gray"
        video_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=fmt)
        video_frame.pts = self.frames
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self._container is None:
            return
        try:
            if self._size is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- drawing


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The frame with a translucent colour on each label and yellow outlines.

    Args:
        image: ``(H, W, 3)`` RGB uint8 (or ``(H, W)`` grey uint8).
        labels: ``(H, W)`` integer labels, 0 = background.

    Returns:
        A new ``(H, W, 3)`` uint8 array; background pixels keep the image's colour.
    """
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    out = np.array(rgb, np.uint8, copy=True)
    box = _bbox(labels > 0)
    if box is None:
        return out
    # Only the labels' bounding box is drawn on; Pillow blends and pastes in C.
    from PIL import Image

    y0, x0, y1, x1 = box
    crop = labels[y0:y1, x0:x1]
    region = out[y0:y1, x0:x1]
    base = Image.fromarray(np.ascontiguousarray(region))
    fg = crop > 0
    if crop.dtype.itemsize > 1 or crop.max() > 1:
        colour_index = (crop.astype(np.int64) - 1) % len(_PALETTE)
        groups = [(k, fg & (colour_index == k)) for k in np.unique(colour_index[fg])]
    else:
        groups = [(0, fg)]
    for k, where in groups:
        colour = Image.new("RGB", base.size, tuple(int(c) for c in _PALETTE[k]))
        tinted = Image.blend(base, colour, _TINT_ALPHA)
        base.paste(tinted, (0, 0), Image.fromarray(where.view(np.uint8) * np.uint8(255)))
    region[...] = np.asarray(base)
    region[_inner_boundaries(labels, box)] = _OUTLINE_RGB
    return out


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(y0, x0, y1, x1)`` of the true pixels (``y1``, ``x1`` exclusive); None if none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _inner_boundaries(labels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Within ``box``: labelled pixels with a 4-neighbour of another label, or on the
    frame's edge."""
    y0, x0, y1, x1 = box
    height, width = labels.shape
    # One pixel of context around the box, where the frame has it.
    cy0, cx0, cy1, cx1 = max(0, y0 - 1), max(0, x0 - 1), min(height, y1 + 1), min(width, x1 + 1)
    context = labels[cy0:cy1, cx0:cx1]
    edge = np.zeros(context.shape, bool)
    vertical = context[1:] != context[:-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    horizontal = context[:, 1:] != context[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    if cy0 == 0:
        edge[0] = True
    if cy1 == height:
        edge[-1] = True
    if cx0 == 0:
        edge[:, 0] = True
    if cx1 == width:
        edge[:, -1] = True
    edge &= context > 0
    return edge[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]


def frame_stats(labels: np.ndarray, probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """One frame's foreground: area, bounding box, regions, mean probability.

    Args:
        labels: ``(H, W)`` labels, 0 = background.
        probabilities: The engine's probabilities for the frame: ``(H, W)`` foreground
            probability (binary model) or ``(C, H, W)`` class probabilities.

    Returns:
        ``area_px``, ``area_fraction``, ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1``
        (``y1``/``x1`` exclusive, like slices; ``""`` without foreground), ``n_regions``
        (8-connected regions of the foreground) and ``mean_probability`` (of the label
        each foreground pixel got, over the foreground; ``""`` without foreground or
        probabilities).
    """
    from scipy import ndimage

    fg = labels > 0
    area = int(np.count_nonzero(fg))
    stats: dict[str, Any] = {
        "area_px": area,
        "area_fraction": area / fg.size,
        "bbox_y0": "",
        "bbox_x0": "",
        "bbox_y1": "",
        "bbox_x1": "",
        "n_regions": 0,
        "mean_probability": "",
    }
    if not area:
        return stats
    box = _bbox(fg)
    assert box is not None
    y0, x0, y1, x1 = box
    stats.update(bbox_y0=y0, bbox_x0=x0, bbox_y1=y1, bbox_x1=x1)
    crop = (slice(y0, y1), slice(x0, x1))  # everything below needs only the box
    _, n = ndimage.label(fg[crop], structure=np.ones((3, 3), bool))
    stats["n_regions"] = int(n)
    if probabilities is not None:
        if probabilities.ndim == labels.ndim:
            picked = probabilities[crop]
        else:  # class probabilities: the probability of the class each pixel got
            classes = labels[crop][None].astype(np.intp)
            picked = np.take_along_axis(probabilities[(slice(None), *crop)], classes, axis=0)[0]
        stats["mean_probability"] = float(picked[fg[crop]].mean(dtype=np.float64))
    return stats


# --------------------------------------------------------------------------- segmenting


class _SegmenterLike(Protocol):
    num_classes: int

    def segment(self, image: Any, **kwargs: Any) -> Any: ...


@dataclass
class VideoSummary:
    """What :func:`segment_video` wrote and measured, pooled over all frames (the
    foreground statistics are measured with the frame table only: zero without it)."""

    frames: int
    fps: float
    height: int
    width: int
    written: list[Path]
    area_px: int = 0
    frames_with_foreground: int = 0
    n_regions: int = 0
    written_frames: int = 0
    probability_sum: float = field(default=0.0, repr=False)
    probability_pixels: int = field(default=0, repr=False)

    def add(self, stats: dict[str, Any]) -> None:
        """Pool one frame's :func:`frame_stats`."""
        self.written_frames += 1
        area = int(stats["area_px"])
        self.area_px += area
        if area:
            self.frames_with_foreground += 1
            self.n_regions += int(stats["n_regions"])
            if stats["mean_probability"] != "":
                self.probability_sum += float(stats["mean_probability"]) * area
                self.probability_pixels += area

    @property
    def area_fraction(self) -> float:
        return self.area_px / max(1, self.frames * self.height * self.width)

    @property
    def mean_probability(self) -> float | None:
        return self.probability_sum / self.probability_pixels if self.probability_pixels else None


_END = object()  # closes a pipeline queue


def _mask_frame(labels: np.ndarray, num_classes: int, output: str) -> np.ndarray:
    """A mask video frame: 0 / 255 for a foreground mask; classes spread over 0..255."""
    if num_classes == 1 or output == "instances":
        return np.where(labels > 0, np.uint8(255), np.uint8(0))
    step = 255 // max(1, num_classes - 1)
    return (labels.astype(np.uint16) * step).astype(np.uint8)


def segment_video(
    video: Video | str | os.PathLike[str],
    segmenter: _SegmenterLike,
    *,
    mask_path: str | os.PathLike[str] | None,
    overlay_path: str | os.PathLike[str] | None = None,
    csv_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    threshold: float = 0.5,
    sizing: str = "resize",
    output: str = "semantic",
    chunk_frames: int = 8,
    progress: Callable[[int], object] | None = None,
    cancel: Any = None,
) -> VideoSummary:
    """Segment every frame of a video; write the mask video, overlay video and frame CSV.

    Three stages run at once: a thread decodes chunks of frames, the calling thread
    segments them (``segmenter.segment`` on a ``TYXC`` chunk), a thread draws, measures
    and encodes. Queues of two chunks join them, so memory does not grow with the video.
    The outputs are written under temporary names and moved into place together at the
    end (``io.staged_files``): an error or a cancel leaves nothing behind.

    Args:
        video: A :class:`Video` or a video file.
        segmenter: An engine ``Segmenter`` (anything with ``segment`` and ``num_classes``).
        mask_path: The mask video (lossless H.264: 0 / 255, or class ``k`` as
            ``k * (255 // (classes - 1))``); ``None``: none.
        overlay_path: The overlay video (tint and outlines on the frames); ``None``: none.
        csv_path: The per-frame CSV (:data:`FRAME_CSV_COLUMNS`); ``None``: none.
        overwrite: Replace existing outputs; otherwise an existing one raises
            ``FileExistsError`` (checked first, before any work, and again at the end).
        threshold, sizing, output: Passed to ``segmenter.segment``.
        chunk_frames: Frames per call of the engine.
        progress: Called with the number of frames finished, after every chunk.
        cancel: An object with ``is_set()``; checked between chunks.

    Returns:
        A :class:`VideoSummary`.

    Raises:
        VideoError: If the video cannot be decoded.
        FileExistsError: If an output exists and ``overwrite`` is False.
        napari_lvunet.cancel.Cancelled: If ``cancel`` was set (the engine's own
            cancellation exception).
    """
    from .io import staged_files

    video = video if isinstance(video, Video) else open_video(video)
    targets = [Path(p) for p in (mask_path, overlay_path, csv_path) if p is not None]
    if not targets:
        raise ValueError("nothing to write: give mask_path, overlay_path or csv_path")
    if not overwrite:
        for target in targets:
            if target.exists():
                raise FileExistsError(f"{target} already exists; pass overwrite=True")
    n_frames, height, width, _ = video.shape
    summary = VideoSummary(n_frames, video.fps, height, width, written=targets)
    with staged_files(targets, overwrite=overwrite) as temps:
        temp_of = dict(zip(targets, temps, strict=True))
        _run_pipeline(
            video,
            segmenter,
            summary,
            mask=temp_of.get(Path(mask_path)) if mask_path is not None else None,
            overlay_to=temp_of.get(Path(overlay_path)) if overlay_path is not None else None,
            csv_to=temp_of.get(Path(csv_path)) if csv_path is not None else None,
            segment_kwargs={"threshold": threshold, "sizing": sizing, "output": output},
            chunk_frames=max(1, int(chunk_frames)),
            progress=progress,
            cancel=cancel,
        )
    return summary


def _run_pipeline(
    video: Video,
    segmenter: _SegmenterLike,
    summary: VideoSummary,
    *,
    mask: Path | None,
    overlay_to: Path | None,
    csv_to: Path | None,
    segment_kwargs: dict[str, Any],
    chunk_frames: int,
    progress: Callable[[int], object] | None,
    cancel: Any,
) -> None:
    decoded: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_CHUNKS)
    segmented: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_CHUNKS)
    failed = threading.Event()  # any stage failed: the others stop at their next step
    errors: list[BaseException] = []

    def put(q: queue.Queue[Any], item: Any) -> bool:
        while not failed.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue[Any]) -> Any:
        while not failed.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def fail(err: BaseException) -> None:
        errors.append(err)
        failed.set()

    def decode() -> None:
        try:
            chunk: list[np.ndarray] = []
            for frame in video.iter_frames():
                chunk.append(frame)
                if len(chunk) == chunk_frames:
                    if not put(decoded, np.stack(chunk)):
                        return
                    chunk = []
            if chunk:
                put(decoded, np.stack(chunk))
            put(decoded, _END)
        except BaseException as err:
            fail(err)

    def write() -> None:
        try:
            _write_all(
                get, segmented, video, segmenter, summary, segment_kwargs["output"],
                mask, overlay_to, csv_to,
            )  # fmt: skip
        except BaseException as err:
            fail(err)

    threads = [
        threading.Thread(target=decode, name="lvunet-video-decode", daemon=True),
        threading.Thread(target=write, name="lvunet-video-encode", daemon=True),
    ]
    for thread in threads:
        thread.start()
    done = 0
    try:
        # Probabilities (full-size float arrays) only when the frame table needs them.
        measure = csv_to is not None
        while (chunk := get(decoded)) is not _END:
            result = segmenter.segment(
                chunk, axes="TYXC", return_probabilities=measure, cancel=cancel, **segment_kwargs
            )
            labels, probs = result if measure else (result, [None] * len(chunk))
            if measure and probs.ndim == labels.ndim + 1:  # (C, T, H, W) -> (T, C, H, W)
                probs = np.moveaxis(probs, 0, 1)
            if not put(segmented, (chunk, labels, probs)):
                break
            done += len(chunk)
            if progress is not None:
                progress(done)
        put(segmented, _END)
    except BaseException as err:
        fail(err)
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    if done != summary.frames or summary.written_frames != summary.frames:
        raise VideoError(f"{video.path}: {done} of {summary.frames} frames were segmented")


def _write_all(
    get: Callable[[queue.Queue[Any]], Any],
    segmented: queue.Queue[Any],
    video: Video,
    segmenter: _SegmenterLike,
    summary: VideoSummary,
    output: str,
    mask: Path | None,
    overlay_to: Path | None,
    csv_to: Path | None,
) -> None:
    """The pipeline's last stage: statistics, mask and overlay frames, CSV rows."""
    with contextlib.ExitStack() as files:
        mask_writer = (
            files.enter_context(VideoWriter(mask, fps=video.rate, lossless=True)) if mask else None
        )
        overlay_writer = (
            files.enter_context(VideoWriter(overlay_to, fps=video.rate)) if overlay_to else None
        )
        rows = None
        if csv_to is not None:
            rows = csv.writer(files.enter_context(open(csv_to, "w", newline="")))
            rows.writerow(FRAME_CSV_COLUMNS)
        while (item := get(segmented)) is not _END:
            frames, labels, probs = item
            for frame, frame_labels, frame_probs in zip(frames, labels, probs, strict=True):
                index = summary.written_frames
                if rows is None:
                    summary.written_frames += 1
                else:
                    stats = frame_stats(frame_labels, frame_probs)
                    summary.add(stats)
                if mask_writer is not None:
                    mask_writer.write(_mask_frame(frame_labels, segmenter.num_classes, output))
                if overlay_writer is not None:
                    overlay_writer.write(overlay(frame, frame_labels))
                if rows is not None:
                    rows.writerow(
                        [index, f"{video.frame_times[index]:.6f}"]
                        + [_csv_value(stats[c]) for c in FRAME_CSV_COLUMNS[2:]]
                    )


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def read_frame_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a per-frame CSV written by :func:`segment_video`, as dicts of strings."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))
