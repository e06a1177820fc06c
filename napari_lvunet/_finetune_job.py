"""Fine-tuning in a child process, as the widget runs it (no Qt, no torch here).

The widget never trains in napari's own process: training imports torch (and with it,
where installed, triton, whose LLVM crashes a process that runs an OpenGL canvas), holds
its memory until the process ends, and an out-of-memory kill would take napari down with
it. :class:`FinetuneJob` starts ``python -m training.finetune ... --progress json``,
reads its event lines on a thread and reports them through callbacks.

The child's protocol (:mod:`napari_lvunet.finetune_events`, which both sides import):
every event is one stdout line ``@lvunet {json}``, the JSON object
naming its kind under ``"event"``:

* ``start``; ``step`` after every optimiser step (``step``, ``total_steps``, ``epoch``,
  ``epochs``, ``loss``, ``elapsed_s``, ``eta_s``); ``eval``;
* then exactly one of ``done`` (``weights``, the held-out and reference Dice before and
  after, ``steps``, ``total_steps``, ``resume_step``), ``error`` (``message``) or
  ``cancelled``.

Exit codes: 0 done, 1 error, 2 usage (or ``--resume`` refused), 3 cancelled. SIGTERM or
SIGINT cancels the child within a second; it writes no weights, only (after a step) the
state that ``--resume`` goes on from, and every file it writes is written atomically.

Exactly one of ``on_done``, ``on_error`` and ``on_cancelled`` is called per job, after
the child has exited; all callbacks run on the job's reader thread, so a GUI must hand
them to its own thread (the widget uses queued Qt signals).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .finetune_events import EXIT_OK, EXIT_USAGE, parse_event

__all__ = [
    "FinetuneJob",
    "FinetuneResult",
    "FinetuneStep",
    "finetune_argv",
]

logger = logging.getLogger(__name__)


#: How long a cancelled child gets to stop on SIGTERM before it is killed.
KILL_AFTER_S = 1.0

_STDERR_LINES = 40
_STDERR_CHARS = 4000


@dataclass(frozen=True)
class FinetuneStep:
    """Progress after one optimiser step of the child."""

    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    elapsed_s: float
    eta_s: float | None

    def describe(self) -> str:
        """The step in plain words, e.g. ``epoch 2 of 30, loss 0.412, about 3 min left``."""
        text = f"epoch {self.epoch} of {self.epochs}, loss {self.loss:.3f}"
        if self.eta_s is not None and self.step < self.total_steps:
            text += f", {_duration(self.eta_s)} left"
        return text


def _duration(seconds: float) -> str:
    """A time left in plain words: ``8 s``, ``about 3 min``, ``about 1 h 20 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"


@dataclass(frozen=True)
class FinetuneResult:
    """What a finished fine-tune wrote and how it scored, before (the start model) and
    after, on the held-out pairs and on the shipped reference set (``None``: not
    measured).

    ``resume_step`` is set when training stopped early at its time limit and a resumed
    run can go on from that step; ``steps`` of ``total_steps`` were trained.
    """

    weights: Path
    heldout_dice_before: float | None
    heldout_dice_after: float | None
    reference_dice_before: float | None = None
    reference_dice_after: float | None = None
    steps: int | None = None
    total_steps: int | None = None
    resume_step: int | None = None


