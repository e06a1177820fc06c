"""Helpers shared by several test modules (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorms(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so that
    a wrong fold (or a fold that forgets a term) changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
