"""The widget's fine-tune child process (``_finetune_job``), without Qt.

Real children throughout: ``python -m training.finetune`` on tiny generated folders, and,
for the ways a child can die that a healthy fine-tune never shows (killed by the
out-of-memory killer, a crash with a traceback, deaf to SIGTERM), small Python children
that die exactly that way.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lvunet_test_helpers import assert_only_a_resume_state, tiny_pairs_folder, weights_in_child

from napari_lvunet._finetune_job import (
    KILL_AFTER_S,
    FinetuneJob,
    FinetuneResult,
    FinetuneStep,
    finetune_argv,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals as on Linux and macOS")


# Random fused weights, written by a child so that this test process never imports torch.
@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random.safetensors"
    return weights_in_child(path)


class _Recorder:
    """The callbacks of one job, recorded with the thread they ran on."""

    def __init__(self) -> None:
        self.steps: list[FinetuneStep] = []
        self.events: list[str] = []
        self.done: list[FinetuneResult] = []
        self.errors: list[str] = []
        self.cancelled = 0
        self.threads: set[str] = set()

    def job(self, argv: list[str]) -> FinetuneJob:
        def note(store):
            def callback(*args):
                self.threads.add(threading.current_thread().name)
                store(*args)

            return callback

        return FinetuneJob(
            argv,
            on_progress=note(self.steps.append),
            on_event=note(lambda e: self.events.append(e["event"])),
            on_done=note(self.done.append),
            on_error=note(self.errors.append),
            on_cancelled=note(lambda: setattr(self, "cancelled", self.cancelled + 1)),
        )

    @property
    def endings(self) -> int:
        return len(self.done) + len(self.errors) + self.cancelled


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_argv() -> None:
    argv = finetune_argv("/d", "m", epochs=3, out_dir="/o", extra=("--lr", "1e-3"), python="py")
    assert argv == [
        "py", "-m", "training.finetune", "--data", "/d", "--weights", "m",
        "--progress", "json", "--epochs", "3", "--out", "/o", "--lr", "1e-3",
    ]  # fmt: skip
    assert finetune_argv("/d", "m")[0] == sys.executable
    assert finetune_argv("/d", "m", steps=7, resume=True, python="py")[-3:] == [
        "--steps", "7", "--resume",
    ]  # fmt: skip


def test_step_in_plain_words() -> None:
    step = FinetuneStep(3, 60, 2, 30, 0.41234, 12.0, 190.0)
    assert step.describe() == "epoch 2 of 30, loss 0.412, about 3 min left"
    assert "left" not in FinetuneStep(60, 60, 30, 30, 0.1, 99.0, 0.0).describe()
    assert FinetuneStep(1, 9, 1, 3, 0.5, 1.0, 7.6).describe().endswith("8 s left")
    assert FinetuneStep(1, 9, 1, 3, 0.5, 1.0, 4900).describe().endswith("about 1 h 22 min left")


@pytest.mark.slow
def test_real_finetune_reports_every_step_and_the_weights(tmp_path, weights_file) -> None:
    folder = tiny_pairs_folder(tmp_path / "data", n=5)
    rec = _Recorder()
    # 4 training pairs (one held out), 2 per step: 2 steps per epoch, 4 in all.
    job = rec.job(finetune_argv(folder, weights_file, epochs=2, extra=("--batch-size", "2")))
    job.start()
    assert job.wait(300), "the fine-tune child did not finish"
    assert rec.errors == [] and rec.cancelled == 0, rec.errors
    (result,) = rec.done
    assert result.weights.is_file() and result.weights.parent == folder / "finetuned"
    assert 0.0 <= result.heldout_dice_before <= 1.0 and 0.0 <= result.heldout_dice_after <= 1.0
    # The forgetting check on the shipped reference set, before and after.
    assert 0.0 <= result.reference_dice_before <= 1.0
    assert 0.0 <= result.reference_dice_after <= 1.0
    assert (result.steps, result.total_steps, result.resume_step) == (4, 4, None)
    assert [s.step for s in rec.steps] == [1, 2, 3, 4]
    assert {s.total_steps for s in rec.steps} == {4}
    assert [s.epoch for s in rec.steps] == [1, 1, 2, 2] and rec.steps[-1].epochs == 2
    assert all(np.isfinite(s.loss) and s.elapsed_s >= 0 for s in rec.steps)
    assert rec.events[0] == "start" and rec.events[-1] == "done" and "eval" in rec.events
    assert job.returncode == 0 and not job.running and job.result == result
    assert rec.threads == {"lvunet-finetune-events"}  # never the caller's thread


@pytest.mark.slow
def test_cancel_stops_a_real_finetune_and_writes_nothing(tmp_path, weights_file) -> None:
    folder = tiny_pairs_folder(tmp_path / "data", n=5)
    rec = _Recorder()
    started = threading.Event()
    job = rec.job(finetune_argv(folder, weights_file, epochs=200, extra=("--batch-size", "1")))
    job._on_progress = lambda step: started.set()
    job.start()
    assert started.wait(300), "no training step was reported"
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(10)
    stopped_after = time.monotonic() - t0
    assert rec.cancelled == 1 and rec.endings == 1, (rec.errors, rec.done)
    assert job.returncode is not None  # the process is gone
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)
    # No weights; at most the complete state that "Resume" goes on from.
    assert_only_a_resume_state(folder, weights_file)
    assert stopped_after < 5.0, stopped_after


@pytest.mark.slow
def test_a_folder_without_pairs_is_one_clear_error(tmp_path, weights_file) -> None:
    folder = tmp_path / "empty"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rec = _Recorder()
    job = rec.job(finetune_argv(folder, weights_file, epochs=1)).start()
    assert job.wait(300)
    (message,) = rec.errors
    assert message.startswith("fine-tuning failed: ") and str(folder) in message, message
    assert job.returncode == 1 and rec.endings == 1


def test_a_refused_command_line_says_so(tmp_path) -> None:
    rec = _Recorder()
    job = rec.job(finetune_argv(tmp_path, "m", extra=("--no-such-option",))).start()
    assert job.wait(120)
    (message,) = rec.errors
    assert "command line was refused" in message and "--no-such-option" in message
    assert job.returncode == 2


def test_killed_child_is_reported_as_likely_out_of_memory() -> None:
    rec = _Recorder()
    job = rec.job(
        _python(
            """
            import os, signal, sys
            print('@lvunet {"event":"start","total_steps":4,"epochs":1}', flush=True)
            print("allocating 40 GiB", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
            """
        )
    ).start()
    assert job.wait(30)
    (message,) = rec.errors
    assert "stopped by SIGKILL" in message and "memory" in message
    assert message.endswith("allocating 40 GiB")  # the stderr tail explains the rest
    assert job.returncode == -signal.SIGKILL and rec.events == ["start"]


def test_crash_message_has_a_bounded_stderr_tail() -> None:
    rec = _Recorder()
    job = rec.job(
        _python(
            """
            import sys
            for i in range(500):
                print(f"noise line {i}", file=sys.stderr)
            raise RuntimeError("the real cause")
            """
        )
    ).start()
    assert job.wait(30)
    (message,) = rec.errors
    assert message.startswith("fine-tuning crashed (exit code 1)")
    assert "RuntimeError: the real cause" in message and "noise line 0\n" not in message
    assert len(message) < 5000


def test_exit_zero_without_a_result_is_an_error() -> None:
    rec = _Recorder()
    job = rec.job(
        _python(
            """
            print('@lvunet not json')
            print('@lvunet {"event":"step","step":1}')
            print("ordinary output")
            """
        )
    ).start()
    assert job.wait(30)
    assert rec.errors == ["fine-tuning ended without reporting a result"]
    assert rec.steps == []  # the incomplete step event was not passed on


def test_cancel_kills_a_child_that_ignores_sigterm() -> None:
    rec = _Recorder()
    job = rec.job(
        _python(
            """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print('@lvunet {"event":"start"}', flush=True)
            time.sleep(120)
            """
        )
    )
    started = threading.Event()
    job._on_event = lambda event: started.set()
    job.start()
    assert started.wait(30)
    t0 = time.monotonic()
    job.cancel()
    job.cancel()  # a second press changes nothing
    assert job.wait(10)
    assert KILL_AFTER_S <= time.monotonic() - t0 < 5.0
    assert job.returncode == -signal.SIGKILL
    assert rec.cancelled == 1 and rec.endings == 1


def test_start_once_and_a_missing_interpreter() -> None:
    with pytest.raises(OSError):
        FinetuneJob(["/no/such/python", "-c", "pass"]).start()
    job = FinetuneJob(_python("pass")).start()
    with pytest.raises(RuntimeError, match="runs once"):
        job.start()
    assert job.wait(30)
