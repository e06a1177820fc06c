"""Cancellation shared by inference and fine-tuning.

Long work (segmenting a stack, fine-tuning) takes a *cancel token*: any object with
``is_set()``, such as :class:`threading.Event`. The work checks it between steps and
raises a subclass of :class:`Cancelled`, so a caller (the napari widget, a script)
recognises every kind of cancellation with one ``except Cancelled``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["CancelToken", "Cancelled", "check_cancelled"]


class Cancelled(Exception):  # noqa: N818 - reads as what happened
    """Work stopped because its cancel token was set; nothing half-done was kept."""


@runtime_checkable
class CancelToken(Protocol):
    """What long-running work checks between steps (``threading.Event`` is one)."""

    def is_set(self) -> bool: ...


def check_cancelled(
    token: CancelToken | None, error: type[Cancelled] = Cancelled, message: str = "cancelled"
) -> None:
    """Raise ``error(message)`` if ``token`` is set; do nothing for ``None``."""
    if token is not None and token.is_set():
        raise error(message)
