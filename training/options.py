"""Checked argparse types for the numeric options of the training commands.

Every number a command takes is checked by the parser, so a bad value is a usage error
(exit code 2, one line naming the option) before anything is read or written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["fraction", "integer", "multiple_of", "number"]


def integer(minimum: int) -> Callable[[str], int]:
    """A whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its messages
    return parse


def multiple_of(divisor: int) -> Callable[[str], int]:
    """A positive whole multiple of ``divisor`` (image sizes the network takes)."""
    positive = integer(1)

    def parse(text: str) -> int:
        value = positive(text)
        if value % divisor:
            raise argparse.ArgumentTypeError(f"must be a multiple of {divisor}, got {value}")
        return value

    parse.__name__ = f"multiple of {divisor}"
    return parse


def number(*, positive: bool = False) -> Callable[[str], float]:
    """A finite number, greater than 0 when ``positive``, else at least 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    parse.__name__ = "positive number" if positive else "number >= 0"
    return parse


def fraction(*, closed: bool) -> Callable[[str], float]:
    """A number in (0, 1] when ``closed``, else in (0, 1)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0 < value < 1 or (closed and value == 1)):
            interval = "(0, 1]" if closed else "(0, 1)"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = "fraction"
    return parse
