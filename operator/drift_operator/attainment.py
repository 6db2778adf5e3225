"""Windowed SLO attainment from cumulative counters (pure).

Agents export cumulative `drift_slo_requests_total{phase,outcome}` counters. The operator keeps a short
history of scrapes and takes increases over the SLO window, the way Prometheus' `increase()` does: a counter
that went down was reset (the pod restarted), so its new value is the increase since the reset.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .metrics import OUTCOMES, PHASES, CounterKey, PodSample


@dataclass(frozen=True)
class Scrape:
    """One loop tick's samples, keyed by pod uid (a restarted pod keeps its uid, a replaced one does not)."""

    time: float
    pods: Mapping[str, PodSample]


@dataclass(frozen=True)
class WindowStats:
    """Request counts over the window, summed over pods."""

    met: Mapping[str, float]
    missed: Mapping[str, float]
    duration_s: float
    pods: int = 0
    queue_waiting: float | None = None  # mean per pod, latest scrape
    kv_usage: float | None = None  # mean per pod, latest scrape

    def requests(self, phase: str = "both") -> float:
        return self.met.get(phase, 0.0) + self.missed.get(phase, 0.0)

    def attainment(self, phase: str) -> float | None:
        total = self.requests(phase)
        return self.met.get(phase, 0.0) / total if total > 0 else None

    @property
    def overall(self) -> float | None:
        """Attainment of both SLOs together; falls back to the worse phase for agents without `both`."""
        both = self.attainment("both")
        if both is not None:
            return both
        phases = [a for a in (self.attainment("ttft"), self.attainment("tpot")) if a is not None]
        return min(phases) if phases else None

    @property
    def total_requests(self) -> float:
        return max(self.requests("both"), self.requests("ttft"))

    @property
    def demand_rps(self) -> float | None:
        return self.total_requests / self.duration_s if self.duration_s > 0 else None

    @property
    def goodput_rps(self) -> float | None:
        """Requests per second that met their SLOs (the throughput actually delivered at SLO)."""
        if self.duration_s <= 0:
            return None
        met = self.met.get("both") if self.requests("both") > 0 else self.met.get("ttft", 0.0)
        return (met or 0.0) / self.duration_s


def counter_increase(values: Iterable[float]) -> float:
    """Increase of a cumulative counter across consecutive samples, treating drops as resets."""
    total = 0.0
    previous: float | None = None
    for value in values:
        if previous is not None:
            total += value - previous if value >= previous else value
        previous = value
    return total


@dataclass
class SampleWindow:
    """The recent scrapes of one LLMService (kept in the operator's per-object memory)."""

    max_scrapes: int = 720
    scrapes: deque[Scrape] = field(default_factory=deque)

    def add(self, scrape: Scrape, keep_seconds: float) -> None:
        self.scrapes.append(scrape)
        # Keep one scrape older than the window as the baseline for the window's first increase.
        while len(self.scrapes) > 2 and self.scrapes[1].time <= scrape.time - keep_seconds:
            self.scrapes.popleft()
        while len(self.scrapes) > self.max_scrapes:
            self.scrapes.popleft()

    @property
    def last_time(self) -> float | None:
        return self.scrapes[-1].time if self.scrapes else None


def window_stats(
    scrapes: Sequence[Scrape], now: float, window_s: float, since: float | None = None
) -> WindowStats | None:
    """Counts over [now - window, now], and only of requests that finished after `since` (the last action's
    effect); None until two scrapes span some time (no increase is known yet)."""
    if not scrapes:
        return None
    start = now - window_s
    # The baseline is the newest scrape at or before the window start, else the oldest we have; with
    # `since`, no earlier than the first scrape taken at or after it.
    first = 0
    for i, scrape in enumerate(scrapes):
        if scrape.time <= start:
            first = i
    if since is not None:
        while first < len(scrapes) and scrapes[first].time < since:
            first += 1
    used = list(scrapes[first:])
    if len(used) < 2 or used[-1].time <= used[0].time:
        return None
    met = {p: 0.0 for p in PHASES}
    missed = {p: 0.0 for p in PHASES}
    uids = {uid for scrape in used for uid in scrape.pods}
    for uid in uids:
        series = [scrape.pods[uid] for scrape in used if uid in scrape.pods]
        for phase in PHASES:
            for outcome in OUTCOMES:
                key: CounterKey = (phase, outcome)
                values = [s.counts[key] for s in series if key in s.counts]
                increase = counter_increase(values)
                (met if outcome == "met" else missed)[phase] += increase
    latest = list(used[-1].pods.values())
    waiting = [s.waiting for s in latest if s.waiting is not None]
    kv = [s.kv_usage for s in latest if s.kv_usage is not None]
    return WindowStats(
        met=met,
        missed=missed,
        duration_s=used[-1].time - used[0].time,
        pods=len(latest),
        queue_waiting=sum(waiting) / len(waiting) if waiting else None,
        kv_usage=sum(kv) / len(kv) if kv else None,
    )
