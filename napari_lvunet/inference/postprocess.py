"""From network outputs to labels: activation, threshold, connected components."""

from __future__ import annotations

import numpy as np

__all__ = ["ModelOutputError", "activate", "check_finite", "instances", "to_labels"]


class ModelOutputError(ValueError):
    """The model produced NaN or infinite outputs: its weights are broken, not the image."""


def check_finite(logits: np.ndarray, where: str = "") -> None:
    """Raise :class:`ModelOutputError` unless every logit is finite."""
    if not np.isfinite(logits).all():
        at = f" for {where}" if where else ""
        raise ModelOutputError(
            f"the model produced NaN or infinite outputs{at}: its weights are broken "
            "(e.g. a diverged training run); no result was made"
        )


def activate(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """Sigmoid or softmax over the class axis (axis 0), in numpy: torch's multi-threaded
    elementwise kernels stall for milliseconds on a busy CPU, numpy's do not."""
    from scipy.special import expit, softmax

    return expit(logits) if num_classes == 1 else softmax(logits, axis=0)


def to_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """``(C, ...)`` probabilities -> labels: threshold (one class) or argmax."""
    if probs.shape[0] == 1:
        return probs[0] > threshold
    return probs.argmax(axis=0)


def instances(semantic: np.ndarray, *, has_time: bool) -> np.ndarray:
    """Connected components of each class, numbered per time point."""
    from skimage.measure import label

    volumes = semantic if has_time else semantic[None]
    out = [label(volume, background=0) for volume in volumes]
    largest = max(int(v.max()) for v in out)
    dtype = np.uint8 if largest <= 0xFF else np.uint16 if largest <= 0xFFFF else np.int32
    stacked = np.stack([v.astype(dtype) for v in out])
    return stacked if has_time else stacked[0]
