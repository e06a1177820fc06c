"""The inference engine: numpy image in, labels out. No napari, no Qt.

:class:`Segmenter` holds one model ready to run (fused, on its device, with its ONNX
Runtime session when it runs on the CPU) and segments any image napari's image layers
hold; :func:`segment` is the one-call form.

Pipeline for every 2D frame (a stack is cut into frames, batched across frames)::

    frame -> preprocess.to_unit_rgb (RGB in [0, 1]) -> resize to the training size,
    or cut into overlapping tiles -> preprocess.normalize -> network (logits)
    (in the ONNX Runtime graph, the same normalize function is traced in front of the
    network, so that a CPU run needs no PyTorch op per image)
    -> sigmoid / softmax -> resize back, or blend the tiles -> threshold / argmax
    -> labels (optionally connected components)

Axes. ``axes`` names the image's dimensions with the letters ``T Z Y X C`` (napari's
order is e.g. ``"TZYXC"``; any order is accepted, each letter at most once, ``Y`` and
``X`` required). Without ``axes`` the layout is inferred:

* 2D: ``YX``.
* 3D: ``YXC`` if the last dimension is 1, 3 or 4 (grayscale, RGB, RGBA), else ``ZYX``.
  A small *first* dimension (3 or 4) is ambiguous (a 3-slice stack or channel-first
  RGB): it is read as a stack; pass ``axes="CYX"`` for channel-first colour.
* 4D: ``ZYXC`` if the last dimension is 1, 3 or 4, else ``TZYX``.
* 5D: ``TZYXC`` if the last dimension is 1, 3 or 4; anything else is refused.

Outputs keep the image's non-channel axes in the image's order.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .export import INPUT_NAME, OUTPUT_NAME, export_onnx, fused_cpu_copy
from .model import SIZE_DIVISOR, LVUNet
from .preprocess import TRAIN_SIZE, normalize, resize, to_unit_rgb

__all__ = [
    "SegmentationCancelled",
    "Segmenter",
    "bf16_supported",
    "infer_axes",
    "resolve_device",
    "segment",
    "state_dict_sha256",
]

logger = logging.getLogger(__name__)

Sizing = Literal["resize", "tiles"]
Output = Literal["semantic", "instances"]
Backend = Literal["auto", "onnxruntime", "torch"]

_AXIS_LETTERS = "TZYXC"
_STACK_AXES = "TZ"  # canonical order of the leading (stack) axes
_CHANNEL_SIZES = (1, 3, 4)  # grayscale, RGB, RGBA
_BACKENDS = ("auto", "onnxruntime", "torch")
# Bumped whenever export_onnx changes the graph it writes, so that stale cached files
# are never reused.
_ONNX_CACHE_VERSION = 3
# Largest CPU batch, in pixels (see Segmenter.segment's batch_size).
_CPU_BATCH_PIXELS = 1 << 19


class SegmentationCancelled(Exception):  # noqa: N818 - the name others code against
    """Raised by :meth:`Segmenter.segment` when its ``cancel`` event is set."""


class _CancelEvent(Protocol):
    def is_set(self) -> bool: ...


class _LoadedModelLike(Protocol):
    model: LVUNet
    metadata: dict[str, Any]
    sha256: str
    path: Path


# --------------------------------------------------------------------------- device


def resolve_device(device: str = "auto", *, strict: bool = False) -> str:
    """Pick the device to run on.

    Args:
        device: ``"auto"`` (CUDA, then Apple MPS, then CPU), ``"cuda"``, ``"cuda:N"``,
            ``"mps"`` or ``"cpu"``.
        strict: Raise instead of falling back to the CPU when the GPU asked for is
            missing (training: hours on the CPU are not a silent fallback).

    Returns:
        The device that will be used. A GPU that was asked for but is not available
        gives ``"cpu"`` and a ``RuntimeWarning`` (a ``ValueError`` when ``strict``).

    Raises:
        ValueError: If ``device`` is not one of the forms above.
    """
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return "cpu"
    if name == "mps":
        if _mps_available():
            return "mps"
        return _fall_back("Apple MPS is not available here", strict)
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            return _fall_back("no CUDA GPU is available", strict)
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            return _fall_back(
                f"{name} does not exist ({torch.cuda.device_count()} CUDA devices)", strict
            )
        return name
    raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _fall_back(problem: str, strict: bool) -> str:
    if strict:
        raise ValueError(problem)
    warnings.warn(f"{problem}; running on the CPU", RuntimeWarning, 3)
    return "cpu"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def bf16_supported(device: str) -> bool:
    """Whether ``device`` (a :func:`resolve_device` result) runs bfloat16 natively.

    On the CPU that needs AVX512-BF16 or AMX instructions; elsewhere oneDNN emulates bf16
    and is slower than float32.
    """
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device == "cpu":
        cpu = torch.cpu
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, probe, lambda: False)() for probe in probes)
    return device == "mps"


# --------------------------------------------------------------------------- axes


def infer_axes(shape: tuple[int, ...]) -> str:
    """The axes string :meth:`Segmenter.segment` assumes for an image of ``shape``.

    See the module docstring for the rule.

    Args:
        shape: The image's shape.

    Returns:
        An axes string such as ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"ZYXC"``, ``"TZYX"``.

    Raises:
        ValueError: For fewer than 2 or more than 4 spatial/stack dimensions.
    """
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"an image needs at least 2 dimensions (Y, X), got shape {shape}")
    channel_last = shape[-1] in _CHANNEL_SIZES
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "YXC" if channel_last else "ZYX"
    if ndim == 4:
        return "ZYXC" if channel_last else "TZYX"
    if ndim == 5 and channel_last:
        return "TZYXC"
    raise ValueError(
        f"image of shape {shape} has more than 4 spatial/stack dimensions "
        "(at most T, Z, Y, X plus a channel axis)"
    )


def _check_axes(axes: str, shape: tuple[int, ...]) -> str:
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes!r} has {len(axes)} letters but the image has shape {shape}")
    bad = sorted(set(axes) - set(_AXIS_LETTERS))
    if bad:
        raise ValueError(f"axes {axes!r}: unknown letters {bad}; use T, Z, Y, X and C")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} repeats a letter")
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes!r} must contain Y and X")
    if "C" in axes and shape[axes.index("C")] not in _CHANNEL_SIZES:
        raise ValueError(
            f"the channel axis has {shape[axes.index('C')]} channels; expected 1 (grayscale), "
            "3 (RGB) or 4 (RGBA)"
        )
    return axes


def _check_image(image: Any) -> Any:
    """Validate everything that can be checked without reading pixels."""
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


# --------------------------------------------------------------------------- caching


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 over a model's state dict: every tensor's name, dtype, shape and bytes.

    The same digest as a weights file's ``tensors_sha256`` for the same tensors.

    Args:
        model: Any module.

    Returns:
        The digest; equal for two models exactly when they hold equal tensors.
    """
    from .weights import tensors_sha256

    return tensors_sha256(model.state_dict())


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _default_cache_dir() -> Path:
    # The weights module owns the user cache folder (and its environment variable).
    from .weights import cache_dir

    return Path(cache_dir()) / "onnx"


