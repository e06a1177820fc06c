"""Per-image segmentation metrics: Dice, IoU, precision, recall.

Means are per-image means (each image counts once, whatever its size), as the LV-UNet
paper averages. Empty-mask convention: a score whose denominator is zero is 1 when the
prediction is right (nothing predicted where nothing is, e.g. both masks empty: Dice 1,
IoU 1) and 0 otherwise (precision of an empty prediction on a non-empty mask is 0;
recall of a non-empty prediction on an empty mask is 0, its Dice and IoU too).
"""

from __future__ import annotations

import torch

__all__ = ["METRIC_NAMES", "segmentation_metrics"]

METRIC_NAMES = ("dice", "iou", "precision", "recall")


def _ratio(num: torch.Tensor, den: torch.Tensor, perfect: torch.Tensor) -> torch.Tensor:
    out = num / den.clamp(min=1)
    return torch.where(den == 0, perfect.to(out.dtype), out)


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compute Dice, IoU, precision and recall for each image of a batch.

    Args:
        pred: Boolean (or {0, 1}) predictions of shape ``(N, ...)``.
        target: Ground truth of the same shape.

    Returns:
        ``{"dice", "iou", "precision", "recall"}`` -> float64 tensors of shape ``(N,)``.

    Raises:
        ValueError: If the shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
        )
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    tp = (p & t).sum(1).double()
    fp = (p & ~t).sum(1).double()
    fn = (~p & t).sum(1).double()
    p_empty = (tp + fp) == 0
    t_empty = (tp + fn) == 0
    both_empty = p_empty & t_empty
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, t_empty),
        "recall": _ratio(tp, tp + fn, p_empty),
    }