def finetune_argv(
    data_dir: str | Path,
    weights: str | Path,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    extra: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """The command line of a fine-tune child that reports JSON progress.

    Args:
        data_dir: Folder with ``images/`` and ``masks/``.
        weights: Registry name, ``.safetensors`` file or training ``.pt`` to start from.
        epochs: Passes over the images, instead of a number of steps.
        steps: Optimiser steps (the child's default schedule, 100 steps, when both are
            None).
        out_dir: Where the child writes; its default (``<data_dir>/finetuned``) when None.
        resume: Go on from the state an interrupted run of the same options saved
            (:func:`napari_lvunet.finetune_events.find_resume`).
        extra: Further ``training.finetune`` options, e.g. ``("--lr", "1e-4")``.
        python: The interpreter; this process's own when None.
    """
    argv = [python or sys.executable, "-m", "training.finetune"]
    argv += ["--data", str(data_dir), "--weights", str(weights), "--progress", "json"]
    if epochs is not None:
        argv += ["--epochs", str(int(epochs))]
    if steps is not None:
        argv += ["--steps", str(int(steps))]
    if out_dir is not None:
        argv += ["--out", str(out_dir)]
    if resume:
        argv.append("--resume")
    return argv + list(extra)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# Children still running when the interpreter exits (napari quit while training) are
# stopped, so no orphan keeps training and holding memory after the window is gone.
_RUNNING: weakref.WeakSet[FinetuneJob] = weakref.WeakSet()


@atexit.register
def _stop_running_children() -> None:
    for job in list(_RUNNING):
        job.cancel()
    for job in list(_RUNNING):
        job.wait(KILL_AFTER_S + 1.0)


class FinetuneJob:
    """One fine-tune child process and the thread that reads its events.

    Args:
        argv: The child's command line (see :func:`finetune_argv`).
        on_progress: Called with a :class:`FinetuneStep` after every optimiser step.
        on_event: Called with every event dict (``start``, ``eval`` ...), before the
            specific callbacks.
        on_done: Called with the :class:`FinetuneResult` when the child succeeded.
        on_error: Called with one message when the child failed, crashed or was killed
            by something other than :meth:`cancel`; it names the exit code or signal and
            ends with the tail of the child's error output when that explains more.
        on_cancelled: Called when the child stopped after :meth:`cancel`.
        cwd: The child's working folder; this process's when None.
        env: Extra environment variables for the child.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        on_progress: Callable[[FinetuneStep], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_done: Callable[[FinetuneResult], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self._on_progress = on_progress
        self._on_event = on_event
        self._on_done = on_done
        self._on_error = on_error
        self._on_cancelled = on_cancelled
        self._cwd = cwd
        self._env = env
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._cancel_requested = threading.Event()
        self._finished = threading.Event()
        self._reader: threading.Thread | None = None
        self._stderr_reader: threading.Thread | None = None
        self._kill_timer: threading.Timer | None = None
        self.last_step: FinetuneStep | None = None
        self.result: FinetuneResult | None = None
        self.error: str | None = None
        self.cancelled = False

    # ---------------------------------------------------------------- control
    def start(self) -> FinetuneJob:
        """Start the child and its reader threads; returns ``self``.

        Raises:
            OSError: If the child cannot be started (no such interpreter, ...).
            RuntimeError: If this job was started before.
        """
        if self._proc is not None:
            raise RuntimeError("a FinetuneJob runs once; make a new one")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # every event line arrives when it is written
        env.update(self._env or {})
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self._cwd,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        _RUNNING.add(self)
        logger.info("fine-tune child %d started: %s", self._proc.pid, " ".join(self.argv))
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, name="lvunet-finetune-stderr", daemon=True
        )
        self._reader = threading.Thread(
            target=self._read_events, name="lvunet-finetune-events", daemon=True
        )
        self._stderr_reader.start()
        self._reader.start()
        return self

    def cancel(self) -> None:
        """Ask the child to stop: SIGTERM now, SIGKILL one second later if it still runs.

        Nothing half-written survives either way: the child writes every file
        atomically. Returns at once; ``on_cancelled`` follows when the child has exited.
        """
        proc = self._proc
        if proc is None or self._finished.is_set() or self._cancel_requested.is_set():
            return
        self._cancel_requested.set()
        self._signal(signal.SIGTERM)
        self._kill_timer = threading.Timer(KILL_AFTER_S, self._kill_if_alive)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job has finished and its last callback has run.

        Returns:
            Whether it finished within ``timeout`` seconds.
        """
        return self._finished.wait(timeout)

    @property
    def pid(self) -> int | None:
        """The child's process id, None before :meth:`start`."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the job was started and has not finished yet."""
        return self._proc is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """The child's exit code (negative: the signal that ended it); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    @property
    def stderr_tail(self) -> str:
        """The last lines the child wrote to its error output."""
        return "\n".join(self._stderr)[-_STDERR_CHARS:]

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if sig == signal.SIGTERM:
                proc.terminate()  # TerminateProcess on Windows
            else:
                proc.kill()
        except ProcessLookupError:  # it ended between poll() and the signal
            pass

    def _kill_if_alive(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            logger.warning(
                "fine-tune child %d did not stop within %.1f s of SIGTERM; killing it",
                proc.pid,
                KILL_AFTER_S,
            )
            self._signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)

    # ---------------------------------------------------------------- reading
    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            line = line.rstrip("\n")
            if line:
                self._stderr.append(line)
                logger.debug("finetune: %s", line)

    def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        final: dict[str, Any] | None = None
        try:
            for line in self._proc.stdout:
                event = self._parse(line)
                if event is None:
                    continue
                self._call(self._on_event, event)
                kind = event.get("event")
                if kind == "step":
                    step = self._step(event)
                    if step is not None:
                        self.last_step = step
                        self._call(self._on_progress, step)
                elif kind in ("done", "error", "cancelled"):
                    final = event
        finally:
            returncode = self._proc.wait()
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if self._stderr_reader is not None:
                self._stderr_reader.join(timeout=5.0)
            _RUNNING.discard(self)
            try:
                self._finish(final, returncode)
            finally:
                self._finished.set()

    @staticmethod
    def _parse(line: str) -> dict[str, Any] | None:
        try:
            event = parse_event(line)
        except ValueError:  # json.JSONDecodeError included
            logger.warning("fine-tune child wrote an unreadable event line: %r", line[:200])
            return None
        if event is None and line.strip():
            logger.debug("finetune: %s", line.rstrip())
        return event

    @staticmethod
    def _step(event: dict[str, Any]) -> FinetuneStep | None:
        try:
            return FinetuneStep(
                step=int(event["step"]),
                total_steps=int(event["total_steps"]),
                epoch=int(event["epoch"]),
                epochs=int(event["epochs"]),
                loss=float(event["loss"]),
                elapsed_s=float(event["elapsed_s"]),
                eta_s=_optional_float(event.get("eta_s")),
            )
        except (KeyError, TypeError, ValueError):
            logger.warning("fine-tune child wrote an incomplete step event: %s", repr(event))
            return None

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # a broken callback must not stop the reader (or the child)
            logger.exception("fine-tune job callback failed")

    # ---------------------------------------------------------------- outcome
    def _finish(self, final: dict[str, Any] | None, returncode: int) -> None:
        kind = None if final is None else final.get("event")
        if kind == "done" and returncode == EXIT_OK:
            try:
                self.result = FinetuneResult(
                    weights=Path(final["weights"]),
                    heldout_dice_before=_optional_float(final.get("heldout_dice_before")),
                    heldout_dice_after=_optional_float(final.get("heldout_dice_after")),
                    reference_dice_before=_optional_float(final.get("reference_dice_before")),
                    reference_dice_after=_optional_float(final.get("reference_dice_after")),
                    steps=_optional_int(final.get("steps")),
                    total_steps=_optional_int(final.get("total_steps")),
                    resume_step=_optional_int(final.get("resume_step")),
                )
            except (KeyError, TypeError, ValueError):
                self.error = f"fine-tuning finished but did not say what it wrote: {final!r}"
                self._call(self._on_error, self.error)
                return
            self._call(self._on_done, self.result)
        elif self._cancel_requested.is_set() or kind == "cancelled":
            # After cancel(): whether it stopped on SIGTERM, was killed a second later or
            # finished just then, a cancelled job reports nothing else.
            self.cancelled = True
            self._call(self._on_cancelled)
        else:
            self.error = self._failure_message(final, returncode)
            self._call(self._on_error, self.error)

    def _failure_message(self, final: dict[str, Any] | None, returncode: int) -> str:
        tail = self.stderr_tail
        if final is not None and final.get("event") == "error" and final.get("message"):
            return f"fine-tuning failed: {final['message']}"
        if returncode < 0:
            name = _signal_name(-returncode)
            message = f"fine-tuning was stopped by {name}"
            if -returncode == getattr(signal, "SIGKILL", -1):
                message += (
                    " (the system kills a process this way when memory runs out: try fewer "
                    "or smaller images, a smaller batch, or close other programs)"
                )
        elif returncode == EXIT_USAGE:
            message = "fine-tuning did not start: its command line was refused"
        elif returncode == EXIT_OK:
            message = "fine-tuning ended without reporting a result"
        else:
            message = f"fine-tuning crashed (exit code {returncode})"
        if tail:
            message += "; its last error output:\n" + tail
        return message
