"""Argument types shared by the commands: each turns a bad value into a usage error."""

from __future__ import annotations

import argparse
import math

from .. import flags
from .._errors import TaskexecError
from .._models import EngineName

__all__ = ("engine_name", "faults", "positive_float", "positive_int", "seconds")


def engine_name(value: str) -> EngineName | None:
    """``--engine``: an engine name, in any case."""
    try:
        return flags.parse_engine(value, "--engine")
    except TaskexecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(value: str) -> int:
    """An integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def positive_float(value: str) -> float:
    """A finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {value}")
    return number


def seconds(value: str) -> float:
    """A number of seconds >= 0 (not NaN)."""
    number = float(value)
    if not number >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {value}")
    return number


def faults(value: str) -> list[str]:
    """A comma-separated list of the mock server's faults."""
    return [f.strip() for f in value.split(",") if f.strip()]
