"""Run the parts in order, each under its own budget, flushing the report after each one.

A part gets a `PartContext`: it writes results into `ctx.data` / `ctx.figure(...)` as they come (so whatever
stops it keeps them), asks `ctx.time_left()` before starting another piece of work, and calls `ctx.truncate()`
when it leaves work undone for lack of time. A part that does not stop by itself is interrupted by a
SIGALRM watchdog `grace_s` after its budget (status "timeout"); the watchdog raises a BaseException so that
the engine's own `except Exception` recovery cannot swallow it. A part that raises is recorded as failed and
the next part runs.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import Figure, PartResult, Report


class PartTimeout(BaseException):
    """Raised in the main thread by the watchdog when a part overruns its budget."""


class Skip(Exception):  # noqa: N818 - a control-flow signal, like pytest's
    """Raise from a part that cannot run here (e.g. needs a GPU); the message is the reason."""


@dataclass
class PartContext:
    result: PartResult
    deadline: float  # time.monotonic() by which the part should be done
    outdir: Path
    dry_run: bool
    shared: dict[str, Any]  # state handed from part to part (the engine, the profile, measured peaks)

    @property
    def data(self) -> dict[str, Any]:
        return self.result.data

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def truncate(self, why: str) -> None:
        """Mark the part as stopped early for lack of time (its partial results stay)."""
        self.result.status = "truncated"
        self.result.reason = why

    def figure(self, name: str, value: float | None, unit: str, workload: str, baseline: str) -> None:
        self.result.figures.append(Figure(name, value, unit, workload, baseline))

    def table(self, name: str) -> list[dict[str, Any]]:
        """A named table of rows in the part's data (appended to as rows are measured)."""
        return self.data.setdefault("tables", {}).setdefault(name, [])


PartFn = Callable[[PartContext], None]


@dataclass(frozen=True)
class PartSpec:
    key: str
    title: str
    fn: PartFn
    budget_s: float


@contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` raises PartTimeout in the main thread; no-op elsewhere or off POSIX."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def fire(_sig: int, _frame: Any) -> None:
        raise PartTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_parts(
    parts: Sequence[PartSpec],
    report: Report,
    outdir: Path,
    *,
    total_budget_s: float,
    dry_run: bool = False,
    grace_s: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Run every part (each within min(its budget, what is left of the total)); the report is written before
    the first part and after each one."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.monotonic()
    end = start + total_budget_s
    shared: dict[str, Any] = {}
    by_key = {p.key: p for p in report.parts}
    report.write(outdir)
    for spec in parts:
        res = by_key[spec.key]
        left = end - time.monotonic()
        if left <= 1.0:
            res.status, res.reason = "skipped", "the check's total budget is spent"
            report.write(outdir)
            continue
        budget = min(spec.budget_s, left)
        ctx = PartContext(res, time.monotonic() + budget, outdir, dry_run, shared)
        res.status = "running"
        report.write(outdir)  # a kill during this part shows which part it was in
        say(f"gpu_check: {spec.key}. {spec.title} (budget {budget:.0f} s)")
        t0 = time.monotonic()
        try:
            with _watchdog(budget + grace_s):
                spec.fn(ctx)
            if res.status == "running":
                res.status = "ok"
        except PartTimeout:
            res.status = "timeout"
            res.reason = f"stopped by the watchdog {budget + grace_s:.0f} s in (budget {budget:.0f} s)"
        except Skip as e:
            res.status, res.reason = "skipped", str(e)
        except Exception as e:
            res.status = "failed"
            res.error = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=-8))
        except KeyboardInterrupt:
            res.status, res.reason = "failed", "interrupted"
            res.elapsed_s = round(time.monotonic() - t0, 2)
            report.write(outdir)
            raise
        res.elapsed_s = round(time.monotonic() - t0, 2)
        report.meta["elapsed_s"] = round(time.monotonic() - start, 1)
        report.write(outdir)
        say(
            f"gpu_check: {spec.key}. {res.status} in {res.elapsed_s:.1f} s"
            + (f": {res.reason}" if res.reason else "")
        )
    return report
