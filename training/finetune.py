"""Fine-tune LV-UNet on a folder of (corrected) images: the plugin's retraining loop.

Launch::

    python -m training.finetune --data my_corrections --weights lvunet-kvasir-seg
    python -m training.finetune --data DIR --weights runs/kvasir/best.pt --epochs 30 --lr 1e-4

Every image of the folder is used (retraining on all corrections, not only the newest,
keeps the model from forgetting the earlier ones), except a small seeded held-out part
on which the Dice is reported before and after. With a ``splits.json`` in the folder its
``train`` split is trained on and its ``val`` split held out; ``test`` is never touched.

The start is a training checkpoint (``.pt``, unfused, read with ``weights_only=True``)
when given, else fused weights (a registry name or a ``.safetensors`` file), which are
fine-tuned directly: the fused network has no BatchNorm in its blocks, only
convolutions. A ``.safetensors`` file with a ``.pt`` of the same name beside it (what an
earlier fine-tune wrote) starts from that unfused checkpoint instead, provided it fuses
to exactly the file's weights (the ``tensors_sha256`` of its metadata). From a
checkpoint the BatchNorms keep their running statistics (frozen), since a handful of
images cannot estimate them. The result is written as fused
``.safetensors`` that the plugin's "Load weights from file" opens (plus, from a
checkpoint, an unfused ``.pt`` of the same name to fine-tune again from), under a name
that neither file has yet; nothing existing is ever overwritten.

The napari widget calls :func:`finetune` from a worker thread, with ``progress`` and
``cancel``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from napari_lvunet.io import atomic_write
from napari_lvunet.model import LVUNet, reparameterize_model
from napari_lvunet.preprocess import normalize

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
)
from .data import Augment, CachedSegmentationDataset, DatasetError, Pair, find_pairs
from .evaluate import evaluate_pairs, summarize
from .losses import BCEDiceLoss
from .train import TrainingDiverged, autocast_dtype, optimisation_step, select_device

__all__ = ["FinetuneCancelled", "FinetuneError", "finetune", "main", "split_heldout"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, float]], None]


class _Event(Protocol):
    def is_set(self) -> bool: ...


class FinetuneError(ValueError):
    """The start weights or options cannot be used; the message says why."""


class FinetuneCancelled(Exception):  # noqa: N818 - reads as what happened
    """Fine-tuning was cancelled through ``cancel``; nothing was written."""


def split_heldout(
    data_dir: str | Path, pairs: Sequence[Pair], *, fraction: float = 0.2, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into fine-tuning and held-out parts.

    ``splits.json`` (train / val) when the folder has one, else a seeded random
    ``fraction`` (at least one image) is held out.

    Raises:
        DatasetError: With fewer than two pairs, or an empty part.
    """
    from .data import resolve_splits

    if len(pairs) < 2:
        raise DatasetError(
            f"fine-tuning needs at least 2 image/mask pairs in {data_dir} (one is held out "
            f"to measure Dice before and after); found {len(pairs)}"
        )
    if (Path(data_dir) / "splits.json").is_file():
        splits = resolve_splits(data_dir, [p.stem for p in pairs], seed=seed)
        by_stem = {p.stem: p for p in pairs}
        return [by_stem[s] for s in splits["train"]], [by_stem[s] for s in splits["val"]]
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_hold = min(len(order) - 1, max(1, round(fraction * len(order))))
    hold = sorted(order[:n_hold], key=lambda p: p.stem)
    return sorted(order[n_hold:], key=lambda p: p.stem), hold


def _start_from_checkpoint(
    path: Path, ckpt: dict[str, Any], model: LVUNet
) -> tuple[LVUNet, tuple[int, int], dict[str, Any]]:
    if model.act_learn != 1.0:
        raise FinetuneError(
            f"{path} is at act_learn={model.act_learn:.4f}: fine-tune from a checkpoint "
            "of the final act_learn = 1 phase (best.pt), or from fused weights"
        )
    size = ckpt["config"].get("size", (256, 256))
    base = {"checkpoint": path.name, "epoch": int(ckpt["epoch"])}
    return model, (int(size[0]), int(size[1])), base


