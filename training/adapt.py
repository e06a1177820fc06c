"""The levers that make a fine-tune adapt to a new centre without forgetting the old one.

:mod:`training.finetune` combines them; each is a plain function or class here, so that
it can be tested on tiny data and measured (``benchmarks/bench_adaptation.py``):

* **A step-based schedule** (:func:`schedule`): a fixed number of optimiser steps, not
  epochs. Twenty corrections at batch 8 make two steps an epoch; what a fine-tune costs
  and achieves is its number of steps, whatever the number of pairs.
* **Replay** (:class:`MixedBatches`): every batch mixes a share of replay pairs (the
  shipped Kvasir-SEG train images, :func:`training.reference.replay_pairs`) with the
  user's pairs, so the gradient keeps what the model knew in view.
* **Changed pixels count more** (:func:`changed_pixels`, :class:`WeightedBCEDiceLoss`):
  the pixels where the start model's proposal differs from the corrected mask are what
  the user taught; they weigh ``changed_weight`` times the pixels the model already had
  right.
* **Replay in the user's colours** (:func:`colour_stats`, :func:`recolour`): a share of
  the replay images is shown with the colour statistics of the user's images (each
  channel's mean and spread moved to theirs), so the model sees many more polyps in
  the new camera's colours than the user corrected, and the rest of the replay images
  keep the old colours in view.
* **Stronger photometric augmentation** (:class:`CameraAugment`): per-channel gains
  (white balance), gamma and blur on top of :class:`training.data.Augment`, the ways in
  which a second centre's camera differs.
* **Learning rates relative to each tensor's size** (:func:`param_groups`): fusing folds
  every BatchNorm into its convolution, so nothing holds a layer's scale any more, and
  the bundled model's weight tensors have RMS values from 0.0014 to 6.0. One Adam
  learning rate moves the smallest tensors by a third of themselves per step (they are
  scrambled within a hundred steps, which is forgetting) and the largest hardly at all.
  Each tensor gets ``lr`` times its RMS instead, so every layer moves by the same share
  of itself (the per-layer trust ratio of LARS and LAMB, fixed at the start).

BatchNorm re-estimation on the new centre's images is not among them: the weights a
user fine-tunes (the bundled model and every fine-tune of it) are fused, with no
BatchNorm left to re-estimate.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from napari_lvunet._annotations import image_digest
from napari_lvunet.cancel import CancelToken, check_cancelled
from napari_lvunet.preprocess import normalize, resize

from .data import Augment, CachedSegmentationDataset, Pair, read_array

#: The defaults of :func:`training.finetune.finetune` and its command line, chosen with
#: ``benchmarks/bench_adaptation.py`` (a simulated new centre made from Kvasir-SEG).
DEFAULT_STEPS = 100
DEFAULT_LR = 3e-3  # relative to each tensor's RMS (DEFAULT_LR_SCALE)
DEFAULT_LR_SCALE = "relative"
DEFAULT_BATCH_SIZE = 4  # the user's pairs per step; replay pairs come on top
DEFAULT_REPLAY = 0.25  # share of every batch taken from the replay set
DEFAULT_RECOLOUR = 0.5  # share of the replay images shown in the user's colours
DEFAULT_CHANGED_WEIGHT = 3.0
DEFAULT_AUGMENT = "camera"

__all__ = [
    "AUGMENTS",
    "DEFAULT_AUGMENT",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHANGED_WEIGHT",
    "DEFAULT_LR",
    "DEFAULT_LR_SCALE",
    "DEFAULT_RECOLOUR",
    "DEFAULT_REPLAY",
    "DEFAULT_STEPS",
    "LR_SCALES",
    "RMS_FLOOR",
    "CameraAugment",
    "MixedBatches",
    "PairDataset",
    "WeightedBCEDiceLoss",
    "changed_pixels",
    "colour_stats",
    "content_digest",
    "cosine_schedule",
    "group_by_content",
    "param_groups",
    "parse_fraction",
    "parse_share",
    "parse_weight",
    "recolour",
    "replay_count",
    "schedule",
]


def schedule(
    n_pairs: int, batch_size: int, *, steps: int | None = None, epochs: int | None = None
) -> tuple[int, int]:
    """The number of optimiser steps and of passes over the user's pairs.

    Args:
        n_pairs: The user's training pairs.
        batch_size: The user's pairs per step.
        steps: A fixed number of steps (the step-based schedule), or ``None``.
        epochs: Passes over the pairs (the epoch-based schedule), when ``steps`` is None.

    Returns:
        ``(steps, epochs)``: with ``steps`` given, ``epochs`` is the passes they make,
        rounded up; with ``epochs``, ``steps`` is ``epochs * ceil(n_pairs / batch_size)``.

    Raises:
        ValueError: Without pairs, or with neither (or both) of steps and epochs.
    """
    if n_pairs < 1 or batch_size < 1:
        raise ValueError(f"need at least one pair and one per batch, got {n_pairs}, {batch_size}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    per_epoch = math.ceil(n_pairs / batch_size)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return steps, math.ceil(steps / per_epoch)
    if epochs is None or epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    return epochs * per_epoch, epochs


@dataclass(frozen=True)
class CameraAugment(Augment):
    """:class:`~training.data.Augment` plus what another camera changes.

    Attributes:
        gains: Each channel is multiplied by a factor in [1 - gains, 1 + gains] (white
            balance; hue shifts a little, but a reddish polyp stays reddish).
        gamma: The image is raised to a power in [1 / (1 + gamma), 1 + gamma].
        blur: Probability of a Gaussian blur with sigma in [0.5, 1.5] px (at the
            training size).
    """

    gains: float = 0.1
    gamma: float = 0.3
    blur: float = 0.3

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = super().__call__(image, mask, size, gen)
        r = torch.rand(6, generator=gen)
        if self.gains > 0:
            img = img * (1.0 + self.gains * (2.0 * r[:3] - 1.0))[:, None, None]
        if self.gamma > 0:
            power = math.exp(math.log1p(self.gamma) * (2.0 * float(r[3]) - 1.0))
            img = img.clamp(0.0, 1.0) ** power
        if float(r[4]) < self.blur:
            img = _gaussian_blur(img, 0.5 + float(r[5]))
        return img.clamp_(0.0, 1.0).contiguous(), msk


#: The augmentations by name (``--augment``): ``mild`` is what fine-tuning used before.
AUGMENTS: dict[str, Augment] = {
    "mild": Augment(min_scale=0.6, color=0.1),
    "camera": CameraAugment(min_scale=0.5, color=0.2),
}


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img[None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


@torch.no_grad()
def changed_pixels(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    size: tuple[int, int],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Where the model's proposal differs from the corrected mask.

    Args:
        model: The start model (run in eval mode, then left in the mode it was in).
        images: ``(N, 3, H, W)`` uint8 images (a dataset's cache).
        masks: ``(N, 1, H, W)`` {0, 1} uint8 masks, the corrections.
        size: The network's input size (the training size); the proposal is made at it,
            as inference's resize does, and its logits are resized back to ``H, W``.
        batch_size: Images per forward pass.
        device: Where to run the model.
        cancel: Checked before each batch.

    Returns:
        ``(N, 1, H, W)`` uint8: 1 where proposal (probability > 0.5) and mask differ.
    """
    was_training = model.training
    model.eval()
    out = torch.empty_like(masks)
    try:
        for start in range(0, len(images), batch_size):
            check_cancelled(cancel, message="cancelled while comparing proposals")
            x = images[start : start + batch_size].float().div_(255.0)
            logits = model(normalize(resize(x, size)).to(device)).float().cpu()
            logits = F.interpolate(
                logits[:, :1], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False
            )
            proposal = (logits > 0).to(torch.uint8)
            out[start : start + batch_size] = proposal != masks[start : start + batch_size]
    finally:
        model.train(was_training)
    return out


