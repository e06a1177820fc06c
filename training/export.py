"""Export a training checkpoint as fused weights the plugin loads (and optionally ONNX).

Launch::

    python -m training.export --checkpoint runs/kvasir/best.pt --out lvunet-kvasir.safetensors
    python -m training.export --checkpoint runs/kvasir/best.pt --out model.safetensors \\
        --test-split test --onnx

The checkpoint (read with ``torch.load(weights_only=True)``) must be from the fusible
phase of deep training (``act_learn == 1``; ``best.pt`` always is). The model is fused,
checked against the unfused one (1e-4 of the logits' scale; logits that are NaN or
infinite are refused), and written with
:func:`napari_lvunet.weights.save_weights`; the metadata holds the architecture, the
training resolution and normalisation, the dataset and its split (the run's seed and
validation fraction, and the count and SHA-256 of each split's stems), the validation
metrics of the checkpoint, optionally test metrics at the original resolution, the
training code version and config. ``--onnx`` writes the same fused model through
:func:`napari_lvunet.export.export_onnx`, which checks ONNX Runtime against PyTorch.

Splits are the run's own (the stems its checkpoint stores, or its seed and validation
fraction for older checkpoints), so ``--test-split val`` scores the images the run
validated on. Both files are built and checked in a scratch folder first and only then
moved under their names: a failed export leaves no file behind, and never replaces one
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from napari_lvunet.io import atomic_write
from napari_lvunet.model import LVUNet, reparameterize_model

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .data import CachedSegmentationDataset, DatasetError, split_digest
from .evaluate import evaluate_pairs, select_pairs, split_options, summarize
from .options import integer

__all__ = ["ExportError", "check_fusion", "export_checkpoint", "main", "weights_metadata"]

logger = logging.getLogger(__name__)

#: Largest allowed difference between fused and unfused logits, relative to the logits'
#: scale (at least 1). Fusion is exact in real arithmetic; in float32, BatchNorms with
#: tiny running variances (LV-UNet's use eps 1e-6) scale rounding errors up, so a trained
#: model whose logits reach +-30 differs by a few 1e-4 while one with logits near 1 must
#: agree to 1e-4.
FUSION_TOL = 1e-4


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says why."""