# --------------------------------------------------------------------------- runners


class _TorchRunner:
    """Runs the model with PyTorch: inference mode, channels_last, optional bf16."""

    def __init__(self, model: LVUNet, device: str, bf16: bool) -> None:
        self.device = device
        self.bf16 = bf16
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, C, H, W)`` for RGB in [0, 1] ``(N, 3, H, W)``."""
        x = normalize(torch.from_numpy(batch)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        # Autocast only when asked: not every torch build has it for every device type.
        precision = (
            torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), precision:
            return self.model(x).float().cpu().numpy()


class _OrtRunner:
    """Runs the fused model's ONNX export (normalisation included) with ONNX Runtime."""

    def __init__(self, onnx_path: Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX Runtime threads otherwise spin on the cores for a while after every
        # run, and starve whatever runs next: PyTorch's threads, another session, napari.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.path = onnx_path

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, C, H, W)`` for RGB in [0, 1] ``(N, 3, H, W)``."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


# --------------------------------------------------------------------------- tiling


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


# --------------------------------------------------------------------------- frames


@dataclass
class _Frame:
    """One 2D frame in flight: its pixels, pending tiles and accumulators."""

    index: tuple[int, ...]
    where: str  # "Z=3, T=1" for error messages; "" for a single image
    raw: np.ndarray | None  # (H, W[, C]) as stored; dropped once all inputs are queued
    height: int
    width: int
    pending: int = 0
    probs: np.ndarray | None = None  # (C, H, W) blended probabilities

    def unit(self, region: tuple[slice, slice] | None = None) -> np.ndarray:
        """``to_unit_rgb`` of the frame, or of a region of it, naming the frame on error.

        A region is converted on its own only for uint8, whose scaling (/255) is per
        pixel; any other dtype is min-max scaled over the whole frame, so it is always
        converted whole (and then sliced).
        """
        assert self.raw is not None
        try:
            if region is not None and self.raw.dtype == np.uint8:
                return to_unit_rgb(self.raw[region])
            unit = to_unit_rgb(self.raw)
        except ValueError as err:
            if not self.where:
                raise
            raise ValueError(f"frame {self.where}: {err}") from err
        return unit if region is None else unit[region]


