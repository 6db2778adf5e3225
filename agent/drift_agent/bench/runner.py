"""Drives a workload against a server: probe, warm-up, timed runs at fixed rates or a bisection sweep.

Arrival times are precomputed (`arrivals.py`) per session: a single-turn request is a session of one, and a
multi-turn session's first turn arrives on schedule while each later turn is sent a think time after the
previous answer, carrying the conversation so far (the answer actually streamed back). For multi-turn workloads
sessions start at rate * sessions/requests, so the offered request rate matches the nominal one on average.
A bounded semaphore implements --max-concurrency; requests waiting for it keep their scheduled time, so their
wait shows up in `start_time - scheduled_time`, and vLLM-style their TTFT counts from the actual send.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import ServerUnreachableError
from .arrivals import arrival_times
from .client import OpenAIClient
from .metrics import GoodputTargets, RequestRecord, summarize
from .results import make_run
from .sweep import Bisection, SweepResult
from .workloads import RequestSpec, group_sessions

OnDone = Callable[[RequestRecord], None]
OnRunStart = Callable[[float, int], None]


@dataclass
class RunResult:
    request_rate: float
    duration_s: float
    records: list[RequestRecord]
    summary: dict[str, Any]

    def to_run(self, with_requests: bool = False) -> dict[str, Any]:
        requests = [r.to_dict() for r in self.records] if with_requests else None
        return make_run(self.request_rate, self.summary, requests)


@dataclass
class LoadConfig:
    burstiness: float = 1.0
    seed: int = 0
    max_concurrency: int | None = None
    slo: GoodputTargets = field(default_factory=GoodputTargets)
    percentiles: Sequence[float] = (50.0, 90.0, 99.0)


def _prompt_for(spec: RequestSpec, history: list[dict[str, str]], chat: bool) -> str | list[dict[str, str]]:
    """This turn's prompt: the conversation so far plus the new user message."""
    if spec.messages is not None:
        return list(spec.messages) if chat else spec.prompt
    if chat:
        return [*history, {"role": "user", "content": spec.prompt}]
    # Completions: previous prompt + previous answer + new message, so each turn's text extends the last one's.
    return (
        "".join(f"{m['content']}\n" if m["role"] == "assistant" else m["content"] for m in history)
        + spec.prompt
    )


async def run_load(
    client: OpenAIClient,
    specs: Sequence[RequestSpec],
    rate: float,
    load: LoadConfig,
    on_done: OnDone | None = None,
) -> RunResult:
    """Send every spec once at `rate` requests/s and summarize."""
    sessions = group_sessions(list(specs))
    session_rate = rate if math.isinf(rate) else rate * len(sessions) / len(specs)
    starts = arrival_times(len(sessions), session_rate, load.burstiness, load.seed)
    semaphore = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else contextlib.nullcontext()
    chat = client.config.endpoint == "chat"
    records = {
        s.request_id: RequestRecord(s.request_id, s.session_id, s.turn, prompt_tokens=s.prompt_len)
        for s in specs
    }
    t0 = time.perf_counter()

    async def run_session(turns: list[RequestSpec], start: float) -> None:
        await asyncio.sleep(max(0.0, t0 + start - time.perf_counter()))
        history: list[dict[str, str]] = []
        for i, spec in enumerate(turns):
            rec = records[spec.request_id]
            if i > 0 and spec.think_time_s > 0:
                await asyncio.sleep(spec.think_time_s)
            rec.scheduled_time = time.perf_counter() - t0
            prompt = _prompt_for(spec, history, chat)
            async with semaphore:
                await client.send(rec, prompt, spec.output_len, t0)
            if on_done:
                on_done(rec)
            if not rec.success:
                for rest in turns[i + 1 :]:
                    skipped = records[rest.request_id]
                    skipped.error = f"not sent: turn {spec.turn} of its session failed"
                    if on_done:
                        on_done(skipped)
                return
            history += [
                {"role": "user", "content": spec.prompt},
                {"role": "assistant", "content": rec.generated_text},
            ]

    await asyncio.gather(*(run_session(t, float(s)) for t, s in zip(sessions, starts, strict=True)))
    duration = time.perf_counter() - t0
    ordered = [records[s.request_id] for s in specs]
    return RunResult(rate, duration, ordered, summarize(ordered, duration, load.slo, load.percentiles))


async def probe(client: OpenAIClient, spec: RequestSpec) -> None:
    """One short request; a failure means the benchmark cannot run (wrong model name, wrong endpoint...)."""
    rec = RequestRecord("probe", prompt_tokens=spec.prompt_len)
    prompt = _prompt_for(spec, [], client.config.endpoint == "chat")
    await client.send(rec, prompt, min(spec.output_len, 4))
    if not rec.success:
        raise ServerUnreachableError(f"probe request to {client.config.url} failed: {rec.error}")


async def warm_up(
    client: OpenAIClient,
    specs: Sequence[RequestSpec],
    max_concurrency: int | None,
    on_done: OnDone | None = None,
) -> list[RequestRecord]:
    """Send the warm-up requests all at once (bounded by max_concurrency); they are excluded from results."""
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    chat = client.config.endpoint == "chat"

    async def one(spec: RequestSpec) -> RequestRecord:
        rec = RequestRecord(f"warmup-{spec.request_id}", prompt_tokens=spec.prompt_len)
        async with semaphore:
            await client.send(rec, _prompt_for(spec, [], chat), spec.output_len)
        if on_done:
            on_done(rec)
        return rec

    return list(await asyncio.gather(*(one(s) for s in specs)))


async def run_rates(
    client: OpenAIClient,
    specs: Sequence[RequestSpec],
    rates: Sequence[float],
    load: LoadConfig,
    on_run_start: OnRunStart | None = None,
    on_done: OnDone | None = None,
) -> list[RunResult]:
    results = []
    for rate in rates:
        if on_run_start:
            on_run_start(rate, len(specs))
        results.append(await run_load(client, specs, rate, load, on_done))
    return results


async def run_sweep(
    client: OpenAIClient,
    specs: Sequence[RequestSpec],
    search: Bisection,
    load: LoadConfig,
    on_run_start: OnRunStart | None = None,
    on_done: OnDone | None = None,
) -> tuple[list[RunResult], SweepResult]:
    """Bisection over the rate with live runs; every run is kept for the attainment-vs-rate curve."""
    if not load.slo:
        raise ValueError("a sweep needs an SLO (--slo ttft:MS tpot:MS)")
    results = []
    while (rate := search.next_rate()) is not None:
        if on_run_start:
            on_run_start(rate, len(specs))
        result = await run_load(client, specs, rate, load, on_done)
        results.append(result)
        search.record(rate, result.summary["slo_attainment"])
    return results, search.result()
