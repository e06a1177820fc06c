"""The machine-readable progress protocol of ``python -m training.finetune --progress json``.

The napari widget runs fine-tuning as a child process and reads its standard output.
With ``--progress json`` every event is one line on stdout: the prefix ``@lvunet ``
followed by a compact JSON object, flushed at once; everything else the process prints
goes to stderr. The events, in order:

* ``{"event":"start","pairs":P,"train_pairs":Tp,"heldout_pairs":H,"total_steps":N,
  "epochs":E}``: the data folder was read; nothing is trained yet;
* ``{"event":"step","step":s,"total_steps":N,"epoch":e,"epochs":E,"loss":x,
  "elapsed_s":t,"eta_s":r}``: after every optimiser step (``s`` and ``e`` count from 1);
* ``{"event":"eval","epoch":e,"heldout_dice":d}``: the held-out Dice (``epoch`` 0 is
  before training);
* ``{"event":"eval","epoch":0,"heldout_dice":d,"reference_dice":r}`` once before
  training also carries the Dice on the shipped reference set (``null`` when it is not
  scored);
* exactly one of ``{"event":"done","weights":"/abs/path.safetensors",
  "heldout_dice_before":a,"heldout_dice_after":b,"reference_dice_before":c,
  "reference_dice_after":d,"steps":s,"total_steps":N,"resume_step":k}`` (Dice ``null``
  where not measured; ``resume_step`` is ``null`` unless training stopped early at its
  time limit and can be resumed from step ``k``),
  ``{"event":"error","message":"one line"}`` or ``{"event":"cancelled"}``.

A resumed run (``--resume``) adds ``"resume_step":k`` to its start event, and its step
events go on from ``k + 1``.

Exit codes (:data:`EXIT_OK` ...): 0 done, 1 error, 2 bad usage (also: ``--resume``
refused), 3 cancelled.

**Resume state.** An interrupted fine-tune (cancelled, stopped at its time limit, or
crashed after some steps) can go on where it stopped. Every :data:`RESUME_EVERY` steps,
on cancel and at a time-limit stop, the child writes its state into
``<output folder>/resume/``: the tensors (model, optimiser, random generators) in a
safetensors file, then a JSON record naming that file and its sha256, with the step,
the options, a digest of the data folder (:func:`data_digest`) and the start weights'
sha256. Each file is written atomically and the JSON last, so a record always names a
complete tensors file. The record's name is that of the start weights
(:func:`resume_state_path`), so the widget can look for it (:func:`find_resume`) and
offer "Resume". Nothing there is ever unpickled.

This module imports neither torch nor napari: the widget parses with :func:`parse_event`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "PREFIX",
    "RESUME_EVERY",
    "RESUME_FORMAT",
    "RESUME_FORMAT_VERSION",
    "TERMINAL_EVENTS",
    "EventWriter",
    "ResumeState",
    "data_digest",
    "default_out_dir",
    "find_resume",
    "format_event",
    "parse_event",
    "read_resume_state",
    "resume_state_path",
    "start_sha256",
]

logger = logging.getLogger(__name__)

#: What starts every event line.
PREFIX = "@lvunet "
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_CANCELLED = 3
#: The events that end a run; exactly one of them is written.
TERMINAL_EVENTS = ("done", "error", "cancelled")


def _finite(value: Any) -> Any:
    # JSON has no NaN or infinity: such a value is reported as null, never as invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def format_event(event: str, **fields: Any) -> str:
    """One event line (without the newline): ``@lvunet {"event": ..., **fields}``."""
    payload = {"event": event, **_finite(fields)}
    return PREFIX + json.dumps(payload, separators=(",", ":"), allow_nan=False)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event of a line of the child's stdout, or ``None`` for any other line.

    Raises:
        ValueError: If the line has the prefix but no JSON object after it.
    """
    line = line.rstrip("\r\n")
    if not line.startswith(PREFIX):
        return None
    event = json.loads(line[len(PREFIX) :])
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise ValueError(f"not an event object: {line!r}")
    return event


class EventWriter:
    """Writes event lines to a stream, flushed one by one, from any thread.

    After a terminal event (done, error, cancelled) further events are dropped, so a
    run reports exactly one ending even when a signal watchdog and the main thread
    race to report it.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.ended: str | None = None

    def __call__(self, event: str, **fields: Any) -> bool:
        """Write one event; returns False (writing nothing) once the run has ended."""
        line = format_event(event, **fields)
        with self._lock:
            if self.ended is not None:
                return False
            if event in TERMINAL_EVENTS:
                self.ended = event
            self._stream.write(line + "\n")
            self._stream.flush()
        return True


# ------------------------------------------------------------------ resume state
#: Optimiser steps between two saves of the resume state.
RESUME_EVERY = 5
RESUME_FORMAT = "napari-lvunet-finetune-resume"
RESUME_FORMAT_VERSION = 1
_RESUME_FOLDER = "resume"
_MAX_STATE_BYTES = 4 * 1024**2


def default_out_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Where a fine-tune of ``data_dir`` writes when no output folder is given."""
    return Path(data_dir) / "finetuned"


