"""Tests of the training package: data, schedule, loss, metrics, train/resume, export,
evaluate, fine-tune, bad input and a two-process DDP run. All data is generated here,
at 128 px, and every run is a few optimiser steps."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.train as train_mod
from napari_lvunet.model import LVUNet
from napari_lvunet.preprocess import normalize
from napari_lvunet.weights import load_model, save_weights
from training import evaluate as evaluate_mod
from training import export as export_mod
from training import finetune as finetune_mod
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import (
    Augment,
    CachedSegmentationDataset,
    DatasetError,
    binarize_mask,
    find_pairs,
    read_array,
    resolve_splits,
    split_digest,
)
from training.finetune import FinetuneCancelled, FinetuneError, finetune
from training.losses import BCEDiceLoss
from training.metrics import METRIC_NAMES, segmentation_metrics
from training.train import TrainConfig, act_learn_at

REPO = Path(__file__).resolve().parent.parent
SIZE = 128


def _make_dataset(root: Path, n: int = 8, sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write n RGB images with a bright disc and its {0, 255} mask (last mask empty)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = sizes[i] if sizes else (SIZE, SIZE)
        image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) // 5) ** 2
        if i == n - 1:
            disc[:] = False
        image[disc] += np.array([170, 80, 40], np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"img{i:02d}.png")
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--size", str(SIZE), "--batch-size", "4",
        "--max-steps", "1", "--no-progress", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run (epoch 2 at act_learn 1, so best.pt exists)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train_mod.main(_train_args(dataset, out, "--epochs", "2")) == 0
    return out


# ----------------------------------------------------------------------------- data


def test_pairs_splits_and_mask_binarisation(dataset: Path, tmp_path: Path) -> None:
    pairs = find_pairs(dataset)
    assert [p.stem for p in pairs] == [f"img{i:02d}" for i in range(8)]
    splits = resolve_splits(dataset, [p.stem for p in pairs], seed=0)
    assert len(splits["val"]) == 2 and len(splits["train"]) == 6 and splits["test"] == []
    assert splits == resolve_splits(dataset, [p.stem for p in pairs], seed=0)
    assert sorted(splits["train"] + splits["val"]) == [p.stem for p in pairs]
    # JPEG noise around 0/255 is cut at 128; lossless masks and label images: any > 0.
    noisy = np.array([[0, 3, 127], [128, 250, 255]], np.uint8)
    assert binarize_mask(noisy, lossy=True).tolist() == [[False, False, False], [True, True, True]]
    assert binarize_mask(noisy).tolist() == [[False, True, True], [True, True, True]]
    assert binarize_mask(np.array([[0, 1]], np.uint8), lossy=True).tolist() == [[False, True]]
    assert binarize_mask(np.array([[0, 7, 300]], np.uint16)).tolist() == [[False, True, True]]


def test_palette_files_give_colours_for_images_and_labels_for_masks(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    im = Image.fromarray(labels, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    im.save(tmp_path / "p.png")
    assert read_array(tmp_path / "p.png", mask=True).tolist() == labels.tolist()
    colours = read_array(tmp_path / "p.png")
    assert colours.shape == (2, 3, 3) and colours[0, 1].tolist() == [255, 0, 0]


def test_augmentation_is_seeded_and_keeps_masks_binary(dataset: Path) -> None:
    ds = CachedSegmentationDataset(find_pairs(dataset), (SIZE, SIZE), augment=Augment(), seed=5)
    assert ds.images.dtype == torch.uint8 and ds.images.shape[-1] == SIZE * 9 // 8
    ds.set_epoch(2)
    a_img, a_mask = ds[3]
    b_img, b_mask = ds[3]
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    ds.set_epoch(3)
    assert not torch.equal(ds[3][0], a_img)
    assert a_img.shape == (3, SIZE, SIZE) and a_mask.shape == (1, SIZE, SIZE)
    assert float(a_img.min()) >= 0 and float(a_img.max()) <= 1
    assert set(a_mask.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------ schedule, loss, metrics


@pytest.mark.parametrize("epochs", [1, 2, 10, 45, 300])
def test_act_learn_rises_to_exactly_one_and_holds(epochs: int) -> None:
    values = [act_learn_at(e, epochs, 0.1) for e in range(epochs)]
    hold = max(1, -(-epochs // 10))
    assert values[-hold:] == [1.0] * hold
    assert all(v < 1.0 for v in values[:-hold])
    assert values[0] == (1.0 if epochs == 1 else 0.0)
    assert values == sorted(values)


def test_a_few_optimisation_steps_reduce_the_loss(dataset: Path) -> None:
    ds = CachedSegmentationDataset(find_pairs(dataset), (SIZE, SIZE))
    x = normalize(torch.stack([ds[i][0] for i in range(8)]))
    y = torch.stack([ds[i][1] for i in range(8)])
    model = LVUNet(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = BCEDiceLoss(0.5)
    losses = []
    for _ in range(6):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02


def test_metrics_on_hand_made_predictions() -> None:
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True  # 4 px
    pred[0, :2, :3] = True  # 6 px, 4 overlap
    target[1, 0, 0] = True  # prediction empty
    # image 2: both empty
    m = segmentation_metrics(pred, target)
    assert m["dice"].tolist() == pytest.approx([8 / 10, 0.0, 1.0])
    assert m["iou"].tolist() == pytest.approx([4 / 6, 0.0, 1.0])
    assert m["precision"].tolist() == pytest.approx([4 / 6, 0.0, 1.0])
    assert m["recall"].tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_batchnorm_recalibration_replaces_stale_statistics(dataset: Path) -> None:
    ds = CachedSegmentationDataset(find_pairs(dataset), (SIZE, SIZE))
    images = ds.images[:4]
    model = LVUNet(1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    batch_means: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(
            lambda mod, inp, out, i=i: batch_means.__setitem__(i, inp[0].mean((0, 2, 3)))
        )
        for i, b in enumerate(bns)
    ]
    with torch.no_grad():
        model.train()(normalize(images.float() / 255))
    for h in hooks:
        h.remove()
    for b in bns:  # stale, as after the weights moved on
        b.running_mean.fill_(3.0)
        b.running_var.fill_(50.0)
    model.eval()
    train_mod.recalibrate_batchnorm(model, images, (SIZE, SIZE), batch_size=4)
    assert not model.training
    assert {b.momentum for b in bns} == {0.1, 0.01}
    for i, b in enumerate(bns):
        torch.testing.assert_close(b.running_mean, batch_means[i], rtol=1e-4, atol=1e-5)
        assert float(b.running_var.max()) < 50.0


# -------------------------------------------------------------------- train and resume


def test_train_writes_a_complete_run(run: Path) -> None:
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "splits.json", "last.pt", "best.pt", "log.csv", "curves.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["size"] == [SIZE, SIZE] and info["split_sizes"]["train"] == 6
    best = load_checkpoint(run / "best.pt")  # weights_only=True inside
    assert best["epoch"] == 2 and best["act_learn"] == 1.0
    assert best["config"]["lr"] == 1e-3 and 0 <= best["metrics"]["val_dice"] <= 1
    assert model_from_checkpoint(best).act_learn == 1.0
    # The split itself (not its names), with what drew it, for export and evaluate.
    assert best["dataset"]["splits"] == json.loads((run / "splits.json").read_text())
    assert best["dataset"]["seed"] == 3 and best["dataset"]["val_fraction"] == 0.2
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,act_learn,lr")


def test_resume_continues_at_the_right_epoch_with_the_same_state(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _train_args(dataset, tmp_path / "a", "--epochs", "3")
    assert train_mod.main(args) == 0
    reference = load_checkpoint(tmp_path / "a" / "last.pt")

    class KilledError(Exception):
        """Stands for the process dying right after a checkpoint was written."""

    real_save = train_mod.atomic_save

    def save_then_die(obj: dict, path: Path) -> Path:
        written = real_save(obj, path)
        if obj["epoch"] == 2:
            raise KilledError  # as if the process died right after epoch 2's checkpoint
        return written

    monkeypatch.setattr(train_mod, "atomic_save", save_then_die)
    with pytest.raises(KilledError):
        train_mod.main(_train_args(dataset, tmp_path / "b", "--epochs", "3"))
    monkeypatch.setattr(train_mod, "atomic_save", real_save)
    interrupted = load_checkpoint(tmp_path / "b" / "last.pt")
    assert interrupted["epoch"] == 2

    assert train_mod.main(["--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    resumed = load_checkpoint(tmp_path / "b" / "last.pt")
    assert resumed["epoch"] == 3 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6)
    ref_opt, res_opt = reference["optimizer"]["state"], resumed["optimizer"]["state"]
    assert ref_opt.keys() == res_opt.keys()
    for k in ref_opt:
        torch.testing.assert_close(res_opt[k]["exp_avg"], ref_opt[k]["exp_avg"], rtol=0, atol=1e-6)
        assert float(res_opt[k]["step"]) == float(ref_opt[k]["step"]) == 3
    assert resumed["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"] == 3
    assert len((tmp_path / "b" / "log.csv").read_text().splitlines()) == 4


def test_resume_can_change_the_run_length(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert train_mod.main(["--resume", str(copy), "--epochs", "2"]) == 0  # already complete
    assert train_mod.main(["--resume", str(copy), "--epochs", "1"]) == 2  # cannot shrink past
    assert train_mod.main(["--resume", str(copy), "--epochs", "4", "--no-progress"]) == 0
    ckpt = load_checkpoint(copy / "last.pt")
    # act_learn never falls back below 1 once reached, even though the new curve would
    assert [h["act_learn"] for h in ckpt["history"]] == [0.0, 1.0, 1.0, 1.0]
    assert ckpt["history"][-1]["lr"] == pytest.approx(1e-5)
    info = json.loads((copy / "config.json").read_text())
    assert info["config"]["epochs"] == 4
    assert info["schedule_changes"] == [{"after_epoch": 2, "epochs_from": 2, "epochs_to": 4}]


def test_resume_refuses_recipe_changes(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run / "last.pt").read_bytes()
    assert train_mod.main(["--resume", str(run), "--lr", "0.1"]) == 2
    assert "do not pass --lr" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before


def test_an_existing_run_folder_is_never_overwritten(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert train_mod.main(_train_args(dataset, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and "--resume" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


class _NanLoss(torch.nn.Module):
    def __init__(self, bce_weight: float) -> None:
        super().__init__()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits.mean() * float("nan")


class _NanWeightedLoss(_NanLoss):
    """Fine-tuning's loss also takes the map of the pixels the user changed."""

    def set_changed(self, changed: torch.Tensor | None) -> None:
        pass


