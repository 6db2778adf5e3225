"""Routing policies: which instance gets a new request. The simulator and `drift router` run these same
objects, each over its own `InstanceView`s (`view.py`).

- `round-robin`: in turn, blind to load.
- `random`: uniformly at random (seeded), blind to load: what a Kubernetes Service's kube-proxy does, the
  baseline a service without a router gets.
- `least-loaded`: the fewest tokens of work (prompt tokens still to prefill + KV tokens held), or with
  `metric="kv"` (`least-kv`) the lowest KV usage (Llumnix's dispatch rule uses a memory-based load).
- `slo-aware`: predicts each instance's TTFT for the request (the rest of the running step, the queued prefill
  work, and the request's own prefill) and its next decode step with the request added; among instances
  predicted to meet the request's TTFT and TPOT targets and able to hold its KV, the one with the earliest
  predicted first token; if none qualifies, the earliest predicted first token anyway. An instance whose
  measured SLO attainment is known and below `SLO_ATTAINMENT_FLOOR` ranks after the others of its group:
  it misses targets its load figures do not explain (a throttled or shared GPU), so its predictions are not
  trusted. Unknown attainment (None: no recent requests, or the simulator) never changes a choice.
- `prefix-affinity`: requests with the same affinity key (a conversation's session, else the prompt's opening:
  a shared system prompt) stick to one instance so its prefix cache hits; a new key, or a sticky instance
  loaded past `overload` times the mean (plus slack) goes to the least-loaded one, which then becomes the
  key's instance. A key whose instance is not among the candidates (it refused the request and is in its
  Retry-After window, it is being retried elsewhere, its polls fail) goes to the least-loaded one *without*
  moving: its instance keeps the conversation's cache and gets it back when it returns, as llm-d keeps
  affinity unless the home is overloaded. Only a home away for longer than `rehome_after_s` (or forgotten:
  removed from the pool) is replaced.

Ties go to the lowest `index`. `route` needs at least one instance (`ValueError` otherwise).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .view import InstanceView, blocks_needed

ROUTERS: tuple[str, ...] = (
    "round-robin",
    "random",
    "least-loaded",
    "least-kv",
    "slo-aware",
    "prefix-affinity",
)
# What `drift router` and the operator's `spec.router.policy` use unless told otherwise: on multi-turn traffic
# it doubles the prefix-cache hit rate of load-blind spreading (docs/benchmarks.md).
DEFAULT_ROUTER = "prefix-affinity"

# Below this measured attainment an instance's predictions are not trusted (`SLOAwareRouter`): a half of its
# recent requests missed a target, far below any SLO a service is run at, so transient misses do not move
# traffic but a persistently failing instance is passed over.
SLO_ATTAINMENT_FLOOR = 0.5

# The caller's own instance type comes back (a `SimInstance` in the simulator, the router's backend there).
V = TypeVar("V", bound=InstanceView)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    prompt_tokens: int
    affinity_key: object | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None


class Router(Protocol):
    name: str

    def route(self, req: RouteRequest, instances: Sequence[V], now: float) -> V: ...


def _check(instances: Sequence[InstanceView]) -> None:
    if not instances:
        raise ValueError("no instance to route to")


def _least_loaded(instances: Sequence[V]) -> V:
    return min(instances, key=lambda i: (i.load_tokens, i.index))


class RandomRouter:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def route(self, req: RouteRequest, instances: Sequence[V], now: float) -> V:
        _check(instances)
        return instances[self._rng.randrange(len(instances))]


class RoundRobinRouter:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, req: RouteRequest, instances: Sequence[V], now: float) -> V:
        _check(instances)
        inst = instances[self._next % len(instances)]
        self._next += 1
        return inst


class LeastLoadedRouter:
    name = "least-loaded"

    def __init__(self, metric: str = "tokens") -> None:
        if metric not in ("tokens", "kv"):
            raise ValueError(f"least-loaded metric must be 'tokens' or 'kv', got {metric!r}")
        self.metric = metric

    def route(self, req: RouteRequest, instances: Sequence[V], now: float) -> V:
        _check(instances)
        if self.metric == "kv":
            return min(instances, key=lambda i: (i.kv_usage, i.pending_prefill_tokens, i.index))
        return _least_loaded(instances)


class SLOAwareRouter:
    name = "slo-aware"

    def predict(self, req: RouteRequest, inst: InstanceView, now: float) -> tuple[float, float, bool]:
        """(predicted TTFT, predicted next decode step with the request, whether its KV fits now)."""
        busy = inst.busy_for(now)
        queue = inst.queued_prefill_s()
        own = inst.prefill_s(req.prompt_tokens)
        step = inst.decode_step_s(inst.num_running + 1, inst.kv_used_tokens + req.prompt_tokens)
        bs = inst.block_size
        need = blocks_needed(req.prompt_tokens + 1, bs)
        fits = need <= inst.free_kv_blocks - blocks_needed(inst.pending_prefill_tokens, bs)
        return busy + queue + own, step, fits

    def route(self, req: RouteRequest, instances: Sequence[V], now: float) -> V:
        _check(instances)
        best: tuple[tuple[bool, bool, float, int], V] | None = None
        for inst in instances:
            ttft, step, fits = self.predict(req, inst, now)
            ok = (
                fits
                and (req.ttft_s is None or ttft <= req.ttft_s)
                and (req.tpot_s is None or step <= req.tpot_s)
            )
            attainment = inst.slo_attainment
            failing = attainment is not None and attainment < SLO_ATTAINMENT_FLOOR
            key = (not ok, failing, ttft, inst.index)
            if best is None or key < best[0]:
                best = (key, inst)
        assert best is not None
        return best[1]


class PrefixAffinityRouter:
    """`home` maps an affinity key to its instance's `index` (a stable id, not a list position: in the live
    router backends come and go). `max_keys` bounds it for a long-running router (the least recently routed
    keys go first); None keeps every key, as the simulator does."""

    name = "prefix-affinity"

    def __init__(
        self,
        overload: float = 2.0,
        slack_tokens: int = 8192,
        max_keys: int | None = None,
        rehome_after_s: float = 60.0,
    ) -> None:
        if overload < 1 or slack_tokens < 0 or rehome_after_s < 0:
            raise ValueError("prefix-affinity: overload must be >= 1, slack and rehome_after_s >= 0")
        if max_keys is not None and max_keys < 1:
            raise ValueError(f"prefix-affinity: max_keys must be >= 1, got {max_keys}")
        self.overload = overload
        self.slack_tokens = slack_tokens
        self.max_keys = max_keys
        self.rehome_after_s = rehome_after_s
        self.home: dict[object, int] = {}
        self.away: dict[object, float] = {}  # key -> when its home was first missing from the candidates
        self.sticky_hits = 0
        self.rehomed = 0
        self.stand_ins = 0  # requests served elsewhere while their home was away (the home kept)

    def route(self, req: RouteRequest, instances: Sequence[V], now: float) -> V:
        _check(instances)
        key = req.affinity_key
        if key is None:
            return _least_loaded(instances)
        idx = self.home.get(key)
        if idx is not None:
            inst = next((i for i in instances if i.index == idx), None)
            if inst is not None:
                self.away.pop(key, None)
                mean = sum(i.load_tokens for i in instances) / len(instances)
                if inst.load_tokens <= self.overload * mean + self.slack_tokens:
                    self.sticky_hits += 1
                    self._set_home(key, idx)
                    return inst
                self.rehomed += 1
            elif now - self.away.setdefault(key, now) < self.rehome_after_s:
                self.stand_ins += 1
                self._set_home(key, idx)  # still the home (and recently used)
                return _least_loaded(instances)
            else:  # away too long: the key is new again
                del self.away[key]
        inst = _least_loaded(instances)
        self._set_home(key, inst.index)
        return inst

    def _set_home(self, key: object, index: int) -> None:
        if self.max_keys is None:
            self.home[key] = index
            return
        self.home.pop(key, None)  # re-inserted last: the dict's order is the LRU order
        self.home[key] = index
        while len(self.home) > self.max_keys:
            oldest = next(iter(self.home))
            del self.home[oldest]
            self.away.pop(oldest, None)

    def forget(self, index: int) -> None:
        """Drop the keys homed on instance `index` (a backend that left for good)."""
        for key in [k for k, v in self.home.items() if v == index]:
            del self.home[key]
            self.away.pop(key, None)


def make_router(name: str) -> Router:
    if name == "round-robin":
        return RoundRobinRouter()
    if name == "random":
        return RandomRouter()
    if name == "least-loaded":
        return LeastLoadedRouter()
    if name == "least-kv":
        return LeastLoadedRouter("kv")
    if name == "slo-aware":
        return SLOAwareRouter()
    if name == "prefix-affinity":
        return PrefixAffinityRouter()
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
