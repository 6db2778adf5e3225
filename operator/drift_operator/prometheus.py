"""Read windowed SLO counts from Prometheus instead of scraping agents (when a URL is configured).

Queries rely on the `llmservice` label that the operator's PodMonitor adds to every agent series.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from .attainment import WindowStats
from .metrics import OUTCOMES, PHASES, SLO_COUNTER


class PrometheusError(Exception):
    pass


def _selector(namespace: str, name: str) -> str:
    return f'{SLO_COUNTER}{{namespace="{namespace}",llmservice="{name}"}}'


def slo_query(namespace: str, name: str, window_s: float) -> str:
    return f"sum by (phase, outcome) (increase({_selector(namespace, name)}[{int(window_s)}s]))"


def freshness_query(namespace: str, name: str) -> str:
    """Seconds since the newest counter sample: large when scraping stopped."""
    return f"time() - max(timestamp({_selector(namespace, name)}))"


def stats_from_vector(result: Sequence[dict[str, Any]], window_s: float, pods: int) -> WindowStats | None:
    """An instant-vector result of `slo_query` as WindowStats; None when there are no series at all."""
    if not result:
        return None
    met = {p: 0.0 for p in PHASES}
    missed = {p: 0.0 for p in PHASES}
    for item in result:
        labels = item.get("metric") or {}
        phase, outcome = labels.get("phase"), labels.get("outcome")
        if phase not in PHASES or outcome not in OUTCOMES:
            continue
        try:
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if value != value:  # NaN: no samples for part of the range
            continue
        (met if outcome == "met" else missed)[phase] += value
    return WindowStats(met=met, missed=missed, duration_s=window_s, pods=pods)


def empty_stats(window_s: float, pods: int) -> WindowStats:
    """No request counted in the window (the series exist, but nothing finished in it)."""
    return WindowStats(
        met={p: 0.0 for p in PHASES}, missed={p: 0.0 for p in PHASES}, duration_s=window_s, pods=pods
    )


def no_series_message(base_url: str, namespace: str, name: str) -> str:
    return (
        f"Prometheus at {base_url} has no {SLO_COUNTER} series with namespace={namespace!r}, "
        f"llmservice={name!r}: is it scraping the agents (the PodMonitor, or a scrape config adding both labels)?"
    )


async def instant_query(session: aiohttp.ClientSession, base_url: str, promql: str) -> list[dict[str, Any]]:
    url = base_url.rstrip("/") + "/api/v1/query"
    try:
        async with session.get(url, params={"query": promql, "time": f"{time.time():.3f}"}) as response:
            payload = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise PrometheusError(f"Prometheus at {base_url} unreachable: {exc or type(exc).__name__}") from exc
    if not isinstance(payload, dict) or payload.get("status") != "success":
        error = payload.get("error") if isinstance(payload, dict) else payload
        raise PrometheusError(f"Prometheus query failed: {error}")
    data = payload.get("data") or {}
    if data.get("resultType") not in ("vector", "scalar"):
        raise PrometheusError(f"unexpected result type {data.get('resultType')!r}")
    result = data.get("result") or []
    if data.get("resultType") == "scalar":
        return [{"metric": {}, "value": result}]
    return list(result)


async def read_window(
    session: aiohttp.ClientSession, base_url: str, namespace: str, name: str, window_s: float, pods: int
) -> tuple[WindowStats | None, float | None]:
    """(window stats, age in seconds of the newest sample; None when Prometheus has no series at all);
    raises PrometheusError."""
    # A span under a second cannot be queried (the range needs whole seconds): nothing is counted yet.
    vector = (
        await instant_query(session, base_url, slo_query(namespace, name, window_s)) if window_s >= 1 else []
    )
    age_result = await instant_query(session, base_url, freshness_query(namespace, name))
    age: float | None = None
    if age_result:
        try:
            age = float(age_result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            age = None
    return stats_from_vector(vector, window_s, pods), age
