"""Which device to run on, decided without importing PyTorch where it is not needed.

On a machine without a GPU, ``"auto"`` answers ``"cpu"`` from the system alone, so CPU
inference (and the napari process) never imports torch. Only where a GPU may exist is
torch asked, through :func:`napari_lvunet._torch.import_torch` with triton kept out.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings

from .._torch import import_torch, torch_installed

__all__ = ["bf16_supported", "gpu_may_exist", "resolve_device"]


def gpu_may_exist() -> bool:
    """Whether this machine may have a GPU torch can use; answered without torch.

    True when torch is installed and there is an NVIDIA driver (Linux: its ``/proc``
    entry or device node; elsewhere: ``CUDA_PATH`` or ``nvidia-smi`` on PATH) or an
    Apple-silicon Mac (MPS). False means "certainly the CPU".
    """
    if not torch_installed():
        return False
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0"):
        return True
    import shutil

    return sys.platform != "linux" and bool(
        os.environ.get("CUDA_PATH") or shutil.which("nvidia-smi")
    )


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
        napari_lvunet._torch.MissingTorchError: If a GPU is asked for and torch is not
            installed.
    """
    name = str(device).strip().lower()
    if name == "cpu":
        return "cpu"
    if name == "auto":
        if not gpu_may_exist():
            return "cpu"
        torch = import_torch("GPU inference", gui_safe=True)
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available(torch) else "cpu"
    is_cuda = name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())
    if not (is_cuda or name == "mps"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    torch = import_torch(f"{name.upper()} inference", gui_safe=True)
    if name == "mps":
        if _mps_available(torch):
            return "mps"
        return _fall_back("Apple MPS is not available here", strict)
    if not torch.cuda.is_available():
        return _fall_back("no CUDA GPU is available", strict)
    if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
        return _fall_back(
            f"{name} does not exist ({torch.cuda.device_count()} CUDA devices)", strict
        )
    return name


def _fall_back(problem: str, strict: bool) -> str:
    if strict:
        raise ValueError(problem)
    warnings.warn(f"{problem}; running on the CPU", RuntimeWarning, 3)
    return "cpu"


def _mps_available(torch: object) -> bool:
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    return bool(mps is not None and mps.is_available())


def bf16_supported(device: str) -> bool:
    """Whether ``device`` (a :func:`resolve_device` result) runs bfloat16 natively.

    On the CPU that needs AVX512-BF16 or AMX instructions; elsewhere oneDNN emulates bf16
    and is slower than float32. Asks torch (bf16 runs on the torch backend only).
    """
    torch = import_torch("bf16 inference", gui_safe=True)
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    if device == "cpu":
        cpu = torch.cpu
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, probe, lambda: False)() for probe in probes)
    return device == "mps"