def _matching_checkpoint(weights: Path) -> tuple[Path, dict[str, Any], LVUNet] | None:
    """The unfused ``.pt`` beside fused weights, if it fuses to exactly those weights."""
    from napari_lvunet.weights import WeightsError, file_tensors, read_metadata, tensors_sha256

    sibling = weights.with_suffix(".pt")
    if weights.suffix != ".safetensors" or not sibling.is_file():
        return None
    try:
        recorded = read_metadata(weights)["tensors_sha256"]
        ckpt = load_checkpoint(sibling)  # weights_only=True
        model = model_from_checkpoint(ckpt)
        fused = reparameterize_model(model)  # ValueError unless act_learn == 1
    except (CheckpointError, WeightsError, ValueError, RuntimeError) as err:
        logger.info("not starting from %s: %s", sibling, err)
        return None
    if tensors_sha256(file_tensors(fused)) != recorded:
        logger.info("not starting from %s: it does not fuse to the weights of %s", sibling, weights)
        return None
    return sibling, ckpt, model


def _load_start(weights: str | Path) -> tuple[LVUNet, tuple[int, int], dict[str, Any]]:
    if str(weights).endswith(".pt"):
        try:
            ckpt = load_checkpoint(weights)
        except CheckpointError as err:
            raise FinetuneError(str(err)) from err
        return _start_from_checkpoint(Path(weights), ckpt, model_from_checkpoint(ckpt))
    # Fine-tuning the unfused network keeps its BatchNorms and training branches, as
    # training had them; the widget passes the fused file, so look for its .pt here.
    match = _matching_checkpoint(Path(weights))
    if match is not None:
        logger.info("starting from the unfused checkpoint %s (fuses to %s)", match[0], weights)
        return _start_from_checkpoint(*match)
    from napari_lvunet.weights import WeightsError, load_model

    try:
        loaded = load_model(weights)
    except WeightsError as err:
        raise FinetuneError(str(err)) from err
    logger.info("starting from the fused weights %s", loaded.path)
    base = {"name": loaded.name, "sha256": loaded.sha256}
    return loaded.model, loaded.train_size, base