def test_diverged_training_gives_one_clear_line(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(train_mod, "BCEDiceLoss", _NanLoss)
    assert train_mod.main(_train_args(dataset, tmp_path / "r", "--epochs", "1")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: the loss became nan")
    assert "diverged" in errors[0]


def _bad_empty(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()


def _bad_no_mask(root: Path) -> None:
    _make_dataset(root)
    (root / "masks" / "img03.png").unlink()


def _bad_mask_size(root: Path) -> None:
    _make_dataset(root)
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(root / "masks" / "img02.png")


def _bad_unreadable(root: Path) -> None:
    _make_dataset(root)
    (root / "images" / "img05.png").write_bytes(b"this is not a png")


def _bad_too_few(root: Path) -> None:
    _make_dataset(root, n=3)


def _bad_splits(root: Path) -> None:
    _make_dataset(root)
    splits = {"train": ["img00", "img01", "img02", "img03", "ghost"], "val": ["img04"]}
    (root / "splits.json").write_text(json.dumps(splits))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_empty, "no images"),
        (_bad_no_mask, "have no mask"),
        (_bad_mask_size, "is 96x64 px but image"),
        (_bad_unreadable, "cannot read"),
        (_bad_too_few, "fewer than one batch"),
        (_bad_splits, "ghost"),
    ],
    ids=["empty", "no-mask", "mask-size", "unreadable", "too-few", "splits-missing"],
)
def test_bad_input_gives_one_clear_line_and_writes_nothing(
    make, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path / "data")
    out = tmp_path / "out"
    assert train_mod.main(_train_args(tmp_path / "data", out, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_input_without_splits_error_names_the_image(tmp_path: Path) -> None:
    _bad_no_mask(tmp_path / "d")
    with pytest.raises(DatasetError, match=r"img03\.png"):
        find_pairs(tmp_path / "d")


# ------------------------------------------------------------------- export / evaluate


def _randomise_batchnorms(ckpt_path: Path, out: Path) -> None:
    """Give every BatchNorm non-trivial statistics, so that fusion is really exercised."""
    ckpt = load_checkpoint(ckpt_path)
    gen = torch.Generator().manual_seed(0)
    for key, value in ckpt["model"].items():
        if key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.5)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
    torch.save(ckpt, out)


def test_export_fused_weights_reproduce_the_unfused_model(run: Path, tmp_path: Path) -> None:
    ckpt_path = tmp_path / "best-randomised.pt"
    _randomise_batchnorms(run / "best.pt", ckpt_path)
    out = tmp_path / "model.safetensors"
    assert export_mod.main(["--checkpoint", str(ckpt_path), "--out", str(out), "--onnx"]) == 0
    unfused = model_from_checkpoint(load_checkpoint(ckpt_path))
    loaded = load_model(out)
    meta = loaded.metadata
    assert meta["act_learn"] == 1 and meta["train_size"] == [SIZE, SIZE]
    assert meta["dataset"]["name"] == "ds" and meta["training"]["data"] == "ds"
    assert "dice" in meta["metrics"]["val"] and meta["code_version"]
    x = torch.randn(2, 3, SIZE, 2 * SIZE)
    with torch.no_grad():
        expected = unfused(x)
        torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=1e-4)
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    # Nothing is overwritten without --overwrite.
    sha = out.read_bytes()
    assert export_mod.main(["--checkpoint", str(ckpt_path), "--out", str(out)]) == 2
    assert out.read_bytes() == sha


