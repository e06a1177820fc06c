"""The LV-UNet network: fusible blocks, the encoder-decoder, re-parameterization."""

from .fusible import FusibleBlock, SeriesActivation
from .lvunet import SIZE_DIVISOR, LVUNet, lvunet, reparameterize_model

__all__ = [
    "SIZE_DIVISOR",
    "FusibleBlock",
    "LVUNet",
    "SeriesActivation",
    "lvunet",
    "reparameterize_model",
]
