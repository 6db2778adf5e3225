"""Per-request records and their summary, with vLLM's `vllm bench serve` metric definitions.

- TTFT: send -> first streamed token chunk.
- E2E latency (e2el): send -> last token chunk (client side).
- TPOT: (e2el - TTFT) / (output_tokens - 1) per request; requests with <= 1 output token are left out of TPOT
  statistics and count as TPOT 0 for SLO checks.
- ITL: every gap between consecutive token chunks, pooled over all requests.
- Percentiles: numpy linear interpolation; mean, median, std too, in milliseconds.
- Throughputs: completed requests, output tokens and input+output tokens divided by the benchmark duration.
- Goodput: requests meeting *all* given SLOs (each metric <= its target) divided by the duration.
- SLO attainment: requests meeting all SLOs divided by *all* requests sent (a failed request misses its SLO).
Statistics of an empty set are None (vLLM prints 0, which would plot as a perfect latency).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
SLO_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class RequestRecord:
    """What one request measured; times in seconds, `start_time` relative to the benchmark start."""

    request_id: str
    session_id: str = ""
    turn: int = 0
    success: bool = False
    error: str = ""
    scheduled_time: float = 0.0
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_dict(self, with_itl: bool = True) -> dict[str, Any]:
        d = {
            "request_id": self.request_id,
            "session_id": self.session_id,
            "turn": self.turn,
            "success": self.success,
            "error": self.error,
            "scheduled_time": self.scheduled_time,
            "start_time": self.start_time,
            "ttft": self.ttft,
            "tpot": self.tpot,
            "latency": self.latency,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        }
        if with_itl:
            d["itl"] = list(self.itl)
        return d


@dataclass(frozen=True, slots=True)
class GoodputTargets:
    """The latency targets a request must meet to count towards goodput (vLLM's `--goodput`), in
    milliseconds; None means not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Iterable[str]) -> GoodputTargets:
        """From vLLM's `--goodput` syntax: "ttft:200 tpot:50 [e2el:2000]" (ms)."""
        values: dict[str, float] = {}
        for item in items:
            for part in item.split():
                key, sep, raw = part.partition(":")
                if not sep or key not in SLO_METRICS:
                    raise ValueError(
                        f"bad SLO {part!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}"
                    )
                try:
                    ms = float(raw)
                except ValueError:
                    raise ValueError(f"bad SLO {part!r}: {raw!r} is not a number of milliseconds") from None
                if not (ms > 0 and math.isfinite(ms)):
                    raise ValueError(
                        f"bad SLO {part!r}: the target must be a positive number of milliseconds"
                    )
                values[f"{key}_ms"] = ms
        return cls(**values)

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def as_dict(self) -> dict[str, float]:
        return {
            k: v
            for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms))
            if v is not None
        }

    def headers(self) -> dict[str, str]:
        """Per-request SLO hints; `drift serve` schedules by them, other servers ignore unknown headers."""
        h = {}
        if self.ttft_ms is not None:
            h["x-slo-ttft-ms"] = f"{self.ttft_ms:g}"
        if self.tpot_ms is not None:
            h["x-slo-tpot-ms"] = f"{self.tpot_ms:g}"
        return h

    def meets(self, r: RequestRecord, metric: str | None = None) -> bool:
        """Whether a request met every target (or just `metric`'s); failed requests never do."""
        if not r.success:
            return False
        checks = {
            "ttft": (self.ttft_ms, r.ttft),
            "tpot": (self.tpot_ms, r.tpot or 0.0),
            "e2el": (self.e2el_ms, r.latency),
        }
        names = [metric] if metric else list(checks)
        return all(checks[n][0] is None or checks[n][1] * 1000.0 <= checks[n][0] for n in names)


def _pct_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    ms = np.asarray(values_s, dtype=float) * 1000.0
    out: dict[str, float | None] = {}
    empty = ms.size == 0
    out[f"mean_{name}_ms"] = None if empty else float(ms.mean())
    out[f"median_{name}_ms"] = None if empty else float(np.median(ms))
    out[f"std_{name}_ms"] = None if empty else float(ms.std())
    for p in percentiles:
        out[f"{_pct_key(p)}_{name}_ms"] = None if empty else float(np.percentile(ms, p))
    return out


def peak_output_and_concurrency(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """vLLM's peak output tokens/s (token chunks per 1-s bucket) and peak concurrency over [start, end)."""
    ok = [r for r in records if r.success]
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    t1 = max(r.start_time + r.latency for r in ok)
    buckets = np.zeros(int(np.ceil(t1 - t0)) + 1)
    events: list[tuple[float, int]] = []
    for r in ok:
        times = r.start_time + r.ttft + np.concatenate(([0.0], np.cumsum(r.itl)))
        idx = (times - t0).astype(int)
        np.add.at(buckets, idx[(idx >= 0) & (idx < buckets.size)], 1)
        events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    events.sort()  # at equal times -1 sorts first: intervals are half-open
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return float(buckets.max()), peak


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: GoodputTargets | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The run's summary as a JSON-ready dict (keys follow vLLM's result JSON)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    summary |= _stats("ttft", [r.ttft for r in ok], percentiles)
    summary |= _stats("tpot", [t for r in ok if (t := r.tpot) is not None], percentiles)
    summary |= _stats("itl", [g for r in ok for g in r.itl], percentiles)
    summary |= _stats("e2el", [r.latency for r in ok], percentiles)
    peak_tps, peak_conc = peak_output_and_concurrency(records)
    summary["max_output_tokens_per_s"] = peak_tps
    summary["max_concurrent_requests"] = peak_conc
    if slo:
        good = sum(slo.meets(r) for r in records)
        summary["slo"] = slo.as_dict()
        summary["request_goodput"] = good / duration_s
        summary["slo_attainment"] = good / len(records) if records else None
        for metric in slo.as_dict():
            hits = sum(slo.meets(r, metric) for r in records)
            summary[f"{metric}_attainment"] = hits / len(records) if records else None
    return summary


def goodput_item(text: str) -> str:
    """One `NAME:MS` item of `--slo`, as an argparse type (checked by `GoodputTargets.parse`)."""
    try:
        GoodputTargets.parse([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