def _with_split(run: Path, path: Path, val: list[str]) -> dict[str, list[str]]:
    """Save best.pt with its stored split replaced: ``val`` held out, the rest trained on."""
    ckpt = load_checkpoint(run / "best.pt")
    stems = [f"img{i:02d}" for i in range(8)]
    splits = {"train": [s for s in stems if s not in val], "val": val, "test": []}
    ckpt["dataset"]["splits"] = splits
    torch.save(ckpt, path)
    return splits


def test_export_can_re_estimate_batchnorm_statistics(
    run: Path, dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The run's own split (here 5 train / 3 val, which no seeded 80/20 split gives) is
    # used for re-estimation, validation and --test-split, and recorded in the weights.
    splits = _with_split(run, tmp_path / "ckpt.pt", ["img03", "img06", "img07"])
    out = tmp_path / "recal.safetensors"
    args = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(out), "--recalibrate-bn", "4"]
    assert export_mod.main([*args, "--data", str(dataset), "--test-split", "train"]) == 0
    meta = load_model(out).metadata
    assert meta["bn_recalibrated_on_train_images"] == 4
    assert "after re-estimating" in meta["metrics"]["val"]["note"]
    assert 0 <= meta["metrics"]["val"]["dice"] <= 1
    assert meta["metrics"]["val"]["n"] == 3 and meta["metrics"]["train"]["n"] == 5
    assert meta["dataset"]["split"] == {"seed": 3, "val_fraction": 0.2, **split_digest(splits)}
    # Evaluating the weights on a split other than the recorded one says so.
    with caplog.at_level(logging.WARNING, logger="training.evaluate"):
        rows = evaluate_mod.evaluate(dataset, out, split="val")
    assert [r["stem"] for r in rows["fused"]] == ["img00", "img05"]  # seed 3, as trained
    assert "is not the one recorded" in caplog.text


