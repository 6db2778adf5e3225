"""Per-request SLO classification and sliding-window attainment: pure logic, no I/O.

A phase is classified once its outcome is certain. A completed request classifies TTFT, TPOT and "both".
An aborted request (client gone, shutdown) classifies only what is already decided: TTFT if its first token
came, or if its TTFT target had already passed without one; "both" only when that TTFT was missed. TPOT of an
aborted request is never classified (its decode did not run to the end).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from ..core.sequence import SLO, RequestTimes

PHASES: tuple[str, ...] = ("ttft", "tpot", "both")


@dataclass(frozen=True)
class SloOutcome:
    """True: met, False: missed, None: not classified."""

    ttft: bool | None
    tpot: bool | None
    both: bool | None

    def items(self) -> list[tuple[str, bool]]:
        return [
            (p, v)
            for p, v in (("ttft", self.ttft), ("tpot", self.tpot), ("both", self.both))
            if v is not None
        ]


def ttft_seconds(times: RequestTimes) -> float | None:
    return None if times.first_token is None else times.first_token - times.arrival


def tpot_seconds(times: RequestTimes, num_output_tokens: int) -> float | None:
    """vLLM's definition: (finish - first token) / (output tokens - 1); None with at most one token."""
    if num_output_tokens <= 1 or times.first_token is None:
        return None
    end = times.finished if times.finished is not None else times.last_token
    if end is None:
        return None
    return (end - times.first_token) / (num_output_tokens - 1)


def _met(value: float | None, target: float | None) -> bool:
    return target is None or value is None or value <= target


def classify(
    slo: SLO, times: RequestTimes, num_output_tokens: int, *, aborted: bool = False, now: float | None = None
) -> SloOutcome:
    """Classify one request that has ended (`aborted`: it ended without a normal finish at `now`)."""
    ttft = ttft_seconds(times)
    if ttft is not None:
        ttft_met: bool | None = _met(ttft, slo.ttft)
    elif aborted and slo.ttft is not None and now is not None and now - times.arrival > slo.ttft:
        ttft_met = False
    elif aborted:
        ttft_met = None
    else:  # finished normally without a token cannot happen; count it as not waiting at all
        ttft_met = True
    if aborted:
        return SloOutcome(ttft_met, None, False if ttft_met is False else None)
    # At most one output token: there is no inter-token time to miss.
    tpot_met = _met(tpot_seconds(times, num_output_tokens), slo.tpot)
    return SloOutcome(ttft_met, tpot_met, bool(ttft_met and tpot_met))


class SloWindow:
    """Attainment per phase over the last `window_s` seconds of classified requests (thread-safe). Running
    counts are kept as events enter and leave, so a read costs the same at any request rate (the router polls
    it through `/state` many times a second)."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._events: deque[tuple[float, SloOutcome]] = deque()
        self._counts = {p: [0, 0] for p in PHASES}  # phase -> [met, classified] in the window
        self._lock = threading.Lock()

    def record(self, outcome: SloOutcome, now: float) -> None:
        with self._lock:
            self._events.append((now, outcome))
            self._count(outcome, 1)
            self._expire(now)

    def _count(self, outcome: SloOutcome, sign: int) -> None:
        for phase, met in outcome.items():
            counts = self._counts[phase]
            counts[0] += sign * int(met)
            counts[1] += sign

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._events and self._events[0][0] < cutoff:
            self._count(self._events.popleft()[1], -1)

    def attainment(self, now: float) -> dict[str, tuple[float, int]]:
        """phase -> (fraction met, requests classified); an empty window reads 1.0 (nothing was missed)."""
        with self._lock:
            self._expire(now)
            counts = {p: tuple(c) for p, c in self._counts.items()}
        return {p: (met / total if total else 1.0, total) for p, (met, total) in counts.items()}
