"""LV-UNet: a MobileNetV3-Large encoder and a decoder of fusible blocks.

Shapes for a 3 x H x W input (H, W multiples of 128)::

    encoder (torchvision mobilenet_v3_large().features[0:10])
      stage 0  features[0]     16 ch  1/2
      stage 1  features[1:3]   24 ch  1/4
      stage 2  features[3:6]   40 ch  1/8
      stage 3  features[6:10]  80 ch  1/16
    fusible encoder blocks (2x max-pool each)
      80 -> 160 (1/32) -> 240 (1/64) -> 480 (1/128)
    decoder (2x bilinear upsampling each, skips joined by addition)
      480 -> 240 (+ 1/64) -> 160 (+ 1/32) -> 80 (+ encoder 1/16)
      -> 40 (+ encoder 1/8) -> 24 (+ encoder 1/4) -> 16 (1/2) -> 16 (1/1)
    head: 1x1 conv 16 -> num_classes (logits)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

from ..preprocess import SIZE_DIVISOR  # H, W multiples of this (7 downsamplings)
from .fusible import FusibleBlock, fuse_conv_bn

__all__ = ["SIZE_DIVISOR", "LVUNet", "lvunet", "reparameterize_model"]

_ENCODER_SPLITS = ((0, 1), (1, 3), (3, 6), (6, 10))
_BLOCK_CHANNELS = (80, 160, 240, 480)
_SKIP_CHANNELS = (80, 40, 24, 16)


def _fold_batchnorms(module: nn.Module) -> None:
    """Fold every ``Conv2d -> BatchNorm2d`` pair inside Sequentials into the conv.

    In torchvision's MobileNetV3 every BatchNorm directly follows a bias-free convolution
    inside a ``Conv2dNormActivation`` (a Sequential); the BatchNorm becomes an Identity.
    """
    for child in module.children():
        _fold_batchnorms(child)
    if not isinstance(module, nn.Sequential):
        return
    layers = list(module)
    for i in range(len(layers) - 1):
        conv, bn = layers[i], layers[i + 1]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            weight, bias = fuse_conv_bn(conv.weight, conv.bias, bn)
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
            ).to(weight)
            with torch.no_grad():
                fused.weight.copy_(weight)
                fused.bias.copy_(bias)
            module[i] = fused
            module[i + 1] = nn.Identity()


def _build_encoder(weights: MobileNet_V3_Large_Weights | None) -> nn.ModuleList:
    try:
        features = mobilenet_v3_large(weights=weights).features
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise RuntimeError(
            f"could not load the ImageNet weights {weights} for the MobileNetV3-Large "
            f"encoder ({err}). They are downloaded on first use: connect to the internet "
            "once, or place the file in $TORCH_HOME/hub/checkpoints, or build the model "
            "with weights=None."
        ) from err
    return nn.ModuleList(features[a:b] for a, b in _ENCODER_SPLITS)


class LVUNet(nn.Module):
    """LV-UNet (Jiang et al., IEEE BIBM 2024) for binary or multi-class segmentation.

    Args:
        num_classes: Output channels; 1 for binary (sigmoid), more for softmax classes.
        act_num: Half-width n of the series activations' (2n+1)x(2n+1) kernels.
        fused: Build the deployment form directly (all blocks fused, encoder BatchNorms
            folded), the shape of :func:`reparameterize_model`'s output.
        weights: torchvision ``MobileNet_V3_Large_Weights`` for the encoder (downloads);
            ``None`` (default) initialises at random without any download.
    """

    def __init__(
        self,
        num_classes: int = 1,
        *,
        act_num: int = 1,
        fused: bool = False,
        weights: MobileNet_V3_Large_Weights | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if fused and weights is not None:
            raise ValueError(
                "weights= initialises a training model; a fused model loads its weights"
            )
        self.num_classes = num_classes
        self.act_num = act_num
        self.encoder = _build_encoder(weights)
        c = _BLOCK_CHANNELS
        self.down = nn.ModuleList(
            FusibleBlock(c[i], c[i + 1], "down", act_num, fused=fused) for i in range(3)
        )
        self.up = nn.ModuleList(
            FusibleBlock(c[3 - i], c[2 - i], "up", act_num, fused=fused) for i in range(3)
        )
        s = _SKIP_CHANNELS
        self.up_skip = nn.ModuleList(
            FusibleBlock(s[i], s[i + 1], "up", act_num, fused=fused) for i in range(3)
        )
        self.final = FusibleBlock(16, 16, "up", act_num, fused=fused)
        self.head = nn.Conv2d(16, num_classes, kernel_size=1)
        if fused:
            _fold_batchnorms(self.encoder)

    @property
    def fused(self) -> bool:
        return all(block.fused for block in self.fusible_blocks())

    @property
    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture (without weights)."""
        return {"num_classes": self.num_classes, "act_num": self.act_num, "fused": self.fused}

    def fusible_blocks(self) -> list[FusibleBlock]:
        return [m for m in self.modules() if isinstance(m, FusibleBlock)]

    def set_act_learn(self, value: float) -> None:
        """Set the deep-training slope of every fusible block (0 = ReLU, 1 = identity)."""
        for block in self.fusible_blocks():
            block.set_act_learn(value)

    @property
    def act_learn(self) -> float:
        """The deep-training slope (1.0 for a fused model)."""
        values = {float(b.act_learn) for b in self.fusible_blocks() if not b.fused}
        if len(values) > 1:
            raise RuntimeError(f"fusible blocks disagree on act_learn: {sorted(values)}")
        return values.pop() if values else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # Skipped while tracing/exporting, so that the check does not pin the sizes.
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not tracing and (h % SIZE_DIVISOR or w % SIZE_DIVISOR):
            raise ValueError(
                f"LV-UNet needs height and width that are multiples of {SIZE_DIVISOR}, "
                f"got {h}x{w}; pad the image (napari_lvunet.inference.segment does)"
            )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)  # 1/2, 1/4, 1/8, 1/16
        block_skips = [x]
        for block in self.down:
            x = block(x)
            block_skips.append(x)  # 1/16 .. 1/128
        for i, block in enumerate(self.up):
            x = block(x) + block_skips[2 - i]  # 1/64, 1/32, 1/16
        x = self.up_skip[0](x) + skips[2]  # 1/8
        x = self.up_skip[1](x) + skips[1]  # 1/4
        x = self.up_skip[2](x)  # 1/2
        x = self.final(x)  # 1/1
        return self.head(x)


def lvunet(
    *, num_classes: int = 1, weights: MobileNet_V3_Large_Weights | None = None, **kwargs: Any
) -> LVUNet:
    """Build an LV-UNet in its training form (see :class:`LVUNet`)."""
    return LVUNet(num_classes, weights=weights, **kwargs)


def reparameterize_model(model: LVUNet) -> LVUNet:
    """Return a fused deep copy of ``model`` for deployment; ``model`` is untouched.

    Every fusible block's two 1x1 convolutions and BatchNorms become one convolution,
    every series activation's BatchNorm is folded into its depthwise kernel, and the
    encoder's BatchNorms are folded into their convolutions. The copy is in eval mode.

    Raises:
        ValueError: If any block's ``act_learn`` is not exactly 1 (fusion would change
            the outputs).
    """
    fused = copy.deepcopy(model).eval()
    for block in fused.fusible_blocks():
        block.reparameterize()
    _fold_batchnorms(fused.encoder)
    return fused
