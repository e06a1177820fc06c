"""Train LV-UNet on a folder dataset with the paper's recipe and deep training.

Launch::

    # a new run (the folder must not exist, or be empty)
    python -m training.train --data ../shared/datasets/kvasir-seg --out runs/kvasir --epochs 100
    # continue an interrupted run where its last checkpoint left off
    python -m training.train --resume runs/kvasir
    # ... and re-time it to end after 60 epochs in all (act_learn and lr follow the new
    # length from here; recorded in config.json under "schedule_changes")
    python -m training.train --resume runs/kvasir --epochs 60
    # a quick end-to-end check
    python -m training.train --data DIR --out /tmp/smoke --epochs 1 --max-steps 3
    # several processes (DistributedDataParallel; gloo on CPU, NCCL on GPU; rank 0 writes)
    torchrun --nproc_per_node 2 -m training.train --data DIR --out runs/ddp

Recipe (defaults, from Jiang et al. 2024): 256x256, batch 8, Adam lr 1e-3, weight decay
1e-4, cosine decay to 1e-5 (per step), loss 0.5 * BCE + soft Dice, 300 epochs. Deep
training: every fusible block's ``act_learn`` rises from 0 (ReLU) along
``1 - cos(pi/2 * t)`` and is exactly 1 for the final ``hold_fraction`` of the epochs, so
the model the last epochs train is the one that fuses exactly.

The run folder receives ``config.json`` (resolved config), ``splits.json`` (the stems of
each split), ``last.pt`` after every epoch, ``best.pt`` (best validation Dice among the
fusible epochs, act_learn == 1, since only those can be exported unchanged), ``log.csv``
and ``curves.png``. Checkpoints are written atomically and hold config, metrics, epoch,
the stems of each split (with the seed and validation fraction that drew them) and
every state needed to resume exactly.

A process claims its run folder before it reads the data (an OS lock on
``.lvunet-train.lock``, held for the whole run), so a second run or resume of the same
folder is refused; temporary files of a process that was killed while writing are
removed when the folder is claimed. Every numeric option is checked by the parser
before anything is written. A NaN or infinite loss or validation metric ends the run
with an error before that epoch is saved, so it is never "best". Exit codes: 0 done,
2 error (one line on stderr) or bad command line, 1 when PyTorch is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from napari_lvunet.inference import bf16_supported, resolve_device
from napari_lvunet.io import atomic_write
from napari_lvunet.model import SIZE_DIVISOR, LVUNet
from napari_lvunet.preprocess import TRAIN_SIZE, normalize, resize
from napari_lvunet.weights import code_version

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
)
from .data import (
    Augment,
    CachedSegmentationDataset,
    DatasetError,
    find_pairs,
    resolve_splits,
)
from .losses import BCEDiceLoss
from .metrics import segmentation_metrics
from .options import fraction, integer, multiple_of, number
from .outputs import LOCK_NAME, OutputError, RunClaim, remove_stale_temporaries

__all__ = [
    "ConfigError",
    "RunError",
    "TrainConfig",
    "TrainingDiverged",
    "act_learn_at",
    "autocast_dtype",
    "cosine_lr",
    "main",
    "optimisation_step",
    "recalibrate_batchnorm",
    "select_device",
    "train",
    "validate",
]

logger = logging.getLogger(__name__)

#: Options that change how a run executes but not what it computes; a resumed run may
#: change these, every other option is fixed by the run's config.json.
RUNTIME_FIELDS = ("device", "precision", "channels_last", "num_workers", "threads", "progress")
#: The files of a run folder (and so the names of their temporary files).
RUN_FILES = ("config.json", "splits.json", "last.pt", "best.pt", "log.csv", "curves.png")


class ConfigError(ValueError):
    """Inconsistent or invalid training options."""


class RunError(RuntimeError):
    """The run folder cannot be used (exists already, or has nothing to resume)."""


class TrainingDiverged(RuntimeError):  # noqa: N818 - reads as what happened
    """The loss became NaN or infinite; the last checkpoint written is untouched."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json and in checkpoints)."""

    data: str = ""
    epochs: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    bce_weight: float = 0.5
    size: tuple[int, int] = TRAIN_SIZE
    hold_fraction: float = 0.1
    min_scale: float = 0.5
    color_jitter: float = 0.15
    seed: int = 0
    imagenet: bool = False
    val_fraction: float = 0.2
    bn_recalibration: int = 128
    max_steps: int | None = None
    # runtime (see RUNTIME_FIELDS)
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    num_workers: int = 0
    threads: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values no run can use."""
        self.size = (int(self.size[0]), int(self.size[1]))
        if any(s <= 0 or s % SIZE_DIVISOR for s in self.size):
            raise ConfigError(
                f"--size must be positive multiples of {SIZE_DIVISOR}, got {self.size}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be at least 1")
        numbers = (self.lr, self.min_lr, self.weight_decay, self.bce_weight, self.color_jitter)
        if not all(math.isfinite(v) for v in numbers):
            raise ConfigError(
                "--lr, --min-lr, --weight-decay, --bce-weight, --color-jitter must be finite"
            )
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr and self.weight_decay >= 0):
            raise ConfigError("need lr > 0, 0 <= min_lr <= lr and weight_decay >= 0")
        if self.bce_weight < 0 or self.color_jitter < 0:
            raise ConfigError("--bce-weight and --color-jitter must be at least 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.num_workers < 0 or self.threads < 0 or self.bn_recalibration < 0:
            raise ConfigError("--workers, --threads and --bn-recalibration must be at least 0")
        if not 0 < self.hold_fraction <= 1:
            raise ConfigError(f"--hold-fraction must be in (0, 1], got {self.hold_fraction}")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision}")


def act_learn_at(epoch: int, epochs: int, hold_fraction: float = 0.1) -> float:
    """The deep-training slope for a (0-based) epoch.

    Rises from 0 along ``1 - cos(pi/2 * t)`` (the authors' curve) over the first epochs
    and is exactly 1.0 for the final ``ceil(hold_fraction * epochs)`` epochs (at least
    one), so the network trained last is the one that fuses exactly.
    """
    hold = min(epochs, max(1, math.ceil(hold_fraction * epochs - 1e-9)))
    ramp = epochs - hold
    if epoch >= ramp:
        return 1.0
    return 1.0 - math.cos(math.pi / 2 * epoch / ramp)


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """The learning rate before optimiser step ``step`` (0-based) of ``total_steps``.

    Cosine decay from ``lr`` to ``min_lr``, in closed form, so that a resumed run (or
    one whose length was changed on resume) needs no scheduler state but the step.
    """
    t = min(step, total_steps) / max(1, total_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The training device: :func:`~napari_lvunet.inference.resolve_device`, strictly.

    A GPU asked for but missing is a :class:`ConfigError` rather than a fallback to
    the CPU; ``auto`` on a CUDA machine picks this process's GPU (``local_rank``).
    """
    try:
        resolved = resolve_device(name, strict=True)
    except ValueError as err:
        raise ConfigError(f"--device {name}: {err}") from err
    if resolved == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(resolved)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` = plain fp32).

    ``auto`` is bf16 on CUDA GPUs that support it (else fp16 with loss scaling), bf16 on
    CPUs with native bf16 instructions (AVX512-BF16 / AMX), and fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if bf16_supported("cuda") else torch.float16
    if device.type == "cpu" and bf16_supported("cpu"):
        return torch.bfloat16
    return None


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def _init_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    ctx = _Dist(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ctx


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    criterion: torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Sum loss and per-image Dice / IoU over a loader (threshold: logit > 0).

    Returns:
        ``{"loss", "dice", "iou", "n"}`` as sums over images (divide by ``n`` for the
        per-image means), so that DDP ranks can add them up.
    """
    model.eval()
    sums = {"loss": 0.0, "dice": 0.0, "iou": 0.0, "n": 0.0}
    for x, y in loader:
        x = normalize(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        if criterion is not None:
            sums["loss"] += float(criterion(logits, y)) * len(x)
        m = segmentation_metrics(logits.float() > 0, y > 0.5)
        sums["dice"] += float(m["dice"].sum())
        sums["iou"] += float(m["iou"].sum())
        sums["n"] += len(x)
    return sums


def optimisation_step(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dtype: torch.dtype | None,
) -> tuple[float, torch.Tensor]:
    """One step of training and fine-tuning: forward (autocast), loss, backward, update.

    Args:
        net: The network, in train mode, on ``x``'s device.
        x: Normalised images ``(N, 3, H, W)``.
        y: Masks ``(N, 1, H, W)`` in {0, 1}.
        criterion: The loss.
        optimizer: Steps the parameters; its learning rate is set by the caller.
        scaler: Gradient scaler (enabled for float16 autocast only).
        dtype: Autocast dtype, or ``None`` for float32.

    Returns:
        The batch's loss and its per-image training Dice.

    Raises:
        TrainingDiverged: If the loss is NaN or infinite (nothing is updated then).
    """
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = net(x)
    loss = criterion(logits, y)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"the loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        dice = segmentation_metrics(logits.detach().float() > 0, y > 0.5)["dice"]
    return loss.item(), dice


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module,
    images: torch.Tensor,
    size: tuple[int, int],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> None:
    """Re-estimate every BatchNorm's running statistics for the model's current weights.

    The running averages lag behind fast-changing weights: MobileNetV3's BatchNorms
    average with momentum 0.01, about the last hundred steps, and LV-UNet's series
    activations normalise tiny variances (eps 1e-6), so stale statistics compound through
    ~60 BatchNorms until an eval-mode network outputs nothing at all while the same
    weights segment well in train mode. A pass over ``images`` with a cumulative average
    (momentum ``None``) gives the statistics the current weights really produce; the
    momenta are restored afterwards, so training continues as before.

    Args:
        model: The network (its train/eval mode is restored).
        images: ``(N, 3, H, W)`` uint8 images, resized to ``size`` un-augmented, as
            inference sees them; whole batches of ``batch_size`` are used.
        size: The training (height, width).
        batch_size: Images per forward pass.
        device: Where the model is.
        dtype: Autocast dtype, as in training.
        channels_last: Feed channels-last inputs.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) < batch_size:
        return
    # Whole batches only: a cumulative average weighs every batch alike.
    n = len(images) // batch_size * batch_size
    momenta = [b.momentum for b in bns]
    was_training = model.training
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
    model.train()
    try:
        for i in range(0, n, batch_size):
            x = resize(images[i : i + batch_size].float().div_(255.0), size)
            x = normalize(x).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                model(x)
    finally:
        for b, m in zip(bns, momenta, strict=True):
            b.momentum = m
        model.train(was_training)


def _rng_state() -> dict[str, Any]:
    # Plain tensors and tuples only, so that weights_only loading accepts them.
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "log.csv", buf.getvalue())
    try:
        _plot_curves(run_dir / "curves.png", history)
    except Exception as err:  # a plot must never end a long run
        logger.warning("could not draw the learning curves: %s", err)


def _plot_curves(path: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.5), dpi=100)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax1.set(title="loss (0.5 BCE + Dice)", xlabel="epoch")
    ax1.legend()
    ax2.plot(epochs, [h["train_dice"] for h in history], label="train Dice")
    ax2.plot(epochs, [h["val_dice"] for h in history], label="val Dice")
    ax2.plot(epochs, [h["val_iou"] for h in history], label="val IoU")
    ax2.set(title="per-image mean", xlabel="epoch", ylim=(0, 1))
    ax2.legend()
    ax3.plot(epochs, [h["lr"] for h in history], label="lr (end of epoch)")
    ax3.set(xlabel="epoch", yscale="log")
    twin = ax3.twinx()
    twin.plot(epochs, [h["act_learn"] for h in history], color="tab:red", label="act_learn")
    twin.set(ylim=(-0.05, 1.05))
    ax3.set_title("lr (blue), act_learn (red)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), overwrite=True)


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (
        not run_dir.is_dir() or any(p.name != LOCK_NAME for p in run_dir.iterdir())
    ):
        raise RunError(
            f"run folder {run_dir} already exists and is not empty; choose a new --out, "
            f"or continue that run with --resume {run_dir}"
        )


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train (or resume) a run; returns the run folder.

    Args:
        config: The run's options; on resume, the config saved in the run folder with
            any runtime options changed.
        run_dir: The run folder: new (absent or empty) unless ``resume``.
        resume: Continue from ``run_dir/last.pt`` (or from scratch in ``run_dir`` when
            it was interrupted before the first epoch ended).

    Returns:
        The run folder.

    Raises:
        ConfigError: For invalid options.
        DatasetError: For an unusable dataset (nothing is written then).
        RunError: If the run folder exists already (without ``resume``) or cannot be
            resumed.
        CheckpointError: If ``last.pt`` cannot be read on resume.
        TrainingDiverged: If the loss becomes NaN or infinite.
    """
    cfg = config
    cfg.validate()
    run_dir = Path(run_dir)
    ctx = _init_distributed(cfg.device)
    device = select_device(cfg.device, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // ctx.local_world)
    torch.set_num_threads(threads)
    dtype = autocast_dtype(cfg.precision, device)

    # The folder is claimed (created and locked) before the dataset is cached, and
    # held until the run ends: two runs never write into one folder, and a run that
    # fails before writing anything leaves no folder behind.
    claim = RunClaim(run_dir) if ctx.main else None
    try:
        if claim is not None:
            claim.acquire()
            # A process killed mid-write leaves its temporary files; they are never
            # reused, so drop them now that this process owns the folder.
            remove_stale_temporaries(run_dir, RUN_FILES)
        # Everything that can fail on bad input is checked before anything is written.
        ckpt = None
        saved_info: dict[str, Any] = {}
        if resume:
            try:
                saved_info = json.loads((run_dir / "config.json").read_text())
            except (OSError, ValueError) as err:
                raise RunError(f"{run_dir} is not a training run folder to resume ({err})") from err
            if (run_dir / "last.pt").is_file():
                ckpt = load_checkpoint(run_dir / "last.pt")
                done = int(ckpt["epoch"])
                if cfg.epochs != saved_info["config"]["epochs"] and cfg.epochs <= done:
                    raise ConfigError(
                        f"{run_dir} has completed {done} epochs: a new --epochs must be larger"
                    )
                if done >= cfg.epochs:
                    logger.info("run %s is already complete (%d epochs)", run_dir, done)
                    return run_dir
        else:
            _check_new_run_dir(run_dir)
        data_root = Path(cfg.data)
        pairs = find_pairs(data_root)
        splits = resolve_splits(
            data_root, [p.stem for p in pairs], seed=cfg.seed, val_fraction=cfg.val_fraction
        )
        by_stem = {p.stem: p for p in pairs}
        n_train = len(splits["train"])
        if n_train // ctx.world < cfg.batch_size:
            raise DatasetError(
                f"the train split has {n_train} image(s), fewer than one batch of {cfg.batch_size}"
                + (f" per process ({ctx.world} processes)" if ctx.world > 1 else "")
                + ": add images or lower --batch-size"
            )
        t0 = time.perf_counter()
        train_ds = CachedSegmentationDataset(
            [by_stem[s] for s in splits["train"]],
            cfg.size,
            augment=Augment(min_scale=cfg.min_scale, color=cfg.color_jitter),
            seed=cfg.seed,
        )
        val_ds = CachedSegmentationDataset([by_stem[s] for s in splits["val"]], cfg.size)
        logger.info(
            "cached %d train + %d val images from %s in %.1f s",
            len(train_ds),
            len(val_ds),
            data_root,
            time.perf_counter() - t0,
        )

        torch.manual_seed(cfg.seed)
        weights = None
        if cfg.imagenet:
            from torchvision.models import MobileNet_V3_Large_Weights

            weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1
        try:  # before the run folder exists: a failed download must leave nothing behind
            model = LVUNet(1, weights=weights)
        except RuntimeError as err:
            raise ConfigError(str(err)) from err

        ctx.barrier()  # every rank checked the folder before rank 0 creates it
        if ctx.main and resume and cfg.epochs != saved_info["config"]["epochs"]:
            # A changed length re-times the rest of the run: act_learn follows the new curve
            # (reaching 1 for the final hold_fraction of the new length) and the learning
            # rate the cosine over the new number of steps. Recorded, never silent.
            done = int(ckpt["epoch"]) if ckpt is not None else 0
            logger.warning(
                "run length changed from %d to %d epochs after epoch %d: act_learn and the "
                "learning rate follow the new schedule from here",
                saved_info["config"]["epochs"],
                cfg.epochs,
                done,
            )
            saved_info.setdefault("schedule_changes", []).append(
                {
                    "after_epoch": done,
                    "epochs_from": saved_info["config"]["epochs"],
                    "epochs_to": cfg.epochs,
                }
            )
            saved_info["config"]["epochs"] = cfg.epochs
            atomic_write_text(run_dir / "config.json", json.dumps(saved_info, indent=2) + "\n")
        if ctx.main and not resume:
            info = {
                "config": asdict(cfg),
                "code_version": code_version(),
                "torch": torch.__version__,
                "device": str(device),
                "autocast": str(dtype).replace("torch.", "") if dtype else "fp32",
                "world_size": ctx.world,
                "dataset": {"path": str(data_root.resolve()), "name": data_root.resolve().name},
                "split_sizes": {k: len(v) for k, v in splits.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_text(run_dir / "config.json", json.dumps(info, indent=2) + "\n")
            atomic_write_text(run_dir / "splits.json", json.dumps(splits, indent=1) + "\n")

        model = model.to(device)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        net: torch.nn.Module = model
        if ctx.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        sampler = DistributedSampler(
            train_ds,
            num_replicas=ctx.world,
            rank=ctx.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        loader_kw: dict[str, Any] = {
            "num_workers": cfg.num_workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": cfg.num_workers > 0,
        }
        train_loader = DataLoader(
            train_ds, cfg.batch_size, sampler=sampler, drop_last=True, **loader_kw
        )
        val_part = Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world))
        val_loader = DataLoader(val_part, cfg.batch_size, shuffle=False, **loader_kw)
        steps = (
            len(train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(train_loader))
        )

        criterion = BCEDiceLoss(cfg.bce_weight)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total_steps = cfg.epochs * steps
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        start_epoch, best_dice, best_epoch, history = 0, -1.0, -1, []
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
            start_epoch = int(ckpt["epoch"])
            best_dice, best_epoch = float(ckpt["best_val_dice"]), int(ckpt["best_epoch"])
            history = list(ckpt["history"])
            logger.info("resuming %s at epoch %d of %d", run_dir, start_epoch + 1, cfg.epochs)

        from tqdm.auto import tqdm

        show = cfg.progress and ctx.main
        for epoch in range(start_epoch, cfg.epochs):
            # Never lower act_learn: a run lengthened on resume after reaching 1 stays fusible.
            floor = float(history[-1]["act_learn"]) if history else 0.0
            act_learn = max(act_learn_at(epoch, cfg.epochs, cfg.hold_fraction), floor)
            model.set_act_learn(act_learn)
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            net.train()
            t0 = time.perf_counter()
            loss_sum = dice_sum = 0.0
            seen = 0
            bar = tqdm(
                total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False
            )
            for step, (x, y) in enumerate(train_loader):
                if step >= steps:
                    break
                x = normalize(x.to(device, non_blocking=True)).contiguous(
                    memory_format=memory_format
                )
                y = y.to(device, non_blocking=True)
                lr = cosine_lr(epoch * steps + step, total_steps, cfg.lr, cfg.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                try:
                    loss, dice = optimisation_step(
                        net,
                        x,
                        y,
                        criterion=criterion,
                        optimizer=optimizer,
                        scaler=scaler,
                        dtype=dtype,
                    )
                except TrainingDiverged as err:
                    raise TrainingDiverged(
                        f"{err} at epoch {epoch + 1}, step {step + 1}: training diverged (try a "
                        "lower --lr, or --precision fp32); the last good checkpoint is untouched"
                    ) from None
                loss_sum += loss * len(x)
                dice_sum += float(dice.sum())
                seen += len(x)
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", dice=f"{dice_sum / seen:.4f}")
            bar.close()
            train_time = time.perf_counter() - t0
            loss_sum, dice_sum, seen_all = ctx.all_sum([loss_sum, dice_sum, float(seen)], device)
            if cfg.bn_recalibration:
                recalibrate_batchnorm(
                    model,
                    train_ds.images[: cfg.bn_recalibration],
                    cfg.size,
                    batch_size=cfg.batch_size,
                    device=device,
                    dtype=dtype,
                    channels_last=cfg.channels_last,
                )
            v = validate(
                model,
                val_loader,
                device,
                criterion=criterion,
                dtype=dtype,
                channels_last=cfg.channels_last,
            )
            vs = ctx.all_sum([v["loss"], v["dice"], v["iou"], v["n"]], device)
            row = {
                "epoch": epoch + 1,
                "act_learn": round(act_learn, 6),
                "lr": cosine_lr((epoch + 1) * steps, total_steps, cfg.lr, cfg.min_lr),
                "train_loss": loss_sum / seen_all,
                "train_dice": dice_sum / seen_all,
                "val_loss": vs[0] / vs[3],
                "val_dice": vs[1] / vs[3],
                "val_iou": vs[2] / vs[3],
                "train_images_per_s": seen_all / train_time,
                "epoch_s": time.perf_counter() - t0,
            }
            bad = [k for k, v in row.items() if not math.isfinite(v)]
            if bad:  # before anything of this epoch is saved: it can never be "best"
                raise TrainingDiverged(
                    f"{', '.join(bad)} became {row[bad[0]]} at epoch {epoch + 1}: training "
                    "diverged (try a lower --lr, or --precision fp32); the last good "
                    "checkpoint is untouched"
                )
            history.append(row)
            fusible = act_learn == 1.0
            is_best = fusible and row["val_dice"] > best_dice
            if is_best:
                best_dice, best_epoch = row["val_dice"], epoch + 1
            if ctx.main:
                payload = {
                    "format": CHECKPOINT_FORMAT,
                    "model": model.state_dict(),
                    "model_config": model.config,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"last_epoch": (epoch + 1) * steps, "total_steps": total_steps},
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch + 1,
                    "act_learn": act_learn,
                    "metrics": dict(row),
                    "best_val_dice": best_dice,
                    "best_epoch": best_epoch,
                    "history": history,
                    "config": asdict(cfg),
                    # The stems of each split (as in splits.json), so that export and
                    # evaluate score exactly the images this run validated on.
                    "dataset": {
                        "name": data_root.resolve().name,
                        "splits": splits,
                        "seed": cfg.seed,
                        "val_fraction": cfg.val_fraction,
                    },
                    "code_version": code_version(),
                }
                atomic_save(payload, run_dir / "last.pt")
                if is_best:
                    atomic_save(payload, run_dir / "best.pt")
                _write_log(run_dir, history)
                logger.info(
                    "epoch %d/%d  act_learn %.4f  lr %.2e  loss %.4f  dice %.4f | val loss %.4f "
                    "dice %.4f iou %.4f%s | %.1f img/s, %.0f s",
                    epoch + 1,
                    cfg.epochs,
                    act_learn,
                    row["lr"],
                    row["train_loss"],
                    row["train_dice"],
                    row["val_loss"],
                    row["val_dice"],
                    row["val_iou"],
                    "  (best)" if is_best else "",
                    row["train_images_per_s"],
                    row["epoch_s"],
                )
            ctx.barrier()
        if ctx.main:
            logger.info(
                "done: best val Dice %.4f at epoch %d; %s",
                best_dice,
                best_epoch,
                run_dir / "best.pt",
            )
        return run_dir
    except OutputError as err:
        raise RunError(str(err)) from None
    finally:
        if claim is not None:
            claim.release()


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description=(
            "Train LV-UNet on a folder with images/ and masks/ (stems matched; png/jpg/tif) "
            "and an optional splits.json (train/val/test stem lists; else a seeded 80/20 "
            "train/val split). Writes checkpoints, log.csv, curves.png and config.json into "
            "the run folder. The test split is never used here."
        ),
        epilog=(
            "Export the result with: python -m training.export "
            "--checkpoint RUN_DIR/best.pt --out FILE.safetensors"
        ),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--data", metavar="DIR", help="dataset folder (images/, masks/, splits.json)")
    p.add_argument("--out", metavar="RUN_DIR", help="new run folder (must not exist or be empty)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run from its last checkpoint (with its saved recipe; --epochs "
        "may change the run's length)",
    )
    g = p.add_argument_group("recipe (fixed for a run; on --resume only --epochs may change)")
    g.add_argument("--epochs", type=integer(1), help=f"epochs (default {d.epochs})")
    g.add_argument(
        "--batch-size",
        type=integer(1),
        help=f"images per step and process (default {d.batch_size})",
    )
    g.add_argument("--lr", type=number(positive=True), help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=number(), help=f"end of the cosine decay (default {d.min_lr})")
    g.add_argument(
        "--weight-decay", type=number(), help=f"Adam weight decay (default {d.weight_decay})"
    )
    g.add_argument(
        "--bce-weight", type=number(), help=f"loss = w * BCE + Dice (default {d.bce_weight})"
    )
    g.add_argument(
        "--size",
        type=multiple_of(SIZE_DIVISOR),
        nargs="+",
        metavar="PX",
        help="training size, H [W] (default 256)",
    )
    g.add_argument(
        "--hold-fraction",
        type=fraction(closed=True),
        help=f"final share of epochs with act_learn exactly 1 (default {d.hold_fraction})",
    )
    g.add_argument(
        "--min-scale",
        type=fraction(closed=True),
        help=f"smallest random-crop area (default {d.min_scale})",
    )
    g.add_argument(
        "--color-jitter", type=number(), help=f"colour jitter strength (default {d.color_jitter})"
    )
    g.add_argument("--seed", type=integer(0), help=f"random seed (default {d.seed})")
    g.add_argument(
        "--imagenet",
        action="store_true",
        help="start the encoder from ImageNet weights (downloads)",
    )
    g.add_argument(
        "--val-fraction",
        type=fraction(closed=False),
        help=f"val share without splits.json (default {d.val_fraction})",
    )
    g.add_argument(
        "--bn-recalibration",
        type=integer(0),
        metavar="N",
        help=f"re-estimate BatchNorm statistics on N train images after each epoch, before "
        f"validation and checkpointing (default {d.bn_recalibration}; 0: off)",
    )
    g.add_argument(
        "--max-steps", type=integer(1), help="cap on optimiser steps per epoch (quick checks)"
    )
    r = p.add_argument_group("runtime (may change when resuming)")
    r.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    r.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast: auto = bf16 on GPUs / CPUs that support it, else fp32",
    )
    r.add_argument(
        "--no-channels-last", dest="channels_last", action="store_false", help="NCHW memory"
    )
    r.add_argument(
        "--workers", dest="num_workers", type=integer(0), help="data loader workers (default 0)"
    )
    r.add_argument(
        "--threads", type=integer(1), help="torch threads (default: cores / local processes)"
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    given = vars(args)
    if "size" in given:
        size = given["size"]
        if len(size) not in (1, 2):
            raise ConfigError("--size takes one or two numbers (H [W])")
        given["size"] = (size[0], size[-1])
    resume = given.pop("resume", None)
    if resume is not None:
        run_dir = Path(resume)
        recipe = sorted(k for k in given if k not in (*RUNTIME_FIELDS, "epochs"))
        if recipe:
            flags = ", ".join("--" + k.replace("_", "-") for k in recipe)
            raise ConfigError(
                f"--resume continues {run_dir} with its saved config (only --epochs and "
                f"runtime options may change); do not pass {flags}"
            )
        path = run_dir / "config.json"
        try:
            saved = json.loads(path.read_text())["config"]
        except (OSError, ValueError, KeyError) as err:
            raise RunError(f"cannot resume {run_dir}: no readable config.json ({err})") from err
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
        for k, v in given.items():
            setattr(cfg, k, v)
        return cfg, run_dir, True
    missing = [f"--{k}" for k in ("data", "out") if k not in given]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required (or --resume RUN_DIR)")
    run_dir = Path(given.pop("out"))
    given["data"] = str(Path(given["data"]).resolve())
    return TrainConfig(**given), run_dir, False


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, run_dir, resume = _config_from_args(args)
        train(cfg, run_dir, resume=resume)
    except (ConfigError, DatasetError, RunError, CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