@dataclass
class _Item:
    """One network input: a resized frame or a tile, with where its output goes."""

    frame: _Frame
    pixels: np.ndarray  # (3, h, w) float32 in [0, 1]
    y: int = 0
    x: int = 0


class Segmenter:
    """An LV-UNet ready to segment images: fused, on its device, with its backend.

    Build it once per model and device and call :meth:`segment` as often as needed (the
    napari widget's live preview calls it on every slice change): the ONNX export, the
    ONNX Runtime session and the device copy of the model are made here, once.

    Args:
        model: An :class:`~napari_lvunet.model.LVUNet` (fused; or unfused at
            ``act_learn == 1``, fused here on a copy; or unfused at ``act_learn < 1``, run
            as it is with PyTorch), or a loaded weights object with ``.model``,
            ``.metadata``, ``.sha256`` and ``.path`` (``napari_lvunet.weights.LoadedModel``).
            The caller's model is never modified or moved.
        device: See :func:`resolve_device`.
        backend: ``"auto"``: ONNX Runtime on the CPU when it is installed and the model
            can be fused, else PyTorch; PyTorch on CUDA and MPS. ``"onnxruntime"`` or
            ``"torch"`` force one (ONNX Runtime only on the CPU).
        bf16: Run PyTorch in bfloat16 autocast (opt-in; CPUs with AVX512-BF16/AMX, CUDA,
            MPS). Implies the PyTorch backend under ``backend="auto"``. Where bf16 is not
            supported it warns and runs in float32.
        cache_dir: Folder for the ONNX export when the weights' own folder is not
            writable, or the model has no file. Default: ``<weights cache>/onnx``.
        num_threads: CPU threads ONNX Runtime may use (default: one per physical core);
            e.g. leave one core to napari. PyTorch uses its process-wide setting
            (``torch.set_num_threads``).

    Attributes:
        device: The device actually used (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).
        backend: ``"onnxruntime"`` or ``"torch"``.
        num_classes: The model's output classes.
        train_size: ``(height, width)`` the ``"resize"`` policy resizes to.
        onnx_path: The ONNX file in use (``None`` on the PyTorch backend).

    Raises:
        TypeError: If ``model`` is neither an LV-UNet nor a loaded weights object.
        ValueError: For an unknown backend or device, an impossible combination (ONNX
            Runtime on a GPU, or for a model that cannot be fused), or a training size
            that is not a multiple of 128.
        ImportError: If ``backend="onnxruntime"`` and onnxruntime is not installed.
    """

    def __init__(
        self,
        model: LVUNet | _LoadedModelLike,
        *,
        device: str = "auto",
        backend: Backend = "auto",
        bf16: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {_BACKENDS}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._num_threads = num_threads
        weights_path: Path | None = None
        metadata: dict[str, Any] = {}
        if not isinstance(model, LVUNet):
            inner = getattr(model, "model", None)
            if not isinstance(inner, LVUNet):
                raise TypeError(
                    "expected an LVUNet or loaded weights (with .model), "
                    f"got {type(model).__name__}"
                )
            weights_path = Path(model.path) if getattr(model, "path", None) else None
            metadata = dict(getattr(model, "metadata", None) or {})
            model = inner
        self.num_classes = int(model.num_classes)
        self.train_size = _train_size(metadata)
        self.device = resolve_device(device)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._weights_path = weights_path
        self._requested_backend = backend
        self.onnx_path: Path | None = None

        fusible = model.fused or model.act_learn == 1.0
        if bf16 and not bf16_supported(self.device):
            warnings.warn(
                f"bf16 is not supported on this {self.device}; running in float32",
                RuntimeWarning,
                2,
            )
            bf16 = False
        self.bf16 = bf16
        if backend == "onnxruntime":
            if self.device != "cpu":
                raise ValueError(
                    f"the onnxruntime backend runs on the CPU, not {self.device}: "
                    "use device='cpu' or backend='torch'"
                )
            if not fusible:
                raise ValueError(
                    f"the onnxruntime backend runs the fused model, and this model cannot be "
                    f"fused (act_learn={model.act_learn}, not 1): use backend='torch'"
                )
            if bf16:
                raise ValueError("bf16 runs on the torch backend: use backend='torch'")
        if fusible:
            self._model = fused_cpu_copy(model)
        else:
            # Still deep training (act_learn < 1): only PyTorch can run it as it is. A copy,
            # so that the caller's model keeps its device and train/eval mode.
            logger.info(
                "model is unfused at act_learn=%s: running it with PyTorch", model.act_learn
            )
            self._model = copy.deepcopy(model).float().eval()

        want_ort = backend == "onnxruntime" or (
            backend == "auto" and self.device == "cpu" and fusible and not bf16
        )
        self._runner: _TorchRunner | _OrtRunner
        if want_ort:
            self._runner = self._ort_runner(strict=backend == "onnxruntime")
        else:
            self._runner = _TorchRunner(self._model, self.device, bf16)
        self.backend = "onnxruntime" if isinstance(self._runner, _OrtRunner) else "torch"
        logger.info("LV-UNet segmenter: device=%s backend=%s", self.device, self.backend)

    # ----------------------------------------------------------------- backends

    def _ort_runner(self, *, strict: bool) -> _TorchRunner | _OrtRunner:
        """An ONNX Runtime runner; with ``strict=False`` fall back to PyTorch on failure."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            if strict:
                raise ImportError(
                    "backend='onnxruntime' needs the onnxruntime package (pip install onnxruntime)"
                ) from err
            logger.info("onnxruntime is not installed: running with PyTorch on the CPU")
            return _TorchRunner(self._model, "cpu", False)
        try:
            return self._onnx_session()
        except Exception as err:  # export or session failures must not stop segmentation
            if strict:
                raise
            warnings.warn(
                f"could not prepare the ONNX Runtime model ({err}); running with PyTorch, "
                "which is slower on the CPU",
                RuntimeWarning,
                3,
            )
            return _TorchRunner(self._model, "cpu", False)

    def _onnx_session(self) -> _OrtRunner:
        """A session on the cached ONNX export of the fused model, exported on first use.

        The file is keyed by the SHA-256 of the fused tensors actually run (not by a file
        name or path), so a model whose values changed can never reuse a stale export. It
        lives beside the weights file when that folder is writable, else in the cache
        folder; a cached file that does not load is exported again.
        """
        key = state_dict_sha256(self._model)[:16]
        stem = self._weights_path.stem if self._weights_path is not None else "lvunet"
        name = f"{stem}.{key}.v{_ONNX_CACHE_VERSION}.onnx"
        folders = [] if self._weights_path is None else [self._weights_path.parent]
        folders.append(self._cache_dir if self._cache_dir is not None else _default_cache_dir())
        for folder in folders:
            path = folder / name
            if path.is_file():
                try:
                    runner = _OrtRunner(path, self._num_threads)
                except Exception as err:
                    logger.warning("cached ONNX file %s is unusable (%s); re-exporting", path, err)
                else:
                    self.onnx_path = path
                    return runner
        for folder in folders:
            if _writable_dir(folder):
                path = export_onnx(self._model, folder / name, include_normalization=True)
                runner = _OrtRunner(path, self._num_threads)
                self.onnx_path = path
                return runner
        raise OSError(f"no writable folder for the ONNX export among {[str(f) for f in folders]}")

    def _switch_to_cpu(self, reason: str) -> None:
        warnings.warn(f"{reason}; continuing on the CPU", RuntimeWarning, 4)
        self._model.to("cpu")
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.device = "cpu"
        if self._requested_backend == "auto" and self._model.fused:
            self._runner = self._ort_runner(strict=False)
        else:
            self._runner = _TorchRunner(self._model, "cpu", self.bf16 and bf16_supported("cpu"))
        self.backend = "onnxruntime" if isinstance(self._runner, _OrtRunner) else "torch"

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch in [0, 1]; a GPU out of memory moves everything to the CPU."""
        try:
            return self._runner(batch)
        except torch.OutOfMemoryError:
            if self.device == "cpu":
                raise
            self._switch_to_cpu(f"the GPU ({self.device}) ran out of memory")
            return self._runner(batch)

    # ----------------------------------------------------------------- segment

    def segment(
        self,
        image: Any,
        *,
        axes: str | None = None,
        threshold: float = 0.5,
        sizing: Sizing = "resize",
        output: Output = "semantic",
        return_probabilities: bool = False,
        batch_size: int = 8,
        tile_size: int = 512,
        overlap: float = 0.25,
        progress: Callable[[int, int], object] | None = None,
        cancel: _CancelEvent | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment an image, a stack or a time series.

        Args:
            image: An array (numpy, or any array-like with ``shape``/``dtype`` and numpy
                indexing, such as the dask arrays napari holds): 2D grayscale, RGB/RGBA,
                stacks; integer or float, any range. uint8 is divided by 255 (the scale of
                the training images), any other dtype is min-max scaled per 2D frame.
            axes: Letters ``T Z Y X C`` naming ``image``'s dimensions, e.g. ``"YX"``,
                ``"YXC"``, ``"CYX"``, ``"ZYX"``, ``"ZYXC"``, ``"TZYX"``; ``None`` infers
                them (:func:`infer_axes`).
            threshold: Foreground where the probability is above this (binary models);
                multi-class models take the most probable class and ignore it.
            sizing: ``"resize"`` (default): each frame is resized to the training size
                (:attr:`train_size`), as the model saw its training images, and the
                probabilities are resized back. ``"tiles"``: native resolution, in
                overlapping ``tile_size`` tiles blended with smooth weights (for images
                whose detail a resize would destroy; memory stays bounded).
            output: ``"semantic"``: 0/1 (binary) or class indices. ``"instances"``:
                connected components of each class (full connectivity, over Z, Y, X;
                each time point on its own), numbered 1..N per time point.
            return_probabilities: Also return the probabilities.
            batch_size: Network inputs (frames or tiles) per forward pass, at most. On
                the CPU a batch holds at most 2^19 pixels (8 frames at 256 px, 2 tiles
                at 512 px), since larger batches there only cost memory.
            tile_size: Tile height and width for ``"tiles"``, a multiple of 128.
            overlap: Fraction of a tile shared with its neighbour, in [0, 1).
            progress: Called as ``progress(done, total)`` after every batch, counting
                network inputs (frames or tiles).
            cancel: An object with ``is_set()`` (e.g. ``threading.Event``), checked before
                every batch.

        Returns:
            ``labels``, with ``image``'s non-channel axes in their order: uint8 for
            ``"semantic"``; for ``"instances"`` the smallest of uint8, uint16 or int32
            that holds the largest instance number. With ``return_probabilities``,
            ``(labels, probabilities)``: float32, ``labels.shape`` for a binary model
            (foreground probability), ``(num_classes, *labels.shape)`` otherwise.

        Raises:
            ValueError: For an empty image, a zero-size axis, NaN or infinite values, an
                unsupported dtype (bool, complex, object, text), more than 4
                spatial/stack dimensions, bad ``axes``, or bad options.
            SegmentationCancelled: If ``cancel`` was set.
        """
        image = _check_image(image)
        shape = tuple(int(n) for n in image.shape)
        axes = infer_axes(shape) if axes is None else _check_axes(axes, shape)
        if sizing not in ("resize", "tiles"):
            raise ValueError(f"sizing must be 'resize' or 'tiles', got {sizing!r}")
        if output not in ("semantic", "instances"):
            raise ValueError(f"output must be 'semantic' or 'instances', got {output!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sizing == "tiles":
            if tile_size < SIZE_DIVISOR or tile_size % SIZE_DIVISOR:
                raise ValueError(f"tile_size must be a positive multiple of 128, got {tile_size}")
            if not 0.0 <= overlap < 1.0:
                raise ValueError(f"overlap must be in [0, 1), got {overlap}")

        stack_axes = [a for a in _STACK_AXES if a in axes]
        stack_shape = tuple(shape[axes.index(a)] for a in stack_axes)
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        n_frames = math.prod(stack_shape)
        c = self.num_classes
        labels = np.zeros((*stack_shape, height, width), np.uint8 if c <= 256 else np.uint16)
        probs = (
            np.zeros((c, *stack_shape, height, width), np.float32) if return_probabilities else None
        )

        if sizing == "resize":
            geometry = _ResizeGeometry(self.train_size)
        else:
            stride = tile_size - round(overlap * tile_size)
            geometry = _TileGeometry(tile_size, stride, height, width)
        total = n_frames * geometry.items_per_frame
        done = 0
        frames = (
            self._read_frame(image, axes, stack_axes, index, n_frames > 1)
            for index in np.ndindex(*stack_shape)
        )
        per_batch = int(batch_size)
        if self.device == "cpu":
            # On a CPU, batching large inputs gains nothing and costs memory: 512 px tiles
            # ran fastest one or two at a time (ONNX Runtime, 2 cores), 256 px frames by 8.
            per_batch = max(1, min(per_batch, _CPU_BATCH_PIXELS // geometry.input_pixels))
        for batch in _batched(geometry.items(frames), per_batch):
            if cancel is not None and cancel.is_set():
                raise SegmentationCancelled("segmentation cancelled")
            logits = self._logits(np.stack([item.pixels for item in batch]))
            for item, item_logits in zip(batch, logits, strict=True):
                finished = geometry.accumulate(item, item_logits, c)
                if finished is not None:
                    frame, frame_probs = finished
                    labels[frame.index] = _to_labels(frame_probs, threshold)
                    if probs is not None:
                        probs[(slice(None), *frame.index)] = frame_probs
            done += len(batch)
            if progress is not None:
                progress(done, total)

        if output == "instances":
            labels = _instances(labels, has_time="T" in stack_axes)
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
        self, image: Any, axes: str, stack_axes: list[str], index: tuple[int, ...], in_stack: bool
    ) -> _Frame:
        """Read one 2D frame, channel-last, as stored (converted per network input)."""
        where = dict(zip(stack_axes, index, strict=True))
        selection = tuple(where.get(a, slice(None)) for a in axes)
        kept = [a for a in axes if a not in where]  # Y, X and maybe C, in image order
        frame = np.asarray(image[selection])
        frame = frame.transpose([kept.index(a) for a in ("Y", "X", "C") if a in kept])
        label = ", ".join(f"{a}={i}" for a, i in where.items()) if in_stack else ""
        return _Frame(
            index=index, where=label, raw=frame, height=frame.shape[0], width=frame.shape[1]
        )


# --------------------------------------------------------------------------- geometry


class _ResizeGeometry:
    """``"resize"``: one network input per frame, at the training size."""

    items_per_frame = 1

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.input_pixels = size[0] * size[1]

    def items(self, frames: Iterator[_Frame]) -> Iterator[_Item]:
        for frame in frames:
            pixels = torch.from_numpy(frame.unit()).permute(2, 0, 1)[None]
            frame.raw = None
            frame.pending = 1
            yield _Item(frame, resize(pixels, self.size)[0].numpy())

    def accumulate(
        self, item: _Item, logits: np.ndarray, num_classes: int
    ) -> tuple[_Frame, np.ndarray]:
        frame = item.frame
        # Resized back as logits (smooth, unbounded), then squashed: bilinear on
        # probabilities would blur the decision boundary's position.
        full = F.interpolate(
            torch.from_numpy(logits)[None],
            size=(frame.height, frame.width),
            mode="bilinear",
            align_corners=False,
        )[0]
        return frame, _activate(full.numpy(), num_classes)


class _TileGeometry:
    """``"tiles"``: overlapping native-resolution tiles, blended with smooth weights."""

    def __init__(self, tile: int, stride: int, height: int, width: int) -> None:
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

    def items(self, frames: Iterator[_Frame]) -> Iterator[_Item]:
        th, tw = self.tile_h, self.tile_w
        for frame in frames:
            # uint8 tiles are converted one by one, so an 8000 x 8000 RGB image never
            # exists as float32 (768 MB); other dtypes need the whole frame's range.
            whole = None if frame.raw is not None and frame.raw.dtype == np.uint8 else frame.unit()
            frame.pending = self.items_per_frame
            for y in self.ys:
                for x in self.xs:
                    region = (slice(y, y + th), slice(x, x + tw))
                    unit = frame.unit(region) if whole is None else whole[region]
                    tile = _pad_to(unit, th, tw)
                    yield _Item(frame, np.ascontiguousarray(tile.transpose(2, 0, 1)), y, x)
            frame.raw = None

    def accumulate(
        self, item: _Item, logits: np.ndarray, num_classes: int
    ) -> tuple[_Frame, np.ndarray] | None:
        frame = item.frame
        h = min(self.tile_h, self.height - item.y)
        w = min(self.tile_w, self.width - item.x)
        p = _activate(logits[:, :h, :w], num_classes)
        if self.items_per_frame == 1:
            return frame, p
        if frame.probs is None:
            frame.probs = np.zeros((num_classes, self.height, self.width), np.float32)
        region = (slice(None), slice(item.y, item.y + h), slice(item.x, item.x + w))
        frame.probs[region] += p * self._wy[item.y][:, None] * self._wx[item.x][None, :]
        frame.pending -= 1
        if frame.pending:
            return None
        probs, frame.probs = frame.probs, None
        # Every tile's weight is wy (x) wx on a product grid of tiles, so the sum of the
        # weights is the outer product of the 1D sums: no (H, W) weight image is needed.
        probs /= self._sum_y[None, :, None]
        probs /= self._sum_x[None, None, :]
        return frame, probs


# --------------------------------------------------------------------------- helpers


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


def _activate(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """Sigmoid or softmax over the class axis, in numpy: torch's multi-threaded
    elementwise kernels stall for milliseconds on a busy CPU, numpy's do not."""
    from scipy.special import expit, softmax

    return expit(logits) if num_classes == 1 else softmax(logits, axis=0)


def _to_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    if probs.shape[0] == 1:
        return probs[0] > threshold
    return probs.argmax(axis=0)


def _instances(semantic: np.ndarray, *, has_time: bool) -> np.ndarray:
    """Connected components of each class, numbered per time point."""
    from skimage.measure import label

    volumes = semantic if has_time else semantic[None]
    out = [label(volume, background=0) for volume in volumes]
    largest = max(int(v.max()) for v in out)
    dtype = np.uint8 if largest <= 0xFF else np.uint16 if largest <= 0xFFFF else np.int32
    stacked = np.stack([v.astype(dtype) for v in out])
    return stacked if has_time else stacked[0]


def _batched(items: Iterator[_Item], size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def segment(
    image: Any,
    model: LVUNet | _LoadedModelLike,
    *,
    device: str = "auto",
    backend: Backend = "auto",
    bf16: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment ``image`` with ``model`` in one call.

    Builds a :class:`Segmenter` (the ONNX export is cached on disk, so only the first
    call for a model pays for it) and calls :meth:`Segmenter.segment`.

    Args:
        image: See :meth:`Segmenter.segment`.
        model: See :class:`Segmenter`.
        device: See :func:`resolve_device`.
        backend: See :class:`Segmenter`.
        bf16: See :class:`Segmenter`.
        cache_dir: See :class:`Segmenter`.
        **kwargs: Passed to :meth:`Segmenter.segment` (``axes``, ``threshold``, ``sizing``,
            ``output``, ``return_probabilities``, ...).

    Returns:
        See :meth:`Segmenter.segment`.

    Raises:
        ValueError: See :class:`Segmenter` and :meth:`Segmenter.segment`.
    """
    segmenter = Segmenter(model, device=device, backend=backend, bf16=bf16, cache_dir=cache_dir)
    return segmenter.segment(image, **kwargs)
