"""napari-lvunet: LV-UNet segmentation in napari, with the training code to refit it.

Importing the package imports no PyTorch: the network (``LVUNet``, ``lvunet``,
``reparameterize_model``) is loaded from :mod:`napari_lvunet.model` on first access, so
CPU inference, the napari widget and the CLI start without it.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["LVUNet", "__version__", "lvunet", "reparameterize_model"]

_MODEL_NAMES = frozenset({"LVUNet", "lvunet", "reparameterize_model"})


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
