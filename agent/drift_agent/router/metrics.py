"""`drift_router_*` Prometheus metrics, in the router's own registry (`GET /metrics`).

Counters and the TTFT histogram are updated on the request path (a few label lookups per request, ~µs); the
per-backend gauges are read from the pool at scrape time, so the request path never updates them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .backend import Backend

TTFT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _PoolCollector(Collector):
    def __init__(self, backends: Callable[[], Iterable[Backend]]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        routable = GaugeMetricFamily(
            "drift_router_backend_routable", "1 while the backend may receive requests", labels=["backend"]
        )
        inflight = GaugeMetricFamily(
            "drift_router_backend_inflight_requests",
            "requests the router has open on the backend",
            labels=["backend"],
        )
        pending = GaugeMetricFamily(
            "drift_router_backend_pending_prefill_tokens",
            "the backend's queued prompt tokens as the router sees them (polled + sent since)",
            labels=["backend"],
        )
        total = 0
        ready = 0
        for b in self._backends():
            ok = b.routable(now)
            total += 1
            ready += ok
            routable.add_metric([b.url], 1.0 if ok else 0.0)
            inflight.add_metric([b.url], b.inflight)
            pending.add_metric([b.url], b.pending_prefill_tokens)
        count = GaugeMetricFamily("drift_router_backends", "known backends by state", labels=["state"])
        count.add_metric(["routable"], ready)
        count.add_metric(["unroutable"], total - ready)
        yield from (count, routable, inflight, pending)


class RouterMetrics:
    def __init__(self, backends: Callable[[], Iterable[Backend]], policy: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.policy = policy
        r = self.registry
        self.requests = Counter(
            "drift_router_requests",
            "requests forwarded, by backend and the upstream's status (error: no response)",
            ["backend", "code"],
            registry=r,
        )
        self.retries = Counter(
            "drift_router_retries",
            "attempts refused before the first byte and retried elsewhere, by the backend that refused and why",
            ["backend", "reason"],
            registry=r,
        )
        self.decisions = Counter(
            "drift_router_decisions",
            "routing decisions by policy and reason (policy, sticky, rehomed, home_away, single, retry, no_backend)",
            ["policy", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "drift_router_upstream_ttft_seconds",
            "streaming requests: arrival at the router to the upstream's first body byte",
            ["backend"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.ejected = Counter(
            "drift_router_ejections",
            "times a backend stopped being routable, by reason "
            "(state_failed, engine_down, draining, not_ready, refused, removed)",
            ["backend", "reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "drift_router_stream_errors",
            "streams the upstream broke after the first byte (the client got an error event)",
            ["backend", "reason"],
            registry=r,
        )
        self.client_errors = Counter(
            "drift_router_client_errors",
            "requests the router answered itself with an error, by status and code",
            ["status", "code"],
            registry=r,
        )
        r.register(_PoolCollector(backends))

    def render(self) -> bytes:
        return generate_latest(self.registry)
