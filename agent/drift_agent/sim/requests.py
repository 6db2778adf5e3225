"""Request bookkeeping of a simulation: progress and measurements per request, synthetic token ids, the run."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from ..bench.metrics import RequestRecord
from ..bench.workloads import RequestSpec
from ..core.sequence import Sequence


class SimRequest:
    """One request's progress and measurements."""

    __slots__ = (
        "spec",
        "prompt",
        "scheduled",
        "sent",
        "first",
        "last",
        "itl",
        "n_out",
        "finished",
        "error",
        "seq",
        "next_turn",
        "history",
    )

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.prompt: list[int] = []
        self.scheduled = math.nan
        self.sent = math.nan
        self.first = math.nan
        self.last = math.nan
        self.itl = array("d")
        self.n_out = 0
        self.finished = False
        self.error = ""
        self.seq: Sequence | None = None
        self.next_turn: SimRequest | None = None
        self.history = 0  # a later turn: tokens of the conversation before its own

    def record(self) -> RequestRecord:
        ok = self.finished and not self.error
        return RequestRecord(
            request_id=self.spec.request_id,
            session_id=self.spec.session_id,
            turn=self.spec.turn,
            success=ok,
            error=self.error,
            scheduled_time=0.0 if math.isnan(self.scheduled) else self.scheduled,
            start_time=0.0 if math.isnan(self.sent) else self.sent,
            ttft=self.first - self.sent if ok else 0.0,
            itl=self.itl,  # type: ignore[arg-type]  # an array of float: iterable like the list it stands for
            latency=self.last - self.sent if ok else 0.0,
            prompt_tokens=len(self.prompt) or self.spec.prompt_len,
            output_tokens=self.n_out,
        )


class TokenSource:
    """Synthetic prompt token ids: unique per request, except a prefix shared by all first turns (the
    workload's --prefix-len), so prefix caching hits exactly where a real tokenizer's ids would repeat.

    `unique=False` where nothing reads the ids (no prefix cache, no router keyed on them): every id is then the
    same small int, which spares building an int object per prompt token (a 4096-token prompt cost about 0.1 ms,
    a tenth of a long-context request's whole simulation)."""

    FILLER = 2

    def __init__(self, prefix_len: int = 0, unique: bool = True) -> None:
        self.unique = unique
        self.prefix = list(range(2, 2 + prefix_len)) if unique else [self.FILLER] * prefix_len
        self._next = 2 + prefix_len

    def fresh(self, n: int) -> list[int]:
        if not self.unique:
            return [self.FILLER] * n
        start = self._next
        self._next += n
        return list(range(start, start + n))

    def first_turn(self, n: int) -> list[int]:
        k = min(len(self.prefix), max(n - 1, 0))  # at least one token of its own
        return self.prefix[:k] + self.fresh(n - k)


@dataclass
class SimRun:
    """One simulated run: per-request records (bench format), duration and simulator statistics."""

    records: list[RequestRecord]
    duration_s: float
    stats: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def requests_per_minute(self) -> float:
        return 60.0 * len(self.records) / self.wall_s if self.wall_s > 0 else math.inf
