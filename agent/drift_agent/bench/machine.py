"""Was the machine busy while a benchmark ran? Other work on the host skews every figure, and a ratio of two
runs measured at different moments most of all, so the benchmarks warn instead of reporting it silently.

Two signals, both Linux-wide and both cheap: the 1-minute load average (sampled during the run, highest kept)
above the CPU count means runnable threads queued for a core; CPU time stolen by the hypervisor (/proc/stat
`steal`, over the run) means a virtual machine's cores were running someone else. Where neither exists (not
Linux), nothing is reported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Stolen share of CPU time above which a run is flagged: a few percent is the usual noise of a shared VM.
STEAL_THRESHOLD = 0.05
SAMPLE_INTERVAL_S = 5.0


def read_cpu_times(path: str | Path = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot, or None where /proc/stat is missing or unreadable."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user/nice.
    values = [int(v) for v in fields[1:9]]
    steal = values[7] if len(values) > 7 else 0
    return steal, sum(values)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class MachineLoad:
    cpus: int
    max_load_1m: float | None
    steal_fraction: float | None

    @property
    def busy(self) -> bool:
        return (self.max_load_1m is not None and self.max_load_1m > self.cpus) or (
            self.steal_fraction is not None and self.steal_fraction > STEAL_THRESHOLD
        )

    def warning(self, what: str = "the figures") -> str | None:
        """One line saying why the run is suspect, or None when the machine looked idle enough."""
        if not self.busy:
            return None
        reasons = []
        if self.max_load_1m is not None and self.max_load_1m > self.cpus:
            reasons.append(f"1-minute load average up to {self.max_load_1m:.1f} on {self.cpus} CPUs")
        if self.steal_fraction is not None and self.steal_fraction > STEAL_THRESHOLD:
            reasons.append(f"{100 * self.steal_fraction:.0f}% of CPU time stolen by the hypervisor")
        return (
            f"the machine was busy during the run ({'; '.join(reasons)}), so {what} cannot be trusted; "
            "rerun on an idle machine"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "max_load_1m": None if self.max_load_1m is None else round(self.max_load_1m, 2),
            "steal_fraction": None if self.steal_fraction is None else round(self.steal_fraction, 4),
            "busy": self.busy,
        }


class MachineMonitor:
    """Context manager: samples the load average every few seconds in a daemon thread and compares CPU
    counters at both ends; `result` holds the `MachineLoad` after exit."""

    def __init__(
        self,
        interval_s: float = SAMPLE_INTERVAL_S,
        cpu_times: Callable[[], tuple[int, int] | None] | None = None,
        loadavg: Callable[[], float | None] | None = None,
        cpus: int | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._cpu_times = cpu_times or read_cpu_times
        self._loadavg = loadavg or load_average
        self.cpus = cpus or os.cpu_count() or 1  # the host's count: the load average is host-wide too
        self._loads: list[float] = []
        self._start: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: MachineLoad | None = None

    def _sample(self) -> None:
        load = self._loadavg()
        if load is not None:
            self._loads.append(load)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MachineMonitor:
        self._start = self._cpu_times()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="drift-machine-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        end = self._cpu_times()
        steal = None
        if self._start is not None and end is not None and end[1] > self._start[1]:
            steal = (end[0] - self._start[0]) / (end[1] - self._start[1])
        self.result = MachineLoad(self.cpus, max(self._loads) if self._loads else None, steal)