def start_sha256(weights: str | os.PathLike[str]) -> str:
    """The SHA-256 of start weights: the registry's for a registry name, else the file's.

    Raises:
        OSError: If the file cannot be read.
    """
    from .weights import file_sha256, registry

    entry = registry().get(str(weights)) if isinstance(weights, str) else None
    return entry.sha256 if entry is not None else file_sha256(weights)


def data_digest(data_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the names and bytes of the files of ``images/`` and ``masks/`` (hidden
    ones aside) and of ``splits.json``: any added, removed, renamed or edited pair
    changes it."""
    from .weights import file_sha256

    root = Path(data_dir)
    digest = hashlib.sha256()
    for sub in ("images", "masks"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                digest.update(f"{sub}/{path.name}\0{file_sha256(path)}\n".encode())
    splits = root / "splits.json"
    if splits.is_file():
        digest.update(f"splits.json\0{file_sha256(splits)}\n".encode())
    return digest.hexdigest()


def resume_state_path(out_dir: str | os.PathLike[str], start: str) -> Path:
    """The JSON record of the resume state of a fine-tune from weights whose SHA-256 is
    ``start``, writing to ``out_dir``."""
    return Path(out_dir) / _RESUME_FOLDER / f"{start[:16]}.json"


@dataclass(frozen=True)
class ResumeState:
    """A fine-tune's resume record (the JSON; its tensors are read by the child only).

    Attributes:
        path: The JSON record.
        step: Optimiser steps done; a resumed run goes on with step ``step + 1``.
        total_steps: The run's planned steps.
        start_sha256: SHA-256 of the start weights.
        data_digest: :func:`data_digest` of the data folder when the state was saved.
        options: The options that shape training (a resumed run must give the same).
        record: The whole record.
    """

    path: Path
    step: int
    total_steps: int
    start_sha256: str
    data_digest: str
    options: Mapping[str, Any]
    record: Mapping[str, Any]

    @property
    def tensors(self) -> Path:
        """The safetensors file of the model, optimiser and generator states."""
        return self.path.parent / str(self.record["tensors"])

    def describe(self) -> str:
        """``step k of N``."""
        return f"step {self.step} of {self.total_steps}"

    def matches_data(self, data_dir: str | os.PathLike[str]) -> bool:
        """Whether the data folder still holds exactly the pairs the state was trained on."""
        return data_digest(data_dir) == self.data_digest


def read_resume_state(path: str | os.PathLike[str]) -> ResumeState:
    """Read and check a resume record (JSON only; never a pickle).

    Raises:
        FileNotFoundError: If there is none.
        ValueError: If it is not a complete resume record, or its tensors file is missing.
    """
    path = Path(path)
    if path.stat().st_size > _MAX_STATE_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_STATE_BYTES // 1024**2} MB")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a fine-tune resume record")
    if record.get("format_version") != RESUME_FORMAT_VERSION:
        raise ValueError(f"{path} has resume format {record.get('format_version')!r}")
    step, total = record.get("step"), record.get("total_steps")
    for key, value in (("step", step), ("total_steps", total)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: {key!r} must be a whole number")
    if not 0 < step < total:
        raise ValueError(f"{path}: step {step} is not inside a run of {total} steps")
    for key in ("start_sha256", "data_digest", "tensors", "tensors_sha256"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{path}: {key!r} must be a string")
    tensors = record["tensors"]
    if Path(tensors).name != tensors or not tensors.endswith(".safetensors"):
        raise ValueError(f"{path}: the tensors file {tensors!r} is not a file beside it")
    if not isinstance(record.get("options"), dict):
        raise ValueError(f"{path}: 'options' must be an object")
    state = ResumeState(
        path=path,
        step=step,
        total_steps=total,
        start_sha256=record["start_sha256"],
        data_digest=record["data_digest"],
        options=record["options"],
        record=record,
    )
    if not state.tensors.is_file():
        raise ValueError(f"{path}: its tensors file {tensors} is missing")
    return state


def find_resume(
    data_dir: str | os.PathLike[str],
    weights: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
) -> ResumeState | None:
    """The state a ``--resume`` fine-tune of ``data_dir`` from ``weights`` would go on
    from, or ``None`` (no state, an unreadable one, or unreadable weights: logged)."""
    folder = default_out_dir(data_dir) if out_dir is None else Path(out_dir)
    try:
        path = resume_state_path(folder, start_sha256(weights))
        return read_resume_state(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("no fine-tune to resume: %s", err)
        return None
