"""Fusible building blocks of LV-UNet (Jiang et al., IEEE BIBM 2024, arXiv 2408.16886).

A :class:`FusibleBlock` trains in an expanded form::

    1x1 conv + BN -> leaky_relu(slope=act_learn) -> 1x1 conv + BN -> pool / upsample
    -> SeriesActivation (ReLU -> depthwise (2n+1)x(2n+1) conv -> BN)

and collapses for deployment into::

    1x1 conv -> pool / upsample -> ReLU -> depthwise conv (with bias)

The "deep training" knob ``act_learn`` is the slope of the leaky ReLU between the two
1x1 convolutions. At 0 it is a ReLU (a deeper, non-linear network for early training);
at exactly 1 it is the identity, the two convolutions compose linearly and can be
merged into one. Fusion is therefore exact only at ``act_learn == 1``, and
:meth:`FusibleBlock.reparameterize` refuses any other value rather than silently
changing the outputs. ``act_learn`` is a buffer, so it travels in the state dict and a
reloaded checkpoint computes what was trained.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusibleBlock", "SeriesActivation", "fuse_conv_bn"]

Resample = Literal["down", "up", "none"]

# BatchNorm epsilon of the reference implementation.
_BN_EPS = 1e-6


def fuse_conv_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the convolution that feeds it.

    Args:
        weight: Convolution kernel of shape ``(out, in/groups, kh, kw)``.
        bias: Convolution bias of shape ``(out,)``, or ``None``.
        bn: The BatchNorm2d applied to the convolution's output.

    Returns:
        The kernel and bias of a single convolution computing ``bn(conv(x))``.
    """
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    if bias is None:
        bias = torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


class SeriesActivation(nn.Module):
    """ReLU followed by a learnable depthwise convolution (the "series" activation).

    Args:
        channels: Number of channels.
        act_num: Half-width n of the depthwise kernel, which is (2n+1)x(2n+1).
        fused: Build the deployment form directly (bias instead of BatchNorm).
    """

    def __init__(self, channels: int, act_num: int = 1, *, fused: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.act_num = act_num
        size = 2 * act_num + 1
        self.weight = nn.Parameter(torch.empty(channels, 1, size, size))
        nn.init.trunc_normal_(self.weight, std=0.02)
        if fused:
            self.bias = nn.Parameter(torch.zeros(channels))
            self.bn = None
        else:
            self.register_parameter("bias", None)
            self.bn = nn.BatchNorm2d(channels, eps=_BN_EPS)

    @property
    def fused(self) -> bool:
        return self.bn is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.relu(x), self.weight, self.bias, padding=self.act_num, groups=self.channels)
        return x if self.bn is None else self.bn(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into the depthwise kernel, which gains a bias."""
        if self.fused:
            return
        weight, bias = fuse_conv_bn(self.weight, None, self.bn)
        self.weight.copy_(weight)
        self.bias = nn.Parameter(bias)
        del self.bn
        self.bn = None


class FusibleBlock(nn.Module):
    """One LV-UNet stage: two 1x1 convolutions, a resampling and a series activation.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        resample: ``"down"`` (2x max-pool, encoder), ``"up"`` (2x bilinear upsampling,
            decoder) or ``"none"``.
        act_num: Half-width of the series activation's depthwise kernel.
        fused: Build the deployment form directly, without the training branches, so
            that fused weights load without ever creating them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample: Resample = "none",
        act_num: int = 1,
        *,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if resample not in ("down", "up", "none"):
            raise ValueError(f"resample must be 'down', 'up' or 'none', got {resample!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        if fused:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            self.conv1 = self.conv2 = None
        else:
            self.conv = None
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel_size=1),
                nn.BatchNorm2d(in_channels, eps=_BN_EPS),
            )
            self.conv2 = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
                nn.BatchNorm2d(out_channels, eps=_BN_EPS),
            )
            # Deep-training slope: 0 = ReLU, 1 = identity (fusible). A buffer, not an
            # attribute, so that it is saved with the weights.
            self.register_buffer("act_learn", torch.tensor(0.0))
        self.act = SeriesActivation(out_channels, act_num, fused=fused)

    @property
    def fused(self) -> bool:
        return self.conv is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        else:
            x = self.conv1(x)
            slope = float(self.act_learn)
            if slope != 1.0:
                x = F.leaky_relu(x, slope)
            x = self.conv2(x)
        if self.resample == "down":
            x = F.max_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.act(x)

    def set_act_learn(self, value: float) -> None:
        """Set the deep-training slope (no-op on a fused block, which is at 1 by design)."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"act_learn must be in [0, 1], got {value}")
        if not self.fused:
            self.act_learn.fill_(value)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the training branches into one 1x1 convolution, in place.

        Raises:
            ValueError: If ``act_learn`` is not exactly 1: the leaky ReLU between the two
                convolutions is then non-linear and no single convolution equals them.
        """
        if self.fused:
            return
        slope = float(self.act_learn)
        if slope != 1.0:
            raise ValueError(
                f"cannot fuse a block at act_learn={slope}: fusion is exact only at "
                "act_learn == 1 (finish the deep-training schedule first)"
            )
        w1, b1 = fuse_conv_bn(self.conv1[0].weight, self.conv1[0].bias, self.conv1[1])
        w2, b2 = fuse_conv_bn(self.conv2[0].weight, self.conv2[0].bias, self.conv2[1])
        w1, w2 = w1.flatten(1), w2.flatten(1)  # (in, in), (out, in)
        conv = nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1).to(w1)
        conv.weight.copy_((w2 @ w1).reshape(conv.weight.shape))
        conv.bias.copy_(w2 @ b1 + b2)
        del self.conv1, self.conv2, self.act_learn
        self.conv1 = self.conv2 = None
        self.conv = conv
        self.act.reparameterize()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, resample={self.resample!r}"
