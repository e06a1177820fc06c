"""The training commands refuse to produce wrong or lost results (issue 13): outputs are
checked and claimed before work, options are checked before anything is written,
diverged models are errors, stale temporaries go, and messages give safe advice. Real
runs on tiny generated data (128 px, one optimiser step per epoch)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import SIZE, _make_dataset, _train_args

import training.train as train_mod
from napari_lvunet.model import LVUNet
from napari_lvunet.weights import save_weights
from training import evaluate as evaluate_mod
from training import export as export_mod
from training import finetune as finetune_mod
from training.checkpoint import load_checkpoint
from training.outputs import LOCK_NAME

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train_mod.main(_train_args(dataset, out, "--epochs", "2")) == 0
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error")]


# ------------------------------------------------------- #4 one run per folder


def test_two_runs_started_together_on_one_new_folder_cannot_share_it(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    def start(seed: int) -> subprocess.Popen:
        args = _train_args(dataset, out, "--epochs", "3", "--device", "cpu", "--seed", str(seed))
        return subprocess.Popen(
            [sys.executable, "-m", "training.train", *args],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = {seed: start(seed) for seed in (11, 22)}
    results = {seed: (p.wait(timeout=600), p.stderr.read()) for seed, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    (winner,) = [seed for seed, (code, _) in results.items() if code == 0]
    (loser_err,) = [err for code, err in results.values() if code == 2]
    (line,) = _error_lines(loser_err)
    assert "another training process is using the run folder" in line or "already exists" in line
    # The folder holds exactly one run: the winner's, complete and unlocked.
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["seed"] == winner and ckpt["epoch"] == 3
    assert not (out / LOCK_NAME).exists()


def test_a_held_folder_is_refused_and_a_failed_run_leaves_no_folder(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.outputs import RunClaim

    out = tmp_path / "nested" / "run"
    with RunClaim(out):  # another process would hold it the same way
        assert train_mod.main(_train_args(dataset, out, "--epochs", "1")) == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert "another training process is using the run folder" in line
    assert not (tmp_path / "nested").exists()  # made by the claim, nothing written: gone
    # A run that fails after claiming (here: on its data) removes the folder it made.
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    assert train_mod.main(_train_args(bad, out, "--epochs", "1")) == 2
    assert not (tmp_path / "nested").exists()


# ------------------------------------------------------------- #5 NaN is an error


def test_a_diverging_run_is_an_error_and_no_nan_epoch_is_kept(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train_mod.main(_train_args(dataset, out, "--epochs", "3", "--lr", "1e6")) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "diverged" in line and "lower --lr" in line
    # Whatever was saved is from epochs whose every number was finite; a NaN epoch
    # was never written, so it was never "best".
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            ckpt = load_checkpoint(out / name)
            for row in ckpt["history"]:
                assert all(torch.isfinite(torch.tensor(float(v))) for v in row.values()), row


def test_export_refuses_a_model_whose_logits_are_not_finite(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = load_checkpoint(run / "best.pt")
    key = next(k for k in ckpt["model"] if k.endswith("running_var"))
    ckpt["model"][key].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    out = tmp_path / "m.safetensors"
    assert export_mod.main(["--checkpoint", str(tmp_path / "nan.pt"), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "not finite" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]


# ----------------------------------------------------- #8 options checked first


@pytest.mark.parametrize(
    "bad",
    [
        ["--workers", "-1"], ["--threads", "-2"], ["--threads", "0"], ["--batch-size", "0"],
        ["--lr", "inf"], ["--lr", "0"], ["--lr", "nan"], ["--min-lr", "-1"],
        ["--weight-decay", "inf"], ["--epochs", "0"], ["--size", "200"],
        ["--val-fraction", "1"], ["--hold-fraction", "0"], ["--min-scale", "1.5"],
        ["--bn-recalibration", "-1"], ["--max-steps", "0"], ["--seed", "-1"],
    ],
    ids=lambda bad: "".join(bad),
)  # fmt: skip
def test_train_rejects_bad_numbers_before_writing_anything(
    bad: list[str], dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main([*_train_args(dataset, out, "--epochs", "1"), *bad])
    assert exit_info.value.code == 2
    assert f"argument {bad[0]}" in capsys.readouterr().err
    assert not out.exists()  # no config.json, no splits.json, no folder


def test_evaluate_and_export_reject_bad_numbers(
    run: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_mod.main(
            ["--data", str(dataset), "--weights", str(run / "best.pt"), "--batch-size", "0"]
        )
    assert exit_info.value.code == 2 and "--batch-size" in capsys.readouterr().err
    args = ["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "m.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        export_mod.main([*args, "--recalibrate-bn", "-1"])
    assert exit_info.value.code == 2 and "--recalibrate-bn" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- #9 stale temporaries


def test_resume_removes_temporaries_left_by_a_killed_checkpoint_write(
    run: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    stale = [copy / ".last.pt.1a2b3c4d.tmp", copy / ".best.pt.deadbeef.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    theirs = [copy / ".notes.tmp", copy / ".last.pt.mine.tmp"]  # not atomic_write's
    for path in theirs:
        path.write_text("keep")
    assert train_mod.main(["--resume", str(copy), "--epochs", "3", "--no-progress"]) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "keep" for p in theirs)
    assert load_checkpoint(copy / "last.pt")["epoch"] == 3


# --------------------------------------------------------- #11 small things


def test_export_advice_names_its_own_split_option(
    run: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A folder of the run's dataset name that lacks the run's val images.
    val = load_checkpoint(run / "best.pt")["dataset"]["splits"]["val"]
    other = Path(shutil.copytree(dataset, tmp_path / "other" / "ds"))
    for stem in val:
        (other / "images" / f"{stem}.png").unlink()
        (other / "masks" / f"{stem}.png").unlink()
    out = tmp_path / "m.safetensors"
    args = ["--checkpoint", str(run / "best.pt"), "--out", str(out), "--data", str(other)]
    assert export_mod.main([*args, "--test-split", "val"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--test-split all" in line
    assert "--split" not in line.replace("--test-split", "")
    assert not out.exists()


class _Payload:
    """Stands for code a malicious checkpoint would run when unpickled."""

    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_a_malicious_checkpoint_is_refused_without_unsafe_advice(
    tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": "napari-lvunet.train-checkpoint.v1", "x": _Payload()}, evil)
    out = tmp_path / "m.safetensors"
    assert export_mod.main(["--checkpoint", str(evil), "--out", str(out)]) == 2
    assert finetune_mod.main(["--data", str(dataset), "--weights", str(evil)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("error: ") and "refusing" in line and "never loaded" in line
        assert "weights_only" not in line and "trusted" not in line
    assert not out.exists()


# ------------------------------------------- #2 fine-tune output checked first


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("w")
    return save_weights(LVUNet(1, fused=True), folder / "w.safetensors", {"train_size": [SIZE] * 2})


def test_finetune_refuses_an_output_that_is_a_file_before_training(
    dataset: Path, start_weights: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "out"
    taken.write_text("a file")
    events: list[str] = []
    for out in (taken, taken / "sub"):
        with pytest.raises(finetune_mod.FinetuneError, match="is a file") as info:
            finetune_mod.finetune(
                dataset, start_weights, out, epochs=1, events=lambda e, **f: events.append(e)
            )
        assert "\n" not in str(info.value) and "--out" in str(info.value)
    assert events == []  # not even started
    assert taken.read_text() == "a file"


def test_a_failed_write_of_the_result_leaves_no_empty_folder(
    dataset: Path, start_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_lvunet.weights as weights_mod

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(weights_mod, "save_weights", disk_full)
    out = tmp_path / "new" / "out"
    with pytest.raises(finetune_mod.FinetuneError, match="cannot write the result") as info:
        finetune_mod.finetune(dataset, start_weights, out, epochs=1, batch_size=4)
    assert os.strerror(errno.ENOSPC) in str(info.value)
    assert not out.exists()


def _read_only(folder: Path, cmd: list[str]) -> list[str]:
    """``cmd`` with ``folder`` read-only for it: chmod, or for root (which writes into
    any folder) a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return cmd
    wrap = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]
    probe = subprocess.run([*wrap, "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: no way to make a read-only folder")
    return [*wrap, *cmd]


@pytest.mark.parametrize("case", ["read-only-data-default-out", "read-only-out"])
def test_finetune_refuses_a_read_only_output_before_training(
    case: str, dataset: Path, start_weights: Path, tmp_path: Path
) -> None:
    data = Path(shutil.copytree(dataset, tmp_path / "data"))
    ro = data if case.startswith("read-only-data") else tmp_path / "ro"
    ro.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "training.finetune", "--data", str(data), "--weights",
           str(start_weights), "--epochs", "1", "--progress", "json"]  # fmt: skip
    if case == "read-only-out":
        cmd += ["--out", str(ro)]
    before = sorted(tmp_path.rglob("*"))
    try:
        proc = subprocess.run(
            _read_only(ro, cmd), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
        )
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()
    assert line.startswith('@lvunet {"event":"error"') and "--out" in line
    assert ("cannot create" if ro == data else "cannot write to") in line
    assert sorted(tmp_path.rglob("*")) == before
