"""argparse value parsers shared by the `drift` subcommands: a bad value is a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def number(kind: type, lo: float, inclusive: bool = True, allow_inf: bool = False) -> Callable[[str], Any]:
    """A parser of `kind` values >= lo (> lo when not inclusive); NaN always, infinity unless allowed, refused."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}"
            ) from None
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not allow_inf)):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < lo or (not inclusive and value == lo):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {lo:g}, got {text}")
        return value

    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0.0, inclusive=False)
non_negative_float = number(float, 0.0)
rate = number(float, 0.0, inclusive=False, allow_inf=True)  # a request rate: > 0, or inf (all at once)


def rates(text: str) -> list[float]:
    """One rate or a comma list, each > 0 or 'inf'; empty means inf."""
    return [rate(part.strip()) for part in text.split(",") if part.strip()] or [math.inf]


def percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if not values or not all(0 < p < 100 for p in values):
        raise argparse.ArgumentTypeError(f"percentiles must be in (0, 100), got {text!r}")
    return values
