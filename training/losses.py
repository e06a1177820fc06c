"""The paper's training loss: 0.5 * binary cross-entropy + soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCEDiceLoss", "soft_dice_loss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """One minus the soft Dice of sigmoid probabilities, averaged over images.

    Args:
        logits: ``(N, C, H, W)`` raw network outputs.
        target: ``(N, C, H, W)`` {0, 1} masks.
        smooth: Added to numerator and denominator, so an empty mask predicted empty
            scores Dice 1 and gradients stay finite.

    Returns:
        A scalar tensor.
    """
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (probs * target).sum(1)
    dice = (2.0 * inter + smooth) / (probs.sum(1) + target.sum(1) + smooth)
    return 1.0 - dice.mean()


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + soft Dice`` (LV-UNet uses ``bce_weight = 0.5``).

    Args:
        bce_weight: Weight of the binary cross-entropy term.
        smooth: Smoothing of the soft Dice term.
    """

    def __init__(self, bce_weight: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Computed in float32 even under autocast: bf16 sums over 65k pixels lose digits.
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.bce_weight * bce + soft_dice_loss(logits, target, self.smooth)
