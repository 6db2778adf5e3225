"""How many replicas a step should move to (pure).

Sizing prefers a capacity estimate: the requests per second one replica can serve while meeting its SLOs.
It comes from, in order:

1. a pluggable `CapacityEstimator` (a plain callable) -- the hook where the simulator / performance model
   plugs in once it exists: given the service's shape and the observed load, return a per-replica capacity
   in requests/s, or None to defer;
2. the observed goodput while the SLO is being violated: replicas that are over capacity deliver about
   their capacity at SLO, so goodput / ready replicas estimates it;
3. otherwise proportional scaling, desired = ceil(current * target / attainment).

Every result is clamped by the step limits and the replica bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# Below this attainment proportional scaling would explode; the step limit caps it anyway.
_MIN_ATTAINMENT = 0.1


@dataclass(frozen=True)
class CapacityQuery:
    """Everything an estimator may want to know about one LLMService right now."""

    replicas: int
    ready_replicas: int
    demand_rps: float | None
    goodput_rps: float | None
    attainment: float | None
    target: float
    policy: str
    prefill_sm_share: float | None
    ttft_ms: float
    tpot_ms: float
    gpus_per_replica: int
    model: str | None


CapacityEstimator = Callable[[CapacityQuery], float | None]


@dataclass(frozen=True)
class Sizing:
    desired: int
    basis: Literal["estimator", "throughput", "proportional", "step"]
    capacity_rps: float | None = None

    def describe(self) -> str:
        if self.capacity_rps is not None:
            return f"{self.basis}: {self.capacity_rps:.2f} req/s per replica at SLO"
        return self.basis


def _estimate(query: CapacityQuery, estimator: CapacityEstimator | None) -> float | None:
    if estimator is None:
        return None
    value = estimator(query)
    return value if value is not None and value > 0 and math.isfinite(value) else None


def size_scale_out(
    query: CapacityQuery, *, max_step: int, max_replicas: int, estimator: CapacityEstimator | None = None
) -> Sizing:
    current = query.replicas
    ceiling = min(max_replicas, current + max_step)
    capacity = _estimate(query, estimator)
    basis: Literal["estimator", "throughput", "proportional"] = "estimator"
    if capacity is None and query.goodput_rps and query.ready_replicas > 0:
        capacity, basis = query.goodput_rps / query.ready_replicas, "throughput"
    if capacity is not None and query.demand_rps:
        needed = math.ceil(query.demand_rps / capacity)
        return Sizing(max(current + 1, min(ceiling, needed)), basis, capacity)
    attainment = max(query.attainment if query.attainment is not None else 0.0, _MIN_ATTAINMENT)
    needed = math.ceil(current * query.target / attainment)
    return Sizing(max(current + 1, min(ceiling, needed)), "proportional")


def size_scale_in(
    query: CapacityQuery,
    *,
    max_step: int,
    min_replicas: int,
    estimator: CapacityEstimator | None = None,
    utilization: float = 0.8,
) -> Sizing:
    """Step down. With an estimator the step lands where the remaining replicas run at `utilization` of
    capacity; without one it removes a single replica, since headroom says nothing about how much."""
    current = query.replicas
    floor = max(min_replicas, current - max_step)
    capacity = _estimate(query, estimator)
    if capacity is not None and query.demand_rps is not None:
        needed = math.ceil(query.demand_rps / (capacity * utilization)) if query.demand_rps > 0 else 0
        return Sizing(min(current, max(floor, needed)), "estimator", capacity)
    return Sizing(max(floor, current - 1), "step")
