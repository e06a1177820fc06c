"""``python -m training.finetune`` as the napari widget runs it: a real child process on
tiny generated data, read through its ``@lvunet`` event lines and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_lvunet._torch import TRAIN_INSTALL
from napari_lvunet.cancel import Cancelled
from napari_lvunet.finetune_events import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    PREFIX,
    format_event,
    parse_event,
    read_resume_state,
)
from training.finetune import FinetuneCancelled

REPO = Path(__file__).resolve().parent.parent
SIZE = 128


def _make_folder(root: Path, n: int = 6) -> Path:
    """n image/mask pairs at 128 px: a bright disc and its mask."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        cy, cx = rng.integers(32, 96, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25**2
        image[disc] += np.array([170, 80, 40], np.uint8)
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"c{i}.png")
    return root


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused weights of an untrained network at 128 px: a real start for fine-tuning."""
    from napari_lvunet.model import LVUNet
    from napari_lvunet.weights import save_weights

    folder = tmp_path_factory.mktemp("weights")
    return save_weights(
        LVUNet(1, fused=True), folder / "start.safetensors", {"train_size": [SIZE, SIZE]}
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make_folder(tmp_path / "corrections")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _command(folder: Path, weights: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training.finetune", "--data", str(folder),
        "--weights", str(weights), "--batch-size", "2", "--device", "cpu",
        "--precision", "fp32", "--reference", "none", *extra,
    ]  # fmt: skip


def _events(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    # In json mode stdout carries event lines and nothing else.
    assert all(line.startswith(PREFIX) for line in lines), stdout
    return [parse_event(line) for line in lines]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_event_lines_round_trip_and_reject_non_finite_numbers() -> None:
    line = format_event("step", step=1, loss=float("nan"), eta_s=float("inf"))
    assert line == '@lvunet {"event":"step","step":1,"loss":null,"eta_s":null}'
    assert parse_event(line + "\n") == {"event": "step", "step": 1, "loss": None, "eta_s": None}
    assert parse_event("epoch 1/2 loss 0.3") is None
    with pytest.raises(ValueError):
        parse_event(PREFIX + "[1, 2]")
    assert issubclass(FinetuneCancelled, Cancelled)


def test_json_progress_reports_every_step_then_done(
    folder: Path, start_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = _command(
        folder, start_weights, "--epochs", "2", "--out", str(out), "--progress", "json",
        "--reference", "shipped",
    )  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    events = _events(proc.stdout)
    start, *rest, done = events
    # 6 pairs: 1 held out, 5 trained on in batches of 2 -> 3 steps per epoch
    assert start == {
        "event": "start",
        "pairs": 6,
        "train_pairs": 5,
        "heldout_pairs": 1,
        "total_steps": 6,
        "epochs": 2,
    }
    steps = [e for e in rest if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [e["epoch"] for e in steps] == [1, 1, 1, 2, 2, 2]
    for e in steps:
        assert e["total_steps"] == 6 and e["epochs"] == 2
        assert np.isfinite(e["loss"]) and e["elapsed_s"] >= 0 and e["eta_s"] >= 0
    assert steps[-1]["eta_s"] == 0
    assert [e["epoch"] for e in rest if e["event"] == "eval"] == [0, 1, 2]
    assert {e["event"] for e in rest} == {"step", "eval"}
    assert done["event"] == "done"
    weights = Path(done["weights"])
    assert weights.is_absolute() and weights.parent == out and weights.is_file()
    assert 0 <= done["heldout_dice_before"] <= 1 and 0 <= done["heldout_dice_after"] <= 1
    # The forgetting check: the start model and the result on the shipped reference set.
    from napari_lvunet.weights import load_model
    from training.evaluate import evaluate_pairs, summarize
    from training.reference import reference_pairs

    assert (
        next(e.get("reference_dice") for e in rest if e["event"] == "eval")
        == (done["reference_dice_before"])
    )
    for key, scored in (("before", start_weights), ("after", weights)):
        loaded = load_model(scored)
        rows = evaluate_pairs({"m": loaded.model}, reference_pairs(), loaded.train_size)["m"]
        assert len(rows) == 32
        assert done[f"reference_dice_{key}"] == pytest.approx(summarize(rows)["dice"], rel=1e-6)
    assert (done["steps"], done["total_steps"], done["resume_step"]) == (6, 6, None)
    assert not (out / "resume").exists()  # finished: nothing left to resume
    # The human-readable summary went to stderr.
    assert f"fused weights written to {weights}" in proc.stderr


@pytest.mark.parametrize(
    ("signum", "after"),
    [(signal.SIGTERM, "step"), (signal.SIGINT, "step"), (signal.SIGTERM, "start")],
    ids=["sigterm-mid-training", "sigint-mid-training", "sigterm-while-loading"],
)
def test_a_signal_cancels_within_a_second_and_writes_nothing(
    signum: int, after: str, folder: Path, start_weights: Path, tmp_path: Path
) -> None:
    before = _files(tmp_path)
    cmd = _command(folder, start_weights, "--epochs", "500", "--progress", "json")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(parse_event(line))
            if seen[-1]["event"] == after:
                break
        assert seen and seen[-1]["event"] == after, proc.stderr.read()[-3000:]
        sent = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert code == EXIT_CANCELLED, proc.stderr.read()[-3000:]
    assert _events(rest)[-1] == {"event": "cancelled"}
    assert took < 5.0  # promised: 1 s; generous here for a loaded test machine
    # No weights and no temporary file. After a step, the state --resume goes on from
    # may be there (saved when the loop noticed the signal between steps), complete.
    out = folder / "finetuned"
    written = sorted(set(_files(tmp_path)) - set(before))
    if after == "start":
        assert written == [] and not out.exists()
    elif written:
        (record,) = (out / "resume").glob("*.json")
        state = read_resume_state(record)
        assert 1 <= state.step < 1500
        assert written == sorted(
            str(p.relative_to(tmp_path)) for p in (out, out / "resume", record, state.tensors)
        )


def test_a_crash_on_bad_data_is_an_error_event_and_exit_1(
    folder: Path, start_weights: Path
) -> None:
    (folder / "images" / "c3.png").write_bytes(b"not a png at all")
    before = _files(folder)
    cmd = _command(folder, start_weights, "--epochs", "1", "--progress", "json")
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_ERROR
    events = _events(proc.stdout)
    assert [e["event"] for e in events][-1] == "error"
    assert "step" not in {e["event"] for e in events}
    message = events[-1]["message"]
    assert "cannot read" in message and "c3.png" in message and "\n" not in message
    assert _files(folder) == before


def test_time_limit_stops_at_a_step_and_still_writes_the_result(
    folder: Path, start_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = _command(
        folder, start_weights, "--epochs", "200", "--out", str(out), "--progress", "json",
        "--max-minutes", "0.002",
    )  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    events = _events(proc.stdout)
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert 1 <= len(steps) < 600 and steps == list(range(1, len(steps) + 1))
    assert events[-1]["event"] == "done"
    from napari_lvunet.weights import read_metadata

    meta = read_metadata(Path(events[-1]["weights"]))
    assert meta["finetune"]["steps"] == len(steps) and meta["finetune"]["total_steps"] == 600
    assert meta["finetune"]["stopped_at_time_limit_minutes"] == 0.002
    assert "time limit" in proc.stderr


@pytest.mark.parametrize(
    "bad",
    [["--epochs", "0"], ["--lr", "inf"], ["--lr", "-1e-3"], ["--batch-size", "0"],
     ["--max-minutes", "0"], ["--progress", "xml"]],
    ids=["epochs", "lr-inf", "lr-negative", "batch-size", "max-minutes", "progress"],
)  # fmt: skip
def test_bad_options_are_usage_errors(bad: list[str], folder: Path, start_weights: Path) -> None:
    before = _files(folder)
    cmd = _command(folder, start_weights, *bad)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert bad[0] in proc.stderr and proc.stdout == ""
    assert _files(folder) == before


@pytest.mark.parametrize("command", ["train", "finetune", "evaluate", "export"])
def test_without_torch_every_command_names_the_install_line(command: str, tmp_path: Path) -> None:
    # A sitecustomize makes torch unimportable, as on a core install.
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    proc = subprocess.run(
        [sys.executable, "-m", f"training.{command}", "--help"],
        cwd=REPO,
        env=_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: training needs PyTorch, which is not installed here; install it with: "
        f"{TRAIN_INSTALL}"
    ]
    assert proc.stdout == ""


def test_events_parse_on_the_widget_side_without_torch() -> None:
    # The widget imports napari_lvunet.finetune_events in napari's process: no torch there.
    code = (
        "import sys; import napari_lvunet.finetune_events as e; "
        "assert e.parse_event(e.format_event('cancelled')) == {'event': 'cancelled'}; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(format_event("x", a=[1.5])[len(PREFIX) :]) == {"event": "x", "a": [1.5]}


def _tensors_sha256(weights: Path) -> str:
    from napari_lvunet.weights import read_metadata

    return read_metadata(weights)["tensors_sha256"]


def test_resume_after_a_time_limit_goes_on_and_gives_the_same_weights(
    folder: Path, start_weights: Path, tmp_path: Path
) -> None:
    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = _command(
            folder, start_weights, "--steps", "8", "--out", str(out), "--progress", "json", *extra
        )
        return subprocess.run(
            cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
        )

    whole = run(tmp_path / "whole")
    assert whole.returncode == EXIT_OK, whole.stderr[-3000:]
    reference = Path(_events(whole.stdout)[-1]["weights"])

    out = tmp_path / "cut"
    cut = run(out, "--max-minutes", "0.0005")  # 30 ms: stops after its first step or so
    assert cut.returncode == EXIT_OK, cut.stderr[-3000:]
    done = _events(cut.stdout)[-1]
    k = done["steps"]
    assert 1 <= k < 8 and done["resume_step"] == k and done["total_steps"] == 8
    (record,) = (out / "resume").glob("*.json")
    assert read_resume_state(record).step == k

    # Changed pairs: refused with a one-line message, exit 2, the state kept as it was.
    mask = folder / "masks" / "c0.png"
    kept = mask.read_bytes()
    mask.write_bytes((folder / "masks" / "c1.png").read_bytes())
    refused = run(out, "--resume")
    assert refused.returncode == EXIT_USAGE
    (error,) = [e for e in _events(refused.stdout) if e["event"] == "error"]
    assert "pairs" in error["message"] and "changed" in error["message"]
    assert "\n" not in error["message"] and '"event":"step"' not in refused.stdout
    assert read_resume_state(record).step == k
    mask.write_bytes(kept)

    resumed = run(out, "--resume")
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    events = _events(resumed.stdout)
    assert events[0]["resume_step"] == k
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(k + 1, 9))
    final = Path(events[-1]["weights"])
    assert events[-1]["resume_step"] is None and final != Path(done["weights"])
    assert _tensors_sha256(final) == _tensors_sha256(reference)  # bit for bit
    assert not (out / "resume").exists()  # finished: nothing left to resume


def test_resume_after_a_crash_and_a_cancel_gives_the_same_weights(
    folder: Path, start_weights: Path, tmp_path: Path
) -> None:
    import threading

    import torch

    from training.finetune import FinetuneResumeError, finetune

    torch.set_num_threads(1)  # as the uninterrupted run below
    options = dict(steps=12, batch_size=2, device="cpu", precision="fp32", reference=None)
    reference = finetune(folder, start_weights, tmp_path / "whole", **options)

    out = tmp_path / "cut"

    def crash_at(step: int):
        def events(name: str, **fields) -> None:
            if name == "step" and fields["step"] == step:
                raise RuntimeError("a crash in the middle of training")

        return events

    with pytest.raises(RuntimeError, match="crash"):
        finetune(folder, start_weights, out, events=crash_at(8), **options)
    (record,) = (out / "resume").glob("*.json")
    assert read_resume_state(record).step == 5  # the last periodic save (every 5 steps)
    assert not list(out.glob("*.safetensors"))

    with pytest.raises(FinetuneResumeError, match=r"lr 0\.003 \(now 0\.001\)"):
        finetune(folder, start_weights, out, resume=True, **{**options, "lr": 1e-3})
    with pytest.raises(FinetuneResumeError, match="nothing to resume"):
        finetune(folder, start_weights, tmp_path / "elsewhere", resume=True, **options)

    cancel = threading.Event()
    seen: list[int] = []

    def cancel_at_9(name: str, **fields) -> None:
        if name == "step":
            seen.append(fields["step"])
            if fields["step"] == 9:
                cancel.set()

    with pytest.raises(FinetuneCancelled, match="goes on from step 9"):
        finetune(
            folder, start_weights, out, resume=True, cancel=cancel, events=cancel_at_9, **options
        )
    assert seen == [6, 7, 8, 9]
    assert read_resume_state(record).step == 9  # saved on cancel
    assert sorted(p.name for p in (out / "resume").iterdir()) == sorted(
        [record.name, read_resume_state(record).tensors.name]
    )  # the earlier tensors file is gone

    final = finetune(folder, start_weights, out, resume=True, **options)
    assert _tensors_sha256(final) == _tensors_sha256(reference)
    from napari_lvunet.weights import read_metadata

    assert read_metadata(final)["finetune"]["resumed_from_step"] == 9
    assert not (out / "resume").exists()


def test_replay_follows_what_the_start_model_learnt_from(
    folder: Path, start_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kvasir-SEG replay helps a polyp model and would mislead a skin-lesion one."""
    from napari_lvunet.model import LVUNet
    from napari_lvunet.weights import DEFAULT_MODEL, read_metadata, save_weights
    from training.adapt import DEFAULT_REPLAY
    from training.finetune import default_replay, finetune, learnt_from

    def weights(name: str, metadata: dict) -> Path:
        path = tmp_path / f"{name}.safetensors"
        return save_weights(LVUNet(1, fused=True), path, {"train_size": [SIZE, SIZE], **metadata})

    def replay_share(start: Path, out: str, **options) -> float:
        result = finetune(
            folder, start, tmp_path / out, steps=1, batch_size=2, device="cpu",
            reference=None, **options,
        )  # fmt: skip
        return read_metadata(result)["finetune"]["replay"]["share"]

    assert "Kvasir-SEG" in learnt_from(DEFAULT_MODEL)
    assert default_replay(DEFAULT_MODEL) == DEFAULT_REPLAY
    # A fine-tune names its base: one of the bundled model is a Kvasir-SEG model too.
    polyp = weights("polyp", {"finetune": {}, "base_weights": {"name": DEFAULT_MODEL}})
    assert "Kvasir-SEG" in learnt_from(polyp) and default_replay(polyp) == DEFAULT_REPLAY
    # Nothing recorded (or a base that is a file): unknown, the default holds.
    assert learnt_from(start_weights) is None
    assert default_replay(start_weights) == DEFAULT_REPLAY

    skin = weights("skin", {"dataset": {"name": "isic-2016"}})
    with caplog.at_level("WARNING"):
        assert replay_share(skin, "auto") == 0.0
    assert "learnt from isic-2016" in caplog.text and "--replay" in caplog.text
    assert replay_share(skin, "explicit", replay=0.25) == 0.25  # the user's choice wins
