"""The one place that imports PyTorch for code that must also run without it.

CPU inference, the napari widget, the sample data and ``napari-lvunet segment`` never
import torch. GPU inference and training do, through :func:`import_torch`, which

* names the exact ``pip install`` line when torch is missing, and
* keeps triton out of the process when asked (``gui_safe``): torchvision imports triton
  when it is installed, and triton's bundled LLVM crashes a process whose OpenGL driver
  (Mesa with llvmpipe, as on virtual machines, remote desktops and many laptops) has
  already loaded its own libLLVM: napari segfaults. Eager inference never needs triton.
"""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["TRAIN_INSTALL", "MissingTorchError", "import_torch", "torch_installed"]

#: The command that installs what training and GPU inference need.
TRAIN_INSTALL = "pip install 'napari-lvunet[train]'"


class MissingTorchError(ImportError):
    """PyTorch is needed for this and is not installed; the message says how to get it."""


def torch_installed() -> bool:
    """Whether PyTorch can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def import_torch(purpose: str, *, gui_safe: bool = False) -> ModuleType:
    """Import and return ``torch`` for ``purpose``.

    Args:
        purpose: What needs it, for the error message ("fine-tuning", "CUDA inference").
        gui_safe: Block triton (and so torch.compile) in this process unless it is
            already loaded: for processes that may run an OpenGL canvas.

    Raises:
        MissingTorchError: If PyTorch is not installed, with the install command.
    """
    if gui_safe and "triton" not in sys.modules:
        # A None entry makes `import triton` raise ImportError, which torch and
        # torchvision treat as "triton is not installed".
        sys.modules["triton"] = None  # type: ignore[assignment]
    try:
        import torch
    except ImportError as err:
        raise MissingTorchError(
            f"{purpose} needs PyTorch, which is not installed here; install it with: "
            f"{TRAIN_INSTALL}"
        ) from err
    return torch
