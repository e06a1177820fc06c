"""The Segmenter: one model ready to run, and the loop that segments images with it.

Pipeline for every 2D frame (a stack is cut into frames, batched across frames)::

    frame -> RGB in [0, 1] (preprocess.to_unit_rgb) -> resized to the training size, or
    cut into tiles (tiling) -> network (backends; normalisation is inside the ONNX graph)
    -> logits -> back to the frame's size, sigmoid / softmax, threshold / argmax
    (tiling.finish, postprocess) -> labels (optionally connected components)
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..cancel import Cancelled, CancelToken, check_cancelled
from ..preprocess import SIZE_DIVISOR, TRAIN_SIZE
from .axes import STACK_AXES, check_axes, check_image, infer_axes
from .backends import BACKENDS, DeviceOutOfMemory, create_runner
from .device import bf16_supported, resolve_device
from .postprocess import check_finite, instances
from .source import ModelSource
from .tiling import SIZINGS, Frame, Item, finish, plan

__all__ = ["SegmentationCancelled", "Segmenter"]

logger = logging.getLogger(__name__)

OUTPUTS = ("semantic", "instances")
# Largest CPU batch, in pixels (see Segmenter.segment's batch_size).
_CPU_BATCH_PIXELS = 1 << 19


class SegmentationCancelled(Cancelled):
    """Raised by :meth:`Segmenter.segment` when its ``cancel`` token is set."""


class Segmenter:
    """An LV-UNet ready to segment images: checked, on its device, with its backend.

    Build it once per model and device (or take it from a
    :class:`~napari_lvunet.inference.SegmenterPool`) and call :meth:`segment` as often as
    needed (the napari widget's live preview calls it on every slice change): the ONNX
    Runtime session, or the device copy of the model, is made here, once.

    Args:
        model: A registry name, the path of a ``.safetensors`` file, a
            :class:`~napari_lvunet.weights.WeightsFile` (all three without PyTorch on the
            CPU), loaded weights (``napari_lvunet.weights.LoadedModel``) or an
            :class:`~napari_lvunet.model.LVUNet` (fused; or unfused at ``act_learn == 1``,
            fused here on a copy; or unfused at ``act_learn < 1``, run as it is with
            PyTorch). The caller's model is never modified or moved.
        device: See :func:`~napari_lvunet.inference.resolve_device`.
        backend: ``"auto"``: ONNX Runtime on the CPU (falling back to PyTorch where it
            cannot start), PyTorch on CUDA and MPS. ``"onnxruntime"`` or ``"torch"``
            force one (ONNX Runtime only on the CPU).
        bf16: Run PyTorch in bfloat16 autocast (opt-in; CPUs with AVX512-BF16/AMX, CUDA,
            MPS). Implies the PyTorch backend under ``backend="auto"``. Where bf16 is not
            supported it warns and runs in float32.
        cache_dir: Folder for ONNX graphs made for weights without one. Default:
            ``<weights cache>/onnx``; never the weights' own folder.
        num_threads: CPU threads ONNX Runtime may use (default: one per physical core).
        progressbar: Download progress for a registry model that is not cached yet.

    Attributes:
        device: The device actually used (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).
        backend: ``"onnxruntime"`` or ``"torch"``.
        info: The checked weights file (``None`` for a bare model).
        num_classes: The model's output classes.
        train_size: ``(height, width)`` the ``"resize"`` sizing resizes to.
        source_size: ``(height, width)`` of a typical training source image, by which
            ``"tiles"`` scales images; ``None`` where the weights do not say.
        source_size_max: ``(height, width)`` of the largest training source image, which
            ``"auto"`` compares frames with; ``None`` where the weights do not say.
        onnx_path: The ONNX graph in use (``None`` on the PyTorch backend).

    Raises:
        TypeError: If ``model`` is none of the above.
        ValueError: For an unknown backend or device, or an impossible combination (ONNX
            Runtime on a GPU, or for a model that cannot be fused).
        napari_lvunet.weights.WeightsError: For a model name or file that fails its checks.
        ImportError: If a backend's package (or PyTorch, for a GPU) is missing.
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str = "auto",
        backend: str = "auto",
        bf16: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        num_threads: int | None = None,
        progressbar: bool | Any = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._source = ModelSource.from_any(model, progressbar=progressbar)
        self.info = self._source.info
        self.num_classes = self._source.num_classes
        self.train_size = _train_size(self._source.metadata)
        self.source_size = _size(self._source.metadata.get("source_size"))
        self.source_size_max = _size(self._source.metadata.get("source_size_max"))
        if bf16 and backend == "onnxruntime":
            raise ValueError("bf16 runs on the torch backend: use backend='torch'")
        self.device = resolve_device(device)
        if bf16 and not bf16_supported(self.device):
            warnings.warn(
                f"bf16 is not supported on this {self.device}; running in float32",
                RuntimeWarning,
                2,
            )
            bf16 = False
        self.bf16 = bf16
        self._requested_backend = backend
        self._num_threads = num_threads
        self._cache_dir = cache_dir
        self._start(self.device, backend)

    def _start(self, device: str, backend: str) -> None:
        self._runner = create_runner(
            self._source,
            device=device,
            backend=backend,
            bf16=self.bf16,
            num_threads=self._num_threads,
            cache_dir=self._cache_dir,
        )
        self.device = device
        self.backend = self._runner.backend
        self.onnx_path = getattr(self._runner, "path", None)
        logger.info("LV-UNet segmenter: device=%s backend=%s", self.device, self.backend)

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch in [0, 1]; a GPU out of memory moves everything to the CPU."""
        try:
            return self._runner(batch)
        except DeviceOutOfMemory as err:
            warnings.warn(f"{err}; continuing on the CPU", RuntimeWarning, 4)
            self.bf16 = self.bf16 and bf16_supported("cpu")
            backend = "auto" if self._requested_backend == "auto" else "torch"
            self._start("cpu", backend)
            return self._runner(batch)

    def segment(
        self,
        image: Any,
        *,
        axes: str | None = None,
        threshold: float = 0.5,
        sizing: str = "auto",
        output: str = "semantic",
        return_probabilities: bool = False,
        batch_size: int = 8,
        tile_size: int = 512,
        overlap: float = 0.25,
        progress: Callable[[int, int], object] | None = None,
        cancel: CancelToken | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment an image, a stack or a time series.

        Args:
            image: An array (numpy, or any array-like with ``shape``/``dtype`` and numpy
                indexing, such as the dask arrays napari holds or a lazy video): 2D
                grayscale, RGB/RGBA, stacks; integer or float, any range. uint8 is divided
                by 255 (the scale of the training images), any other dtype is min-max
                scaled per 2D frame.
            axes: Letters ``T Z Y X C`` naming ``image``'s dimensions, e.g. ``"YX"``,
                ``"YXC"``, ``"CYX"``, ``"ZYX"``, ``"ZYXC"``, ``"TZYX"``; ``None`` infers
                them (:func:`~napari_lvunet.inference.infer_axes`).
            threshold: Foreground where the probability is above this (binary models);
                multi-class models take the most probable class and ignore it.
            sizing: ``"auto"`` (default): ``"resize"`` for any frame up to twice the
                largest training image, ``"tiles"`` beyond. ``"resize"``: each frame is
                resized whole to the training size, as the model saw its training
                images. ``"tiles"``: overlapping ``tile_size`` tiles, blended with smooth
                weights, at the scale the model was trained at (native resolution for
                weights that do not record it). See :mod:`~napari_lvunet.inference.tiling`.
            output: ``"semantic"``: 0/1 (binary) or class indices. ``"instances"``:
                connected components of each class (full connectivity, over Z, Y, X;
                each time point on its own), numbered 1..N per time point.
            return_probabilities: Also return the probabilities.
            batch_size: Network inputs (frames or tiles) per forward pass, at most. On
                the CPU a batch holds at most 2^19 pixels (8 frames at 256 px, 2 tiles
                at 512 px), since larger batches there only cost memory.
            tile_size: Tile height and width for ``"tiles"`` and ``"auto"``, a multiple
                of 128.
            overlap: Fraction of a tile shared with its neighbour, in [0, 1).
            progress: Called as ``progress(done, total)`` after every batch, counting
                network inputs (frames or tiles).
            cancel: A cancel token (``is_set()``, e.g. ``threading.Event``), checked
                before every batch.

        Returns:
            ``labels``, with ``image``'s non-channel axes in their order: uint8 for
            ``"semantic"``; for ``"instances"`` the smallest of uint8, uint16 or int32
            that holds the largest instance number. With ``return_probabilities``,
            ``(labels, probabilities)``: float32, ``labels.shape`` for a binary model
            (foreground probability), ``(num_classes, *labels.shape)`` otherwise.

        Raises:
            ValueError: For an empty image, a zero-size axis, NaN or infinite values, an
                unsupported dtype (bool, complex, object, text), more than 4
                spatial/stack dimensions, ambiguous or bad ``axes``, or bad options.
            ModelOutputError: If the model's outputs are NaN or infinite.
            SegmentationCancelled: If ``cancel`` was set.
        """
        image = check_image(image)
        shape = tuple(int(n) for n in image.shape)
        axes = infer_axes(shape) if axes is None else check_axes(axes, shape)
        if sizing not in SIZINGS:
            raise ValueError(f"sizing must be one of {SIZINGS}, got {sizing!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be 'semantic' or 'instances', got {output!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sizing != "resize":
            if tile_size < SIZE_DIVISOR or tile_size % SIZE_DIVISOR:
                raise ValueError(f"tile_size must be a positive multiple of 128, got {tile_size}")
            if not 0.0 <= overlap < 1.0:
                raise ValueError(f"overlap must be in [0, 1), got {overlap}")

        stack_axes = [a for a in STACK_AXES if a in axes]
        stack_shape = tuple(shape[axes.index(a)] for a in stack_axes)
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        n_frames = math.prod(stack_shape)
        c = self.num_classes
        labels = np.zeros((*stack_shape, height, width), np.uint8 if c <= 256 else np.uint16)
        probs = (
            np.zeros((c, *stack_shape, height, width), np.float32) if return_probabilities else None
        )
        geometry = plan(
            sizing,
            height,
            width,
            train_size=self.train_size,
            source_size=self.source_size,
            source_size_max=self.source_size_max,
            tile_size=tile_size,
            overlap=overlap,
        )
        total = n_frames * geometry.items_per_frame
        done = 0
        frames = (
            _read_frame(image, axes, stack_axes, index, n_frames > 1)
            for index in np.ndindex(*stack_shape)
        )
        per_batch = int(batch_size)
        if self.device == "cpu":
            # On a CPU, batching large inputs gains nothing and costs memory: 512 px tiles
            # ran fastest one or two at a time (ONNX Runtime, 2 cores), 256 px frames by 8.
            per_batch = max(1, min(per_batch, _CPU_BATCH_PIXELS // geometry.input_pixels))
        for batch in _batched(geometry.items(frames), per_batch):
            check_cancelled(cancel, SegmentationCancelled, "segmentation cancelled")
            logits = self._logits(np.stack([item.pixels for item in batch]))
            check_finite(logits, batch[0].frame.where)
            for item, item_logits in zip(batch, logits, strict=True):
                finished = geometry.accumulate(item, item_logits, c)
                if finished is not None:
                    frame, values, are_logits = finished
                    frame_probs = None if probs is None else probs[(slice(None), *frame.index)]
                    finish(
                        values, are_logits, frame, c, threshold, labels[frame.index], frame_probs
                    )
            done += len(batch)
            if progress is not None:
                progress(done, total)

        if output == "instances":
            labels = instances(labels, has_time="T" in stack_axes)
        # Back to the image's own axis order (without C).
        canonical = [*stack_axes, "Y", "X"]
        order = [a for a in axes if a != "C"]
        perm = [canonical.index(a) for a in order]
        labels = np.ascontiguousarray(labels.transpose(perm))
        if probs is None:
            return labels
        probs = probs.transpose([0, *(p + 1 for p in perm)])
        probs = np.ascontiguousarray(probs[0] if c == 1 else probs)
        return labels, probs


def _read_frame(
    image: Any, axes: str, stack_axes: list[str], index: tuple[int, ...], in_stack: bool
) -> Frame:
    """Read one 2D frame, channel-last, as stored (converted per network input)."""
    where = dict(zip(stack_axes, index, strict=True))
    selection = tuple(where.get(a, slice(None)) for a in axes)
    kept = [a for a in axes if a not in where]  # Y, X and maybe C, in image order
    frame = np.asarray(image[selection])
    frame = frame.transpose([kept.index(a) for a in ("Y", "X", "C") if a in kept])
    label = ", ".join(f"{a}={i}" for a, i in where.items()) if in_stack else ""
    return Frame(index=index, where=label, raw=frame, height=frame.shape[0], width=frame.shape[1])


def _size(value: Any) -> tuple[int, int] | None:
    return (int(value[0]), int(value[1])) if value else None


def _train_size(metadata: dict[str, Any]) -> tuple[int, int]:
    size = metadata.get("train_size", TRAIN_SIZE)
    try:
        height, width = (int(n) for n in size)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"train_size in the weights' metadata is not (height, width): {size!r}"
        ) from err
    if (
        height < SIZE_DIVISOR
        or width < SIZE_DIVISOR
        or height % SIZE_DIVISOR
        or width % SIZE_DIVISOR
    ):
        raise ValueError(f"train_size {height}x{width} is not a multiple of {SIZE_DIVISOR}")
    return height, width


def _batched(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
