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
* exactly one of ``{"event":"done","weights":"/abs/path.safetensors",
  "heldout_dice_before":a,"heldout_dice_after":b}`` (``null`` without held-out pairs),
  ``{"event":"error","message":"one line"}`` or ``{"event":"cancelled"}``.

Exit codes (:data:`EXIT_OK` ...): 0 done, 1 error, 2 bad usage, 3 cancelled.

This module imports neither torch nor napari: the widget parses with :func:`parse_event`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "PREFIX",
    "TERMINAL_EVENTS",
    "EventWriter",
    "format_event",
    "parse_event",
]

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