def check_fusion(
    unfused: LVUNet, fused: LVUNet, size: tuple[int, int], *, seed: int = 0, what: str = "fused"
) -> float:
    """Compare two models' logits on a random batch; return the largest difference.

    Raises:
        ExportError: If either model's logits are not finite, or they differ by more
            than :data:`FUSION_TOL` times the logits' scale (at least 1).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, *size), generator=gen)
    with torch.no_grad():
        expected = unfused.eval()(x)
        got = fused.eval()(x)
    # A diverged model (NaN or infinite weights or statistics) would pass a NaN
    # comparison below and segment nothing: refuse it by name.
    for name, logits in (("unfused", expected), (what, got)):
        if not bool(torch.isfinite(logits).all()):
            raise ExportError(
                f"the {name} model's logits are not finite (NaN or infinite): the checkpoint "
                "is from a diverged run and cannot be exported"
            )
    diff = float((expected - got).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if diff > FUSION_TOL * scale:
        raise ExportError(
            f"the {what} model differs from the unfused one by {diff:.2e} "
            f"(> {FUSION_TOL} x logit scale {scale:.1f})"
        )
    return diff


def weights_metadata(
    ckpt: dict[str, Any], test_metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The metadata stored with the exported weights (beyond what save_weights derives).

    Args:
        ckpt: A training checkpoint.
        test_metrics: Metrics of a test split, stored under ``metrics.test``.

    Returns:
        Dataset and split record, training size, metrics, epoch, code version and the
        training config (with the dataset's name in place of its local path).
    """
    cfg = dict(ckpt["config"])
    dataset = dict(ckpt.get("dataset") or {})
    name = dataset.get("name") or Path(str(cfg.get("data", ""))).name
    # The local dataset path says nothing to whoever loads the weights elsewhere.
    cfg["data"] = name
    val = {k: ckpt["metrics"][k] for k in ("val_dice", "val_iou") if k in ckpt.get("metrics", {})}
    metrics: dict[str, Any] = {
        "val": {
            "dice": val.get("val_dice"),
            "iou": val.get("val_iou"),
            "note": "per-image mean at the training resolution (model selection)",
        }
    }
    if test_metrics is not None:
        metrics["test"] = test_metrics
    size = cfg.get("size", (256, 256))
    split = split_options(ckpt)
    record: dict[str, Any] = {"seed": split["seed"], "val_fraction": split["val_fraction"]}
    if split["splits"] is not None:  # older checkpoints do not store their stems
        record.update(split_digest(split["splits"]))
    return {
        "dataset": {
            "name": name,
            "train_split": "train",
            "selection_split": "val",
            "split": record,
        },
        "train_size": [int(size[0]), int(size[1])],
        "metrics": metrics,
        "epoch": int(ckpt["epoch"]),
        "code_version": str(ckpt.get("code_version", "unknown")),
        "training": cfg,
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    onnx: str | Path | None = None,
    test_split: str | None = None,
    data: str | Path | None = None,
    recalibrate_bn: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a training checkpoint to fused safetensors (and ONNX).

    Args:
        checkpoint: A training checkpoint (``.pt``) at ``act_learn == 1``.
        out: Destination ``.safetensors`` file.
        onnx: Also write the fused model as ONNX to this path.
        test_split: Evaluate this split (e.g. ``"test"``) at the original resolution and
            store its per-image mean metrics in the metadata.
        data: Dataset folder for ``test_split`` and ``recalibrate_bn`` (default: the one
            trained on).
        recalibrate_bn: Re-estimate the BatchNorm statistics on this many training images
            before fusing (for checkpoints written without per-epoch re-estimation; see
            :func:`training.train.recalibrate_batchnorm`); the val metrics are then
            recomputed at the original resolution.
        overwrite: Replace existing output files.

    Returns:
        A summary: ``out``, ``onnx``, ``fusion_max_abs_diff``, ``metadata``.

    Raises:
        ExportError: If the checkpoint cannot be exported, the ONNX export fails, or an
            output exists (nothing is written then).
        DatasetError: If ``test_split`` cannot be read from the dataset.
        OSError: If an output cannot be written (a full disk, no permission).
    """
    from napari_lvunet.export import export_onnx
    from napari_lvunet.weights import load_model, save_weights

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out must end in .safetensors, got {out.name}")
    for target in (out, onnx):
        if target is not None and Path(target).exists() and not overwrite:
            raise ExportError(f"{target} already exists; choose another name or pass --overwrite")
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    model = model_from_checkpoint(ckpt)
    if model.act_learn != 1.0:
        raise ExportError(
            f"{checkpoint} is from epoch {ckpt['epoch']} at act_learn={model.act_learn:.4f}: only "
            "checkpoints from the final act_learn = 1 phase fuse exactly (use best.pt, or "
            "last.pt of a finished run)"
        )
    meta = weights_metadata(ckpt)
    size = tuple(meta["train_size"])
    data_dir = data or ckpt["config"]["data"]
    split = split_options(ckpt, data_dir)
    if recalibrate_bn > 0:
        from .train import recalibrate_batchnorm

        train_pairs = select_pairs(data_dir, "train", **split, option=None)[:recalibrate_bn]
        images = CachedSegmentationDataset(train_pairs, size).images
        recalibrate_batchnorm(
            model, images, size, batch_size=int(ckpt["config"].get("batch_size", 8))
        )
        rows = evaluate_pairs(
            {"m": model}, select_pairs(data_dir, "val", **split, option=None), size
        )["m"]
        s = summarize(rows)
        meta["metrics"]["val"] = {
            "dice": s["dice"],
            "iou": s["iou"],
            "n": len(rows),
            "note": "per-image mean at the original resolution, after re-estimating the "
            f"BatchNorm statistics on {len(images)} train images",
        }
        meta["bn_recalibrated_on_train_images"] = len(images)
    fused = reparameterize_model(model)
    diff = check_fusion(model, fused, size)
    if test_split is not None:
        pairs = select_pairs(data_dir, test_split, **split, option="--test-split")
        rows = evaluate_pairs({"fused": fused}, pairs, size)["fused"]
        s = summarize(rows)
        meta["metrics"][test_split] = {
            **{k: s[k] for k in ("dice", "iou", "precision", "recall")},
            "n": len(rows),
            "note": "per-image mean at the original resolution, threshold 0.5",
        }
    with tempfile.TemporaryDirectory(prefix="lvunet-export-") as scratch:
        staged = save_weights(model, Path(scratch) / out.name, meta)
        # Read the file back the way the plugin will and check it computes what was trained.
        loaded = load_model(staged)
        reload_diff = check_fusion(model, loaded.model, size, seed=1, what=f"reloaded {out.name}")
        outputs = [(staged, out)]
        if onnx is not None:
            try:
                staged_onnx = export_onnx(
                    model,
                    Path(scratch) / "model.onnx",
                    metadata={"napari_lvunet": json.dumps(loaded.metadata, sort_keys=True)},
                )
            except (RuntimeError, ValueError) as err:
                raise ExportError(f"ONNX export failed, nothing was written: {err}") from err
            outputs.append((staged_onnx, Path(onnx)))
        for _, dest in outputs:
            dest.parent.mkdir(parents=True, exist_ok=True)
        _move_outputs(outputs, overwrite=overwrite)
    return {
        "out": out,
        "sha256": loaded.sha256,
        "onnx": Path(onnx) if onnx is not None else None,
        "fusion_max_abs_diff": max(diff, reload_diff),
        "metadata": loaded.metadata,
    }


def _move_outputs(outputs: list[tuple[Path, Path]], *, overwrite: bool) -> None:
    # All or nothing: when one output cannot be put in place (a file of that name
    # appeared since the first check, a full disk), the ones this call wrote are removed.
    written: list[Path] = []
    try:
        for staged, dest in outputs:
            data = staged.read_bytes()
            try:
                atomic_write(dest, lambda f, data=data: f.write(data), overwrite=overwrite)
            except FileExistsError as err:
                raise ExportError(
                    f"{dest} appeared while exporting; nothing was written (choose another "
                    "name or pass --overwrite)"
                ) from err
            written.append(dest)
    except BaseException:
        if not overwrite:  # without overwrite, every file written here is a new one
            for path in written:
                path.unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m training.export",
        description=(
            "Fuse a training checkpoint (act_learn = 1) and write it as .safetensors weights "
            "with metadata, which the plugin's 'Load weights from file' opens; optionally "
            "also as ONNX (dynamic batch and size) for deployment."
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="RUN_DIR/best.pt", help="training checkpoint"
    )
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="weights file to write")
    p.add_argument(
        "--onnx",
        nargs="?",
        const="",
        metavar="FILE.onnx",
        help="also write ONNX (default name: --out with .onnx)",
    )
    p.add_argument(
        "--test-split",
        metavar="SPLIT",
        help="evaluate this split (e.g. test) and store its metrics in the metadata",
    )
    p.add_argument(
        "--data", metavar="DIR", help="dataset for --test-split (default: the training data)"
    )
    p.add_argument(
        "--recalibrate-bn",
        type=integer(0),
        default=0,
        metavar="N",
        help="re-estimate BatchNorm statistics on N train images before fusing (for runs "
        "trained without per-epoch re-estimation)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    onnx = None
    if args.onnx is not None:
        onnx = args.onnx or str(Path(args.out).with_suffix(".onnx"))
    try:
        result = export_checkpoint(
            args.checkpoint,
            args.out,
            onnx=onnx,
            test_split=args.test_split,
            recalibrate_bn=args.recalibrate_bn,
            data=args.data,
            overwrite=args.overwrite,
        )
    except (ExportError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a read-only folder
        print(f"error: cannot write the export: {err}", file=sys.stderr)
        return 2
    print(f"fused weights: {result['out']} (sha256 {result['sha256']})")
    print(f"fused vs unfused max |logit difference|: {result['fusion_max_abs_diff']:.2e}")
    for split, m in result["metadata"]["metrics"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
        print(f"{split}: {shown}")
    if result["onnx"] is not None:
        print(f"ONNX: {result['onnx']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
