"""Cluster dispatchers: which instance gets a new request.

- `round-robin`: in turn, blind to load.
- `least-loaded`: the fewest tokens of work (prompt tokens still to prefill + KV tokens held), or with
  `metric="kv"` the lowest KV usage (Llumnix's dispatch rule uses a memory-based load).
- `slo-aware`: predicts each instance's TTFT for the request from the performance model (the rest of the
  running step, the queued prefill work at the device's per-token prefill cost, and the request's own prefill)
  and its next decode step with the request added; among instances predicted to meet the request's TTFT and
  TPOT targets and able to hold its KV, the one with the earliest predicted first token; if none qualifies, the
  earliest predicted first token anyway.
- `prefix-affinity`: requests with the same affinity key (the session of a multi-turn conversation, else the
  prompt's first KV block, i.e. a shared system prompt) stick to one instance so its prefix cache hits; a new
  key, or a sticky instance loaded past `overload` times the mean (plus slack), goes to the least-loaded one,
  which then becomes the key's instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..multiplex.perf_model import PrefillShape
from .instance import SimInstance

ROUTERS: tuple[str, ...] = ("round-robin", "least-loaded", "least-kv", "slo-aware", "prefix-affinity")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    prompt_tokens: int
    affinity_key: object | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None


class Router(Protocol):
    name: str

    def route(self, req: RouteRequest, instances: Sequence[SimInstance], now: float) -> SimInstance: ...


def _least_loaded(instances: Sequence[SimInstance]) -> SimInstance:
    return min(instances, key=lambda i: (i.load_tokens, i.index))


class RoundRobinRouter:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, req: RouteRequest, instances: Sequence[SimInstance], now: float) -> SimInstance:
        inst = instances[self._next % len(instances)]
        self._next += 1
        return inst


class LeastLoadedRouter:
    name = "least-loaded"

    def __init__(self, metric: str = "tokens") -> None:
        if metric not in ("tokens", "kv"):
            raise ValueError(f"least-loaded metric must be 'tokens' or 'kv', got {metric!r}")
        self.metric = metric

    def route(self, req: RouteRequest, instances: Sequence[SimInstance], now: float) -> SimInstance:
        if self.metric == "kv":
            return min(instances, key=lambda i: (i.kv_usage, i.pending_prefill_tokens, i.index))
        return _least_loaded(instances)


class SLOAwareRouter:
    name = "slo-aware"

    def __init__(self) -> None:
        self._per_token: dict[int, float] = {}

    def _prefill_per_token(self, inst: SimInstance) -> float:
        """Seconds per prompt token at the instance's chunk size on the whole device (memoised per model)."""
        key = id(inst.perf)
        t = self._per_token.get(key)
        if t is None:
            n = inst.config.max_num_batched_tokens
            t = self._per_token[key] = inst.perf.prefill_time(PrefillShape(n), inst.perf.total_sms) / n
        return t

    def predict(self, req: RouteRequest, inst: SimInstance, now: float) -> tuple[float, float, bool]:
        """(predicted TTFT, predicted next decode step with the request, whether its KV fits now)."""
        perf = inst.perf
        busy = max(inst.step_end - now, 0.0) if inst.busy else 0.0
        queue = inst.pending_prefill_tokens * self._prefill_per_token(inst)
        own = perf.prefill_time(PrefillShape(req.prompt_tokens), perf.total_sms)
        running = inst.sched.num_running
        kv = inst.kv_used_tokens + req.prompt_tokens
        step = perf.decode_time(running + 1, kv, perf.total_sms)
        need = inst.bm.blocks_needed(req.prompt_tokens + 1)
        fits = need <= inst.bm.num_free_blocks - inst.bm.blocks_needed(inst.pending_prefill_tokens)
        return busy + queue + own, step, fits

    def route(self, req: RouteRequest, instances: Sequence[SimInstance], now: float) -> SimInstance:
        best: tuple[tuple[bool, float, int], SimInstance] | None = None
        for inst in instances:
            ttft, step, fits = self.predict(req, inst, now)
            ok = (
                fits
                and (req.ttft_s is None or ttft <= req.ttft_s)
                and (req.tpot_s is None or step <= req.tpot_s)
            )
            key = (not ok, ttft, inst.index)
            if best is None or key < best[0]:
                best = (key, inst)
        assert best is not None
        return best[1]


class PrefixAffinityRouter:
    name = "prefix-affinity"

    def __init__(self, overload: float = 2.0, slack_tokens: int = 8192) -> None:
        if overload < 1 or slack_tokens < 0:
            raise ValueError("prefix-affinity: overload must be >= 1 and slack >= 0")
        self.overload = overload
        self.slack_tokens = slack_tokens
        self.home: dict[object, int] = {}
        self.sticky_hits = 0
        self.rehomed = 0

    def route(self, req: RouteRequest, instances: Sequence[SimInstance], now: float) -> SimInstance:
        key = req.affinity_key
        if key is None:
            return _least_loaded(instances)
        idx = self.home.get(key)
        if idx is not None and idx < len(instances):
            inst = instances[idx]
            mean = sum(i.load_tokens for i in instances) / len(instances)
            if inst.load_tokens <= self.overload * mean + self.slack_tokens:
                self.sticky_hits += 1
                return inst
            self.rehomed += 1
        inst = _least_loaded(instances)
        self.home[key] = instances.index(inst)
        return inst


def make_router(name: str) -> Router:
    if name == "round-robin":
        return RoundRobinRouter()
    if name == "least-loaded":
        return LeastLoadedRouter()
    if name == "least-kv":
        return LeastLoadedRouter("kv")
    if name == "slo-aware":
        return SLOAwareRouter()
    if name == "prefix-affinity":
        return PrefixAffinityRouter()
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