def _free_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3`` ...: the first for which no suffix exists."""
    candidate, n = stem, 2
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        candidate = f"{stem}-{n}"
        n += 1
    return candidate


def _heldout_dice(
    model: LVUNet, hold: Sequence[Pair], size: tuple[int, int], device: torch.device
) -> float:
    rows = evaluate_pairs({"m": model}, hold, size, device=device)["m"]
    return summarize(rows)["dice"]


def finetune(
    data_dir: str | Path,
    weights: str | Path,
    out_dir: str | Path | None = None,
    *,
    epochs: int = 30,
    lr: float = 1e-4,
    progress: Progress | None = None,
    cancel: _Event | None = None,
    seed: int = 0,
    batch_size: int = 8,
    heldout_fraction: float = 0.2,
    device: str = "auto",
    precision: str = "auto",
) -> Path:
    """Fine-tune weights on a folder and write fused weights (see the module docstring).

    Args:
        data_dir: Folder with ``images/`` and ``masks/`` (stems matched; png/jpg/tif,
            any sizes).
        weights: Registry name, fused ``.safetensors`` file, or training checkpoint ``.pt``.
        out_dir: Where to write (created if needed); default ``<data_dir>/finetuned``.
        epochs: Passes over the fine-tuning images.
        lr: Adam learning rate, decayed along a cosine to 1 % of it.
        progress: Called after each epoch as ``progress(epoch, epochs, metrics)`` with
            ``loss``, ``train_dice`` and ``heldout_dice``.
        cancel: An object with ``is_set()`` (a ``threading.Event``), checked before every
            step: when set, fine-tuning stops and :class:`FinetuneCancelled` is raised.
        seed: Seed of the held-out split, the augmentation and the sampling.
        batch_size: Images per step (fewer when the folder is smaller).
        heldout_fraction: Share of images held out (at least one) without splits.json.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast (see training.train).

    Returns:
        The path of the fused ``.safetensors`` weights written.

    Raises:
        DatasetError: For an unusable folder (nothing is written).
        FinetuneError: For unusable start weights or options.
        FinetuneCancelled: When ``cancel`` was set (nothing is written).
    """
    from napari_lvunet.weights import save_weights

    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise FinetuneError("epochs and batch_size must be at least 1, and lr positive")
    data_dir = Path(data_dir)
    pairs = find_pairs(data_dir)
    train_pairs, hold = split_heldout(data_dir, pairs, fraction=heldout_fraction, seed=seed)
    model, size, base = _load_start(weights)
    dev = select_device(device)
    dtype = autocast_dtype(precision, dev)
    train_ds = CachedSegmentationDataset(
        train_pairs, size, augment=Augment(min_scale=0.6, color=0.1), seed=seed
    )
    out_dir = Path(out_dir) if out_dir is not None else data_dir / "finetuned"

    def cancelled(where: str) -> None:
        if cancel is not None and cancel.is_set():
            raise FinetuneCancelled(f"fine-tuning cancelled {where}; nothing was written")

    model = model.to(dev)
    before = _heldout_dice(model, hold, size, dev)
    logger.info(
        "fine-tuning on %d images, %d held out (Dice before: %.4f)",
        len(train_ds),
        len(hold),
        before,
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_ds, batch_size=min(batch_size, len(train_ds)), shuffle=True, generator=gen
    )
    criterion = BCEDiceLoss(0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * len(loader), eta_min=lr * 0.01
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    after = before
    for epoch in range(epochs):
        train_ds.set_epoch(epoch)
        model.train()
        # A few images cannot estimate BatchNorm statistics: keep the trained ones.
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        loss_sum = dice_sum = 0.0
        seen = 0
        for x, y in loader:
            cancelled(f"in epoch {epoch + 1}")
            x, y = normalize(x.to(dev)), y.to(dev)
            try:
                loss, dice = optimisation_step(
                    model,
                    x,
                    y,
                    criterion=criterion,
                    optimizer=optimizer,
                    scaler=scaler,
                    dtype=dtype,
                )
            except TrainingDiverged as err:
                raise FinetuneError(f"{err}: lower --lr") from None
            scheduler.step()
            loss_sum += loss * len(x)
            dice_sum += float(dice.sum())
            seen += len(x)
        cancelled(f"after epoch {epoch + 1}")
        after = _heldout_dice(model, hold, size, dev)
        metrics = {"loss": loss_sum / seen, "train_dice": dice_sum / seen, "heldout_dice": after}
        logger.info(
            "epoch %d/%d loss %.4f train Dice %.4f held-out Dice %.4f",
            epoch + 1,
            epochs,
            *metrics.values(),
        )
        if progress is not None:
            progress(epoch + 1, epochs, metrics)

    model = model.cpu().float().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"lvunet-finetuned-{data_dir.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # One name free for both files, so that the .pt beside the weights is their own.
    stem = _free_stem(out_dir, stem, (".safetensors", ".pt"))
    path = out_dir / f"{stem}.safetensors"
    metadata = {
        "train_size": list(size),
        "dataset": {
            "name": data_dir.resolve().name,
            "finetune_images": [p.stem for p in train_pairs],
            "heldout_images": [p.stem for p in hold],
        },
        "base_weights": base,
        "finetune": {"epochs": epochs, "lr": lr, "seed": seed, "batch_size": loader.batch_size},
        "metrics": {
            "heldout_before": {"dice": before},
            "heldout_after": {"dice": after},
            "note": "per-image mean Dice on the held-out images, original resolution",
        },
    }
    save_weights(model, path, metadata)
    if not model.fused:
        ckpt_path = path.with_suffix(".pt")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "model_config": model.config,
            "epoch": epochs,
            "act_learn": 1.0,
            "metrics": {"heldout_dice": after},
            "config": {
                "size": list(size),
                "data": data_dir.resolve().name,
                "finetune": metadata,
            },
        }
        atomic_write(ckpt_path, lambda f: torch.save(payload, f), overwrite=False)
        logger.info("unfused checkpoint (to fine-tune again from): %s", ckpt_path)
    logger.info("held-out Dice %.4f -> %.4f; fused weights written to %s", before, after, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m training.finetune",
        description=(
            "Fine-tune LV-UNet on a folder with images/ and masks/ (stems matched; png/jpg/tif) "
            "and write fused .safetensors weights for the plugin's 'Load weights from file'. "
            "A small held-out part reports Dice before and after."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder with images/ and masks/")
    p.add_argument(
        "--weights",
        required=True,
        metavar="NAME_OR_FILE",
        help="registry name, fused .safetensors, or training checkpoint .pt (preferred)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default DATA/finetuned)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    def report(epoch: int, total: int, m: dict[str, float]) -> None:
        print(
            f"epoch {epoch}/{total}  loss {m['loss']:.4f}  train Dice {m['train_dice']:.4f}  "
            f"held-out Dice {m['heldout_dice']:.4f}",
            flush=True,
        )

    try:
        path = finetune(
            args.data,
            args.weights,
            args.out,
            epochs=args.epochs,
            lr=args.lr,
            progress=report,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
        )
    except (DatasetError, FinetuneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from napari_lvunet.weights import read_metadata

    m = read_metadata(path)["metrics"]
    print(
        f"held-out Dice: {m['heldout_before']['dice']:.4f} before, "
        f"{m['heldout_after']['dice']:.4f} after"
    )
    print(f"fused weights written to {path}")
    if path.with_suffix(".pt").is_file():
        print(f"unfused checkpoint (to fine-tune again from): {path.with_suffix('.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
