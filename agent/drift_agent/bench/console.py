"""Terminal output shared by `drift bench` and `drift sim`: consoles that do not wrap when piped, and rates
printed the way people read them."""

from __future__ import annotations

import math
import os
from typing import Any

# Width of a console writing to a pipe or a file: rich assumes 80 columns there, which folds the result tables
# and wraps long lines in logs; a wide virtual width keeps every table row and message on one line.
PIPE_WIDTH = 240


def make_console(stderr: bool = False) -> Any:
    """A rich Console; on a terminal as usual, elsewhere (pipe, file, CI log) wide and without soft wrapping,
    unless $COLUMNS asks for a width."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


def format_rate(rate: float) -> str:
    """A request rate with three significant digits and no exponent: 11.3, 0.5, 1234, inf."""
    if math.isinf(rate):
        return "inf"
    if rate == 0 or math.isnan(rate):
        return f"{rate:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(rate))))
    text = f"{rate:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
