"""Evaluate LV-UNet weights on a dataset split at the images' original resolution.

Launch::

    python -m training.evaluate --data ../shared/datasets/kvasir-seg --weights runs/kvasir/best.pt
    python -m training.evaluate --data DIR --weights lvunet-kvasir-seg --split test --csv out.csv

Each image goes through the plugin's "resize" path: ``to_unit_rgb``, a bilinear
(antialiased) resize to the training size, the network, the logits resized back to the
original size (bilinear) and thresholded at probability 0.5. The prediction is compared
with the original mask, binarised as in training. Dice, IoU, precision and recall are
computed per image and averaged per image (each image counts once), as the LV-UNet paper
reports. Empty masks: see :mod:`training.metrics` (both empty -> Dice 1 and IoU 1).

``--weights`` is a registry name, a fused ``.safetensors`` file, or a training checkpoint
(``.pt``, read with ``weights_only=True``); a checkpoint at ``act_learn == 1`` is
evaluated both unfused (as trained) and fused (as deployed), and the two must agree.

The train / val split of a checkpoint is the one its run used: the stem lists stored in
the checkpoint, or (for checkpoints from before they were stored) the run's seed and
validation fraction, so a folder without ``splits.json`` is split as in training. Fused
weights carry the seed and fraction of their run, and a digest of each split: a split
that does not match it is reported with a warning.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_lvunet.cancel import CancelToken, check_cancelled
from napari_lvunet.io import atomic_write
from napari_lvunet.model import LVUNet, reparameterize_model
from napari_lvunet.preprocess import normalize, resize

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .data import DatasetError, Pair, find_pairs, load_pair, resolve_splits, split_digest
from .metrics import METRIC_NAMES, segmentation_metrics
from .options import integer

__all__ = [
    "EvaluationError",
    "Models",
    "default_split",
    "evaluate",
    "evaluate_pairs",
    "format_table",
    "load_models",
    "select_pairs",
    "split_options",
    "summarize",
    "write_csv",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")


class EvaluationError(ValueError):
    """The weights or the split cannot be evaluated; the message says why."""


@dataclass
class Models:
    """Models to evaluate, by label (``"unfused"``, ``"fused"``), their input size, and
    how their run split its data.

    Attributes:
        split: Keyword arguments for :func:`select_pairs` (``seed``, ``val_fraction``,
            ``splits``) that reproduce the run's split (see :func:`split_options`).
        split_sha256: Per-split digests recorded in fused weights
            (:func:`training.data.split_digest`), if any.
    """

    models: dict[str, LVUNet]
    train_size: tuple[int, int]
    source: str
    split: dict[str, Any]
    split_sha256: dict[str, str] | None = None


def split_options(ckpt: Mapping[str, Any], data: str | Path | None = None) -> dict[str, Any]:
    """The :func:`select_pairs` keyword arguments that reproduce a checkpoint's split.

    Args:
        ckpt: A training checkpoint (or anything with its ``config`` and ``dataset``).
        data: The folder to be split. The stored stem lists are only used for the
            folder the run trained on (same folder name); another dataset (evaluating
            on a second one) is split by its own ``splits.json``.

    Returns:
        ``seed`` and ``val_fraction`` of the run, and ``splits``: the stem lists the
        checkpoint stores, or ``None`` for checkpoints that predate them (the split is
        then drawn again from the seed and fraction, as training drew it).
    """
    cfg = ckpt.get("config") or {}
    dataset = ckpt.get("dataset") or {}
    stored = dataset.get("splits")
    splits = None
    if isinstance(stored, Mapping) and all(isinstance(v, list) for v in stored.values()):
        splits = {str(k): [str(s) for s in v] for k, v in stored.items()}
    name = dataset.get("name")
    if splits is not None and data is not None and name and Path(data).resolve().name != name:
        logger.info("%s is not the run's dataset %s: using its own split", data, name)
        splits = None
    return {
        "seed": int(dataset.get("seed", cfg.get("seed", 0))),
        "val_fraction": float(dataset.get("val_fraction", cfg.get("val_fraction", 0.2))),
        "splits": splits,
    }


def load_models(weights: str | Path, data: str | Path | None = None) -> Models:
    """Load the model(s) behind ``--weights``.

    Args:
        weights: A training checkpoint (``.pt``), a ``.safetensors`` file or a registry
            name.
        data: The dataset folder they will be evaluated on (see :func:`split_options`).

    Returns:
        ``unfused`` (and ``fused`` when ``act_learn == 1``) for a checkpoint; ``fused``
        for weights files and registry names.

    Raises:
        EvaluationError: If the weights cannot be loaded.
    """
    if str(weights).endswith(".pt"):
        try:
            ckpt = load_checkpoint(weights)
        except CheckpointError as err:
            raise EvaluationError(str(err)) from err
        unfused = model_from_checkpoint(ckpt)
        models = {"unfused": unfused}
        if unfused.act_learn == 1.0:
            models["fused"] = reparameterize_model(unfused)
        else:
            logger.warning(
                "checkpoint is at act_learn=%.4f (< 1): it cannot be fused; "
                "evaluating it unfused only",
                unfused.act_learn,
            )
        size = ckpt["config"].get("size", (256, 256))
        split = split_options(ckpt, data)
        return Models(models, (int(size[0]), int(size[1])), str(weights), split)
    from napari_lvunet.weights import WeightsError, load_model

    try:
        loaded = load_model(weights)
    except WeightsError as err:
        raise EvaluationError(str(err)) from err
    dataset = loaded.metadata.get("dataset") or {}
    recorded = dataset.get("split") or {}
    split = split_options({"config": loaded.metadata.get("training") or {}, "dataset": recorded})
    # The recorded digests describe the run's own dataset; another one differs anyway.
    same_data = data is None or Path(data).resolve().name == dataset.get("name")
    return Models(
        {"fused": loaded.model},
        loaded.train_size,
        f"{loaded.name} ({loaded.path})",
        split,
        recorded.get("sha256") if same_data else None,
    )


def default_split(data: str | Path) -> str:
    """``test`` for a folder with a ``splits.json``, else ``all``."""
    return "test" if (Path(data) / "splits.json").is_file() else "all"


def select_pairs(
    data: str | Path,
    split: str | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    splits: Mapping[str, Sequence[str]] | None = None,
    option: str | None = "--split",
) -> list[Pair]:
    """The pairs of one split of a dataset folder.

    Args:
        data: Dataset folder (``images/``, ``masks/``, optional ``splits.json``).
        split: ``train``, ``val``, ``test`` or ``all``; default ``test`` when the folder
            has a ``splits.json``, else ``all``.
        seed: Seed of the train/val split of folders without ``splits.json``.
        val_fraction: Validation share of that split.
        splits: Stem lists by split (a training run's, from its checkpoint): used
            instead of ``splits.json`` or the seeded split.
        option: The caller's command-line option for the split, suggested (with
            ``all``) in error messages: ``--split`` of evaluate, ``--test-split`` of
            export; ``None`` where the caller has none.

    Raises:
        DatasetError: If the folder is unusable, the split is empty, or ``splits``
            names stems the folder lacks.
    """
    pairs = find_pairs(data)
    has_splits = (Path(data) / "splits.json").is_file()
    split = split or default_split(data)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split == "all":
        return pairs
    by_stem = {p.stem: p for p in pairs}
    use_all = f"use {option} all" if option else "use a folder with more images"
    if splits is not None:
        stems = list(splits.get(split, []))
        missing = [s for s in stems if s not in by_stem]
        if missing:
            raise DatasetError(
                f"the run's {split} split names {len(missing)} image(s) that {data} lacks "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): evaluate "
                "on the folder the run was trained on"
                + (f", or use {option} all" if option else "")
            )
    elif len(pairs) < 2 and not has_splits:
        raise DatasetError(f"{data} has one image and no splits.json: {use_all}")
    else:
        stems = resolve_splits(data, [p.stem for p in pairs], seed=seed, val_fraction=val_fraction)[
            split
        ]
    if not stems:
        raise DatasetError(
            f"the {split} split of {data} is empty"
            + ("" if has_splits else f" (no splits.json: only train/val exist; {use_all})")
        )
    return [by_stem[s] for s in stems]


@torch.no_grad()
def evaluate_pairs(
    models: dict[str, LVUNet],
    pairs: Sequence[Pair],
    train_size: tuple[int, int],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    cancel: CancelToken | None = None,
) -> dict[str, list[dict[str, float | str]]]:
    """Per-image metrics of each model at the images' original resolution.

    Args:
        models: Models by label; each is run in eval mode on ``device`` in float32.
        pairs: The images and masks.
        train_size: The (height, width) the images are resized to for the network.
        device: Where to run the models.
        batch_size: Images per forward pass.
        cancel: Checked before each image is read and each model runs.

    Returns:
        For each label, one row per image: ``stem`` and the metrics of
        :data:`training.metrics.METRIC_NAMES`.

    Raises:
        DatasetError: If an image or mask cannot be loaded.
        Cancelled: If ``cancel`` was set.
    """
    device = torch.device(device)
    for m in models.values():
        m.to(device).eval()
    rows: dict[str, list[dict[str, float | str]]] = {label: [] for label in models}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        loaded = []
        for pair in chunk:
            check_cancelled(cancel, message="cancelled while evaluating")
            loaded.append(load_pair(pair))
        x = torch.cat(
            [resize(torch.from_numpy(rgb).permute(2, 0, 1)[None], train_size) for rgb, _ in loaded]
        )
        x = normalize(x).to(device)
        for label, model in models.items():
            check_cancelled(cancel, message="cancelled while evaluating")
            logits = model(x).float().cpu()
            for i, (pair, (_, mask)) in enumerate(zip(chunk, loaded, strict=True)):
                # The logits are resized back (as the plugin's resize policy does) and
                # thresholded at 0: probability 0.5.
                full = F.interpolate(
                    logits[i : i + 1], size=mask.shape, mode="bilinear", align_corners=False
                )
                m = segmentation_metrics(full[:, 0] > 0, torch.from_numpy(mask)[None])
                rows[label].append({"stem": pair.stem, **{k: float(m[k][0]) for k in METRIC_NAMES}})
    return rows


def summarize(rows: Sequence[dict[str, float | str]]) -> dict[str, float]:
    """Per-image means (and standard deviations, ``<name>_std``) of the metrics."""
    out: dict[str, float] = {"n": float(len(rows))}
    for name in METRIC_NAMES:
        values = [float(r[name]) for r in rows]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.pstdev(values)
    return out


def evaluate(
    data: str | Path,
    weights: str | Path,
    *,
    split: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, list[dict[str, float | str]]]:
    """Evaluate ``weights`` on a split of ``data`` (see the module docstring).

    The split is drawn as the weights' training run drew it (:func:`split_options`).

    Returns:
        Per-image rows for each model label (``unfused`` / ``fused``).

    Raises:
        DatasetError: If the data or split is unusable.
        EvaluationError: If the weights cannot be loaded.
    """
    models = load_models(weights, data)
    split = split or default_split(data)
    pairs = select_pairs(data, split, **models.split)
    recorded = (models.split_sha256 or {}).get(split)
    if (
        recorded is not None
        and split_digest({split: [p.stem for p in pairs]})["sha256"][split] != recorded
    ):
        logger.warning(
            "the %s split of %s (%d images) is not the one recorded in %s: the metrics are "
            "not comparable with the weights' own",
            split,
            data,
            len(pairs),
            models.source,
        )
    return evaluate_pairs(
        models.models, pairs, models.train_size, device=device, batch_size=batch_size
    )


def format_table(rows: dict[str, list[dict[str, float | str]]]) -> str:
    """A plain-text table of the per-image means per model."""
    lines = [f"{'model':<8} {'images':>6}  " + "  ".join(f"{n:>14}" for n in METRIC_NAMES)]
    for label, r in rows.items():
        s = summarize(r)
        cells = "  ".join(f"{s[n]:.4f} ± {s[n + '_std']:.3f}" for n in METRIC_NAMES)
        lines.append(f"{label:<8} {len(r):>6}  {cells}")
    if {"fused", "unfused"} <= set(rows):
        diff = max(
            abs(float(a["dice"]) - float(b["dice"]))
            for a, b in zip(rows["fused"], rows["unfused"], strict=True)
        )
        lines.append(f"largest per-image Dice difference fused vs unfused: {diff:.2e}")
    return "\n".join(lines)


def write_csv(path: str | Path, rows: dict[str, list[dict[str, float | str]]]) -> Path:
    """Write one line per model and image: model, stem, dice, iou, precision, recall.

    The file is written atomically and never over an existing one.

    Raises:
        FileExistsError: If ``path`` exists.
        OSError: If it cannot be written.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", "stem", *METRIC_NAMES])
    writer.writeheader()
    for label, r in rows.items():
        for row in r:
            writer.writerow({"model": label, **row})
    data = buf.getvalue().encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), overwrite=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=(
            "Dice, IoU, precision and recall of LV-UNet weights on a dataset split, per image "
            "at the original resolution and as per-image means. Both-empty masks count as "
            "Dice 1 / IoU 1."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (images/, masks/)")
    p.add_argument(
        "--weights",
        required=True,
        metavar="NAME_OR_FILE",
        help="registry name, fused .safetensors file, or training checkpoint .pt",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="split from splits.json (default: test if splits.json exists, else all)",
    )
    p.add_argument("--csv", metavar="FILE", help="write per-image metrics here (must not exist)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    p.add_argument(
        "--batch-size", type=integer(1), default=8, help="images per forward pass (default 8)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.csv and Path(args.csv).exists():
            raise EvaluationError(f"{args.csv} already exists; choose another --csv file")
        rows = evaluate(
            args.data,
            args.weights,
            split=args.split,
            device=args.device,
            batch_size=args.batch_size,
        )
    except (DatasetError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = args.split or default_split(args.data)
    print(f"{args.weights} on {args.data} [{split}], per-image means ± std:")
    print(format_table(rows))
    if args.csv:
        try:
            print(f"per-image metrics: {write_csv(args.csv, rows)}")
        except OSError as err:  # FileExistsError: created since the check above
            print(f"error: cannot write {args.csv}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