def test_export_failures_give_one_line_and_leave_no_file(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import napari_lvunet.export as onnx_export

    out = tmp_path / "m.safetensors"
    args = ["--checkpoint", str(run / "best.pt"), "--out", str(out), "--onnx"]

    def broken(model: LVUNet, path: Path, **kwargs: object) -> Path:
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    assert export_mod.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: ONNX export failed, nothing was written: the exporter broke"
    ]
    assert list(tmp_path.iterdir()) == []  # so a rerun is not refused

    def someone_else_writes_the_onnx(model: LVUNet, path: Path, **kwargs: object) -> Path:
        out.with_suffix(".onnx").write_text("theirs")
        Path(path).write_bytes(b"graph")
        return Path(path)

    monkeypatch.setattr(onnx_export, "export_onnx", someone_else_writes_the_onnx)
    assert export_mod.main(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "m.onnx appeared while exporting" in line
    assert out.with_suffix(".onnx").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # the weights removed


def test_export_refuses_a_checkpoint_before_act_learn_reaches_one(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = load_checkpoint(run / "last.pt")
    for key in ckpt["model"]:
        if key.endswith("act_learn"):
            ckpt["model"][key] = torch.tensor(0.5)
    torch.save(ckpt, tmp_path / "early.pt")
    out = tmp_path / "m.safetensors"
    assert export_mod.main(["--checkpoint", str(tmp_path / "early.pt"), "--out", str(out)]) == 2
    assert "act_learn=0.5000" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bias", [10.0, -10.0], ids=["all-foreground", "all-background"])
def test_evaluate_returns_known_dice(
    bias: float, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real fused model whose head ignores its input: every pixel gets logit `bias`,
    # so each image's Dice follows from its mask alone.
    model = LVUNet(1, fused=True)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(bias)
    weights = save_weights(model, tmp_path / "const.safetensors", {"train_size": [SIZE, SIZE]})
    csv_path = tmp_path / "metrics.csv"
    args = [
        "--data",
        str(dataset),
        "--weights",
        str(weights),
        "--split",
        "all",
        "--csv",
        str(csv_path),
    ]
    assert evaluate_mod.main(args) == 0
    printed = capsys.readouterr().out
    assert "fused" in printed and "dice" in printed
    rows = {r.split(",")[1]: r.split(",") for r in csv_path.read_text().splitlines()[1:]}
    expected = []
    for pair in find_pairs(dataset):
        mask = np.asarray(Image.open(pair.mask)) > 0
        t, n = int(mask.sum()), mask.size
        # all foreground: 2t / (t + n); all background: 1 for an empty mask, else 0
        dice = 2 * t / (t + n) if bias > 0 else float(t == 0)
        expected.append(dice)
        assert float(rows[pair.stem][2]) == pytest.approx(dice, abs=1e-9)
    assert f"{np.mean(expected):.4f}" in printed


def test_evaluate_checkpoint_reports_fused_and_unfused(run: Path, dataset: Path) -> None:
    rows = evaluate_mod.evaluate(dataset, run / "best.pt", split="val")
    assert set(rows) == {"unfused", "fused"} and len(rows["fused"]) == 2
    for a, b in zip(rows["fused"], rows["unfused"], strict=True):
        assert a["stem"] == b["stem"] and a["dice"] == pytest.approx(b["dice"], abs=1e-3)
    # The run's val split (seed 3), not a seed-0 one.
    assert [r["stem"] for r in rows["fused"]] == json.loads((run / "splits.json").read_text())[
        "val"
    ]


def test_evaluate_uses_the_split_the_checkpoint_records(
    run: Path, dataset: Path, tmp_path: Path
) -> None:
    _with_split(run, tmp_path / "stored.pt", ["img03", "img06", "img07"])
    rows = evaluate_mod.evaluate(dataset, tmp_path / "stored.pt", split="val")
    assert [r["stem"] for r in rows["unfused"]] == ["img03", "img06", "img07"]
    # Another dataset is split by its own splits.json.
    other = shutil.copytree(dataset, tmp_path / "other")
    splits = {"train": ["img00", "img01"], "val": ["img03"], "test": ["img02"]}
    (other / "splits.json").write_text(json.dumps(splits))
    rows = evaluate_mod.evaluate(other, tmp_path / "stored.pt", split="test")
    assert [r["stem"] for r in rows["unfused"]] == ["img02"]
    # Checkpoints without stem lists: the split is drawn with the run's seed and fraction.
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["dataset"] = {"name": "ds", "splits": {"train": "train", "val": "val"}}
    ckpt["config"]["val_fraction"] = 0.5
    torch.save(ckpt, tmp_path / "old.pt")
    stems = [p.stem for p in find_pairs(dataset)]
    expected = resolve_splits(dataset, stems, seed=3, val_fraction=0.5)["val"]
    assert expected != resolve_splits(dataset, stems, seed=0)["val"]
    rows = evaluate_mod.evaluate(dataset, tmp_path / "old.pt", split="val")
    assert [r["stem"] for r in rows["unfused"]] == expected


def test_write_csv_is_atomic_and_never_overwrites(tmp_path: Path) -> None:
    rows = {"fused": [{"stem": "a", **dict.fromkeys(METRIC_NAMES, 0.5)}]}
    taken = tmp_path / "taken.csv"
    taken.write_text("keep me")
    with pytest.raises(FileExistsError):
        evaluate_mod.write_csv(taken, rows)
    assert taken.read_text() == "keep me"
    written = evaluate_mod.write_csv(tmp_path / "new.csv", rows)
    assert written.read_text().splitlines() == [
        "model,stem,dice,iou,precision,recall",
        "fused,a,0.5,0.5,0.5,0.5",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.csv", "taken.csv"]


# -------------------------------------------------------------------------- fine-tune


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six pairs of different sizes, one image JPEG and one mask TIFF."""
    root = _make_dataset(
        tmp_path_factory.mktemp("ft") / "corrections",
        n=6,
        sizes=[(100, 150), (128, 128), (90, 200), (160, 120), (140, 140), (70, 90)],
    )
    Image.open(root / "images" / "img01.png").save(root / "images" / "img01.jpg", quality=95)
    (root / "images" / "img01.png").unlink()
    import tifffile

    tifffile.imwrite(
        root / "masks" / "img02.tif", np.asarray(Image.open(root / "masks" / "img02.png"))
    )
    (root / "masks" / "img02.png").unlink()
    return root


def test_finetune_writes_weights_the_plugin_loads_and_runs(
    run: Path,
    mixed_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from napari_lvunet.inference import Segmenter

    # An unrelated checkpoint already holds the name the weights would get: neither
    # file of the pair may take it, and it is left alone.
    monkeypatch.setattr(finetune_mod, "_timestamp", lambda: "T")
    (tmp_path / "out").mkdir()
    taken = tmp_path / "out" / "lvunet-finetuned-corrections-T.pt"
    taken.write_bytes(b"someone's checkpoint")
    calls: list[tuple[int, int, dict]] = []
    path = finetune(
        mixed_folder,
        run / "best.pt",
        tmp_path / "out",
        epochs=2,
        lr=1e-4,
        progress=lambda e, total, m: calls.append((e, total, m)),
        batch_size=4,
    )
    assert [(e, t) for e, t, _ in calls] == [(1, 2), (2, 2)]
    assert {"loss", "train_dice", "heldout_dice"} <= set(calls[-1][2])
    loaded = load_model(path)
    meta = loaded.metadata
    assert meta["metrics"]["heldout_after"]["dice"] == pytest.approx(calls[-1][2]["heldout_dice"])
    assert len(meta["dataset"]["heldout_images"]) == 1 and meta["train_size"] == [SIZE, SIZE]
    assert path.with_suffix(".pt").is_file()  # unfused, to fine-tune again from
    assert path.name == "lvunet-finetuned-corrections-T-2.safetensors"
    assert taken.read_bytes() == b"someone's checkpoint"
    image = np.asarray(Image.open(mixed_folder / "images" / "img00.png"))
    labels = Segmenter(loaded, device="cpu", backend="torch").segment(image)
    assert labels.shape == image.shape[:2]

    # Fine-tuning again from the weights (what the widget passes) starts from their .pt.
    with caplog.at_level(logging.INFO, logger="training.finetune"):
        model, _, base = finetune_mod._load_start(path)
    assert not model.fused and base["checkpoint"] == path.with_suffix(".pt").name
    assert f"starting from the unfused checkpoint {path.with_suffix('.pt')}" in caplog.text
    # ... but not from a .pt that does not fuse to exactly those weights.
    other = shutil.copy(path, tmp_path / "other.safetensors")
    ckpt = load_checkpoint(path.with_suffix(".pt"))
    ckpt["model"]["head.weight"] += 0.01
    torch.save(ckpt, tmp_path / "other.pt")
    model, _, base = finetune_mod._load_start(other)
    assert model.fused and base["name"] == "other"


def test_finetune_from_fused_weights_and_cli(
    run: Path, mixed_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fused = tmp_path / "start.safetensors"
    export_mod.export_checkpoint(run / "best.pt", fused)
    out = tmp_path / "ft"
    args = [
        "--data",
        str(mixed_folder),
        "--weights",
        str(fused),
        "--out",
        str(out),
        "--epochs",
        "1",
    ]
    assert finetune_mod.main(args) == 0
    printed = capsys.readouterr().out
    (written,) = out.glob("*.safetensors")
    assert f"fused weights written to {written}" in printed and "held-out Dice" in printed
    assert load_model(written).metadata["base_weights"]["name"] == "start"


def test_finetune_cancel_stops_and_writes_nothing(
    run: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FinetuneCancelled, match="nothing was written"):
        finetune(mixed_folder, run / "best.pt", tmp_path / "out", epochs=3, cancel=cancel)
    assert not (tmp_path / "out").exists()


def test_diverged_finetune_says_so_and_writes_nothing(
    run: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finetune_mod, "WeightedBCEDiceLoss", _NanWeightedLoss)
    with pytest.raises(FinetuneError, match="the loss became nan: lower --lr"):
        finetune(dataset, run / "best.pt", tmp_path / "out", epochs=1)
    assert not (tmp_path / "out").exists()


def test_finetune_needs_two_images(run: Path, tmp_path: Path) -> None:
    _make_dataset(tmp_path / "one", n=1)
    with pytest.raises(DatasetError, match="at least 2"):
        finetune(tmp_path / "one", run / "best.pt", tmp_path / "out", epochs=1)


# ------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_gloo_ddp_run(dataset: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training.train",
        *_train_args(dataset, out, "--epochs", "2", "--batch-size", "2", "--device", "cpu"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["metrics"]["val_dice"] >= 0
    info = json.loads((out / "config.json").read_text())
    assert info["world_size"] == 2
    # Only rank 0 writes: one log line per epoch, no stray temporary files.
    assert len((out / "log.csv").read_text().splitlines()) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "config.json", "curves.png", "last.pt", "log.csv", "splits.json"]
    )
    assert proc.stderr.count("epoch 2/2") == 1


def test_config_rejects_sizes_the_network_cannot_take() -> None:
    with pytest.raises(train_mod.ConfigError, match="multiples of 128"):
        TrainConfig(data="x", size=(200, 200)).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_refuses_a_missing_gpu_instead_of_running_on_the_cpu() -> None:
    assert (
        train_mod.select_device("auto") == torch.device("cpu") or torch.backends.mps.is_available()
    )
    with pytest.raises(train_mod.ConfigError, match="--device cuda: no CUDA GPU is available"):
        train_mod.select_device("cuda")
    with pytest.raises(train_mod.ConfigError, match="unknown device 'tpu'"):
        train_mod.select_device("tpu")


@pytest.mark.parametrize("supported", [True, False])
def test_auto_precision_on_cuda_follows_bf16_support(
    supported: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: torch's probe is replaced; bf16 where supported, else fp16 + scaling.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    expected = torch.bfloat16 if supported else torch.float16
    assert train_mod.autocast_dtype("auto", torch.device("cuda", 0)) == expected
