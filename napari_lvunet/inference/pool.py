"""One bounded cache of segmenters, shared by the widget, the CLI and :func:`segment`.

Building a segmenter hashes and checks the weights and starts an ONNX Runtime session
(about 100 ms on a 2-core CPU, more than the network takes on a 512 px image); the pool
builds one per model, device and backend and hands the same one out again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..weights import registry
from .segmenter import Segmenter
from .source import ModelSource

__all__ = ["SegmenterPool", "default_pool", "segment"]


def _file_key(path: Path) -> tuple[Any, ...]:
    # A replaced (new inode) or edited (new size or mtime) file is a new key, so an
    # overwritten weights file is never served from a stale segmenter.
    stat = path.stat()
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _model_key(model: Any) -> tuple[Any, ...]:
    if isinstance(model, str) and model in registry():
        return ("registry", model)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        return ("file", *_file_key(path)) if path.is_file() else ("missing", str(path))
    sha = getattr(model, "sha256", None)
    if isinstance(sha, str) and getattr(model, "model", None) is not None:
        return ("loaded", sha)
    if hasattr(model, "tensors_sha256") and hasattr(model, "path"):  # a WeightsFile
        return ("weights", model.sha256)
    return ("model", ModelSource.from_any(model).key)


def _pool_key(
    model: Any,
    device: str,
    backend: str,
    bf16: bool,
    num_threads: int | None,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[Any, ...]:
    return (
        _model_key(model),
        str(device),
        backend,
        bool(bf16),
        num_threads,
        None if cache_dir is None else str(cache_dir),
    )


class SegmenterPool:
    """Segmenters by model, device, backend and options; the least recently used go first.

    Args:
        maxsize: Segmenters kept at most (each holds one ONNX Runtime session or one model
            copy: a few MB).
    """

    def __init__(self, maxsize: int = 4) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[Any, ...], Segmenter] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        model: Any,
        *,
        device: str = "auto",
        backend: str = "auto",
        bf16: bool = False,
        num_threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progressbar: bool | Any = False,
    ) -> Segmenter:
        """The segmenter for these settings, built on first use (see :class:`Segmenter`)."""
        key = _pool_key(model, device, backend, bf16, num_threads, cache_dir)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        segmenter = Segmenter(
            model,
            device=device,
            backend=backend,
            bf16=bf16,
            num_threads=num_threads,
            cache_dir=cache_dir,
            progressbar=progressbar,
        )
        with self._lock:
            self._items[key] = segmenter
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return segmenter

    def peek(
        self,
        model: Any,
        *,
        device: str = "auto",
        backend: str = "auto",
        bf16: bool = False,
        num_threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Segmenter | None:
        """The segmenter :meth:`get` would hand out for these settings, or None if it is not
        in the pool (never built, or evicted). Never builds one, never downloads, and leaves
        the least-recently-used order as it was."""
        key = _pool_key(model, device, backend, bf16, num_threads, cache_dir)
        with self._lock:
            return self._items.get(key)

    def clear(self) -> None:
        """Forget every segmenter (their sessions close when no caller holds them)."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_DEFAULT = SegmenterPool()


def default_pool() -> SegmenterPool:
    """The process-wide pool that the widget, the CLI and :func:`segment` share."""
    return _DEFAULT


def segment(
    image: Any,
    model: Any,
    *,
    device: str = "auto",
    backend: str = "auto",
    bf16: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment ``image`` with ``model`` in one call.

    The segmenter comes from :func:`default_pool`, so repeated calls with the same model
    cost what :meth:`Segmenter.segment` costs.

    Args:
        image: See :meth:`Segmenter.segment`.
        model: A registry name, a ``.safetensors`` path, loaded weights or an LVUNet
            (see :class:`Segmenter`).
        device: See :func:`~napari_lvunet.inference.resolve_device`.
        backend: See :class:`Segmenter`.
        bf16: See :class:`Segmenter`.
        cache_dir: See :class:`Segmenter`.
        **kwargs: Passed to :meth:`Segmenter.segment` (``axes``, ``threshold``, ``sizing``,
            ``output``, ``return_probabilities``, ...).

    Returns:
        See :meth:`Segmenter.segment`.
    """
    segmenter = _DEFAULT.get(model, device=device, backend=backend, bf16=bf16, cache_dir=cache_dir)
    return segmenter.segment(image, **kwargs)
