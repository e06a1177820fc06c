"""Backends: what runs the network on a batch. One protocol, one place that chooses.

A backend is one module here with ``NAME``, ``unsupported(device, bf16, source)`` (why it
cannot run this, or ``None``) and ``create(source, device, bf16, num_threads, cache_dir)``
returning a :class:`Runner`; adding one (OpenVINO, TensorRT) is a new module and its name
in :data:`ORDER`.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ...weights import WeightsError

if TYPE_CHECKING:
    from ..source import ModelSource

__all__ = ["BACKENDS", "ORDER", "DeviceOutOfMemory", "Runner", "create_runner"]

logger = logging.getLogger(__name__)

#: Backends in order of preference for ``backend="auto"``.
ORDER = ("onnxruntime", "torch")
#: What ``backend=`` accepts.
BACKENDS = ("auto", *ORDER)


class DeviceOutOfMemory(RuntimeError):  # noqa: N818 - reads as what happened
    """A GPU ran out of memory; the segmenter moves to the CPU."""


class Runner(Protocol):
    """Runs the network: RGB in [0, 1] ``(N, 3, H, W)`` float32 -> logits ``(N, C, H, W)``."""

    backend: str
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def create_runner(
    source: ModelSource,
    *,
    device: str,
    backend: str = "auto",
    bf16: bool = False,
    num_threads: int | None = None,
    cache_dir: Any = None,
) -> Runner:
    """The runner for ``source`` on ``device``.

    ``backend="auto"`` takes the first backend of :data:`ORDER` that supports the
    combination; where it fails to start (no onnxruntime, a graph that cannot be made) it
    warns and falls back to the next. A damaged file is raised, never worked around. A
    named backend is used or refused, never replaced.

    Raises:
        ValueError: For an unknown backend, or one that cannot run this combination.
        ImportError: If a named backend's package is missing.
        napari_lvunet.weights.WeightsError: If a file fails its integrity check.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend != "auto":
        module = _module(backend)
        problem = module.unsupported(device, bf16, source)
        if problem is not None:
            raise ValueError(problem)
        return module.create(source, device, bf16, num_threads, cache_dir)
    candidates = [n for n in ORDER if _module(n).unsupported(device, bf16, source) is None]
    if not candidates:
        raise ValueError(f"no backend can run this model on {device}")
    for position, name in enumerate(candidates):
        try:
            return _module(name).create(source, device, bf16, num_threads, cache_dir)
        except WeightsError:
            raise  # a damaged file is reported, never worked around
        except Exception as err:
            if position == len(candidates) - 1:
                raise
            following = candidates[position + 1]
            warnings.warn(
                f"could not start the {name} backend ({err}); running with {following}, "
                "which is slower on the CPU",
                RuntimeWarning,
                3,
            )
    raise AssertionError("unreachable")
