"""Bisection for the highest request rate whose SLO attainment reaches a target (90% by default).

`Bisection` is a small state machine (ask `next_rate()`, run the load however you like, `record()` the
attainment), so the live benchmark drives it from async code and the simulator from a plain loop; `find_max_rate`
is the synchronous wrapper. The search probes the upper bound first (if it already meets the target the server
was never saturated and the answer is only a lower bound), then the lower bound (if that misses, no rate in range
meets the target), then halves the bracket in log space, because useful rates span orders of magnitude, until
hi/lo <= 1 + rel_tol or the iteration budget is spent. Attainment is assumed to fall as the rate rises; noise
can break that, so the full history is kept and reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SweepResult:
    max_rate: float | None  # highest rate seen meeting the target; None if even the lower bound missed it
    target: float
    saturated: bool  # False when the upper bound met the target (the true maximum may be higher)
    history: tuple[tuple[float, float], ...]  # (rate, attainment) in probe order

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_rate": self.max_rate,
            "target_attainment": self.target,
            "saturated": self.saturated,
            "history": [{"request_rate": r, "slo_attainment": a} for r, a in self.history],
        }


@dataclass
class Bisection:
    lo: float
    hi: float
    target: float = 0.9
    max_iters: int = 6
    rel_tol: float = 0.05
    history: list[tuple[float, float]] = field(default_factory=list)
    _good: float | None = None
    _bad: float | None = None
    _done: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.lo < self.hi and math.isfinite(self.hi)):
            raise ValueError(f"sweep needs 0 < min rate < max rate < inf, got {self.lo} and {self.hi}")
        if not 0 < self.target <= 1:
            raise ValueError(f"target attainment must be in (0, 1], got {self.target}")
        if self.max_iters < 0 or self.rel_tol <= 0:
            raise ValueError("sweep iterations must be >= 0 and tolerance > 0")

    def next_rate(self) -> float | None:
        """The next rate to measure, or None when the search is over."""
        if self._done:
            return None
        if not self.history:
            return self.hi
        if len(self.history) == 1:
            return self.lo
        assert self._good is not None and self._bad is not None
        if len(self.history) - 2 >= self.max_iters or self._bad / self._good <= 1 + self.rel_tol:
            self._done = True
            return None
        return math.sqrt(self._good * self._bad)

    def record(self, rate: float, attainment: float) -> None:
        self.history.append((rate, attainment))
        ok = attainment >= self.target
        if len(self.history) == 1:  # the upper bound
            if ok:
                self._good, self._done = rate, True
            else:
                self._bad = rate
        elif len(self.history) == 2:  # the lower bound
            if ok:
                self._good = rate
            else:
                self._done = True
        elif ok:
            self._good = rate
        else:
            self._bad = rate

    def result(self) -> SweepResult:
        saturated = bool(self.history) and self.history[0][1] < self.target
        return SweepResult(self._good, self.target, saturated, tuple(self.history))


def find_max_rate(
    run_at: Callable[[float], float],
    lo: float,
    hi: float,
    target: float = 0.9,
    max_iters: int = 6,
    rel_tol: float = 0.05,
) -> SweepResult:
    """Highest rate in [lo, hi] with run_at(rate) >= target, by bisection (see the module docstring)."""
    search = Bisection(lo, hi, target, max_iters, rel_tol)
    while (rate := search.next_rate()) is not None:
        search.record(rate, run_at(rate))
    return search.result()