class PairDataset(Dataset):
    """Cached pairs, each with a map of the pixels to weigh more, for :class:`MixedBatches`.

    Items are indexed by ``(index, draw)``: ``draw`` counts how often the pair has been
    used, so every use gets a fresh augmentation, a pure function of ``(seed, draw,
    index)``.

    Args:
        cache: The decoded pairs (a :class:`~training.data.CachedSegmentationDataset`
            with ``augment``).
        changed: ``(N, 1, H, W)`` uint8 at the cache's size (:func:`changed_pixels`), or
            ``None`` (no pixel weighs more).
        colours: ``(2, 3)`` channel means and spreads (:func:`colour_stats`) to show a
            share of the items in, or ``None``.
        recolour_share: The share of items (each draw decided by a seeded coin, a pure
            function of ``(seed, draw, index)``) that :func:`recolour` moves to
            ``colours``.
    """

    def __init__(
        self,
        cache: CachedSegmentationDataset,
        changed: torch.Tensor | None,
        *,
        colours: torch.Tensor | None = None,
        recolour_share: float = 0.0,
    ) -> None:
        if cache.augment is None:
            raise ValueError("PairDataset augments: give a cache built with augment")
        if changed is not None and changed.shape != cache.masks.shape:
            raise ValueError(f"changed map {tuple(changed.shape)} != {tuple(cache.masks.shape)}")
        if not 0.0 <= recolour_share <= 1.0 or (recolour_share and colours is None):
            raise ValueError(f"cannot recolour a share of {recolour_share} (colours: {colours})")
        self.cache = cache
        self.changed = changed
        self.colours = colours
        self.recolour_share = recolour_share

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` image in [0, 1] and ``(2, H, W)``: the mask, then the changed map."""
        index, draw = key
        c = self.cache
        both = c.masks[index]
        if self.changed is not None:
            both = torch.cat([both, self.changed[index]])
        else:
            both = torch.cat([both, torch.zeros_like(both)])
        seed = (c.seed * 1_000_003 + draw * 10_007 + index) % (2**63)
        assert c.augment is not None
        image, both = c.augment(c.images[index], both, c.size, torch.Generator().manual_seed(seed))
        if self.recolour_share:
            coin = torch.rand((), generator=torch.Generator().manual_seed(seed ^ 0x5EED))
            if float(coin) < self.recolour_share:
                assert self.colours is not None
                image = recolour(image, self.colours)
        return image, both


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """The colours of a set of images: ``(2, 3)``, the mean over the images of each
    channel's mean (row 0) and standard deviation (row 1), in [0, 1].

    Args:
        images: ``(N, 3, H, W)`` uint8 (a cache's images).
    """
    x = images.float().div(255.0)
    return torch.stack([x.mean((2, 3)).mean(0), x.std((2, 3)).mean(0)])


def recolour(image: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Show a ``(3, H, W)`` image in [0, 1] in other colours: each channel's mean and
    standard deviation become those of ``colours`` (:func:`colour_stats`), clipped to
    [0, 1] (a colour transfer in RGB)."""
    mean = image.mean((1, 2), keepdim=True)
    std = image.std((1, 2), keepdim=True).clamp_min(1e-3)
    out = (image - mean) / std * colours[1].view(3, 1, 1) + colours[0].view(3, 1, 1)
    return out.clamp_(0.0, 1.0)


#: ``lr_scale``: ``relative`` (each tensor's learning rate is ``lr`` times its RMS) or
#: ``absolute`` (one learning rate for every tensor, as before).
LR_SCALES = ("relative", "absolute")
#: Smallest RMS a relative learning rate is scaled by: a tensor of zeros, or a bias near
#: zero, still learns.
RMS_FLOOR = 1e-2


def param_groups(
    model: nn.Module, lr: float, lr_scale: str = DEFAULT_LR_SCALE, *, floor: float = RMS_FLOOR
) -> list[dict]:
    """Optimiser parameter groups, one a tensor, with their learning rates.

    Args:
        model: The network; only parameters that require gradients are taken.
        lr: The learning rate (``relative``: per unit of a tensor's RMS).
        lr_scale: ``relative``: a tensor whose values have root mean square ``r`` gets
            ``lr * max(r, floor)``, measured once, at the start; ``absolute``: every
            tensor gets ``lr``.
        floor: The smallest RMS a relative rate is scaled by.

    Returns:
        ``[{"params": [tensor], "lr": ..., "name": ...}, ...]`` in the model's order.

    Raises:
        ValueError: For an unknown ``lr_scale``.
    """
    if lr_scale not in LR_SCALES:
        raise ValueError(f"lr_scale must be one of {', '.join(LR_SCALES)}, got {lr_scale!r}")
    groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if lr_scale == "relative":
            scale = max(float(p.detach().float().pow(2).mean().sqrt()), floor)
        groups.append({"params": [p], "lr": lr * scale, "name": name})
    return groups


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, final: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Decay every group's learning rate along a half cosine to ``final`` times its start,
    reached at ``total_steps`` (then held)."""

    def factor(step: int) -> float:
        t = min(step, total_steps) / total_steps
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def replay_count(user_per_batch: int, share: float) -> int:
    """Replay pairs to add to ``user_per_batch`` user pairs so that they make ``share`` of
    the batch (rounded; at least one when ``share`` is positive).

    Raises:
        ValueError: Unless ``0 <= share < 1``.
    """
    if not (math.isfinite(share) and 0.0 <= share < 1.0):
        raise ValueError(f"the replay share must be in [0, 1), got {share}")
    if share == 0.0:
        return 0
    return max(1, round(user_per_batch * share / (1.0 - share)))


class MixedBatches:
    """Batches of user pairs plus replay pairs, step after step.

    Each step takes ``user_per_batch`` user pairs and ``replay_per_batch`` replay pairs,
    each set walked through in a fresh seeded order once it is used up (so every user
    pair is seen equally often, and a step count that is no multiple of an epoch takes
    what is left of one pass and the start of the next).

    Args:
        user: The user's pairs.
        replay: Replay pairs, or ``None``.
        user_per_batch: User pairs per step (at most ``len(user)``).
        replay_per_batch: Replay pairs per step (0 without ``replay``).
        seed: Seed of the orders.
    """

    def __init__(
        self,
        user: PairDataset,
        replay: PairDataset | None,
        *,
        user_per_batch: int,
        replay_per_batch: int = 0,
        seed: int = 0,
    ) -> None:
        if not 1 <= user_per_batch <= len(user):
            raise ValueError(f"user_per_batch must be in [1, {len(user)}], got {user_per_batch}")
        if replay_per_batch < 0 or (replay_per_batch and (replay is None or not len(replay))):
            raise ValueError(f"cannot take {replay_per_batch} replay pairs per batch")
        self.user, self.replay = user, replay
        self.user_per_batch = user_per_batch
        self.replay_per_batch = replay_per_batch
        self._streams = [_Stream(len(user), seed)]
        if replay_per_batch:
            assert replay is not None
            self._streams.append(_Stream(len(replay), seed + 1))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch: images ``(B, 3, H, W)``, masks and changed maps ``(B, 1, H, W)``."""
        items = [self.user[key] for key in self._streams[0].take(self.user_per_batch)]
        if self.replay_per_batch:
            assert self.replay is not None
            items += [self.replay[key] for key in self._streams[1].take(self.replay_per_batch)]
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        return x, y[:, :1], y[:, 1:]

    @property
    def user_passes(self) -> int:
        """Completed passes over the user's pairs."""
        return self._streams[0].passes

    def state(self) -> tuple[list[dict[str, int | list[int]]], list[torch.Tensor]]:
        """Where the streams are (JSON-able) and their generators' states, to resume."""
        return (
            [{"order": s.order, "passes": s.passes, "pos": s.pos} for s in self._streams],
            [s.gen.get_state() for s in self._streams],
        )

    def load_state(self, streams: Sequence[dict], generators: Sequence[torch.Tensor]) -> None:
        """Go on from a :meth:`state`: the next batches are those that would have followed.

        Raises:
            ValueError: If the state is of other streams.
        """
        if len(streams) != len(self._streams) or len(generators) != len(self._streams):
            raise ValueError(f"{len(streams)} stream states for {len(self._streams)} streams")
        for s, saved, gen in zip(self._streams, streams, generators, strict=True):
            order = [int(i) for i in saved["order"]]
            if sorted(order) not in ([], list(range(s.n))) or not 0 <= saved["pos"] <= len(order):
                raise ValueError("a stream state of another set of pairs")
            s.order, s.passes, s.pos = order, int(saved["passes"]), int(saved["pos"])
            s.gen.set_state(gen)


class _Stream:
    """Indices 0..n-1 in seeded random orders, one order after another, with draw counts."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.passes = 0
        self.pos = 0

    def take(self, k: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(k):
            if self.pos == len(self.order):
                if self.order:
                    self.passes += 1
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
                self.pos = 0
            out.append((self.order[self.pos], self.passes))
            self.pos += 1
        return out


class WeightedBCEDiceLoss(nn.Module):
    """0.5 * pixel-weighted BCE + soft Dice: :class:`training.losses.BCEDiceLoss` where
    the changed pixels weigh more.

    The weights of the next call are set with :meth:`set_changed` (so that the one
    training step, :func:`training.train.optimisation_step`, calls it as any loss):
    a pixel weighs ``changed_weight`` in the BCE term where the map is 1, else 1; the
    weighted BCE is normalised by the sum of the weights, so the loss keeps its scale.
    The soft Dice term is unweighted.

    Args:
        changed_weight: Weight of a changed pixel (1 = plain BCE).
        bce_weight: Weight of the BCE term.
        smooth: Smoothing of the soft Dice.
    """

    def __init__(
        self, changed_weight: float = 1.0, bce_weight: float = 0.5, smooth: float = 1.0
    ) -> None:
        super().__init__()
        if not (math.isfinite(changed_weight) and changed_weight >= 1.0):
            raise ValueError(f"changed_weight must be >= 1, got {changed_weight}")
        self.changed_weight = changed_weight
        self.bce_weight = bce_weight
        self.smooth = smooth
        self._changed: torch.Tensor | None = None

    def set_changed(self, changed: torch.Tensor | None) -> None:
        """The changed map ``(N, 1, H, W)`` of the next batch (``None``: none)."""
        self._changed = changed

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .losses import soft_dice_loss

        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self._changed is not None and self.changed_weight != 1.0:
            if self._changed.shape != bce.shape:
                raise ValueError(
                    f"changed map {tuple(self._changed.shape)} != target {tuple(bce.shape)}"
                )
            w = 1.0 + (self.changed_weight - 1.0) * self._changed.to(bce)
            bce = (bce * w).sum() / w.sum()
        else:
            bce = bce.mean()
        return self.bce_weight * bce + soft_dice_loss(logits, target, self.smooth)


def parse_share(text: str) -> float:
    """Command-line type of ``--replay``: a share in [0, 1)."""
    return _parse_share(text, one=False)


def parse_fraction(text: str) -> float:
    """Command-line type of ``--recolour``: a share in [0, 1]."""
    return _parse_share(text, one=True)


def _parse_share(text: str, *, one: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0.0 and (value < 1.0 or (one and value == 1.0))):
        interval = "[0, 1]" if one else "[0, 1)"
        raise argparse.ArgumentTypeError(f"must be a share in {interval}, got {text}")
    return value


def parse_weight(text: str) -> float:
    """Command-line type of ``--changed-weight``: a finite number >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text}")
    return value


def content_digest(path: str | Path) -> str:
    """SHA-256 of an image's decoded pixels (shape, dtype and values).

    :func:`napari_lvunet._annotations.image_digest`, the digest with which the widget's
    saving refuses or updates twins, of the pixels training reads.

    The same picture saved twice, under two names or in two lossless formats, has one
    digest; so held-out splits can keep copies together.

    Raises:
        DatasetError: If the file cannot be decoded.
    """
    return image_digest(read_array(Path(path)))


def group_by_content(pairs: Sequence[Pair]) -> list[list[Pair]]:
    """The pairs grouped by their image's :func:`content_digest`, in order of first
    appearance; each group keeps the order of ``pairs``."""
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(content_digest(pair.image), []).append(pair)
    return list(groups.values())
