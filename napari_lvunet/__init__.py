"""napari-lvunet: LV-UNet segmentation in napari, with the training code to refit it."""

from .model import LVUNet, lvunet, reparameterize_model

__version__ = "0.1.0"
__all__ = ["LVUNet", "__version__", "lvunet", "reparameterize_model"]
