"""`drift sim plan`: the fewest replicas (GPUs) and the policy that meet an SLO attainment target at a rate.

For each policy, replicas N = 1, 2, 4, ... are simulated (colocated instances behind the chosen router) until
one meets the target, then the gap is bisected: SLO attainment is taken to be non-decreasing in N (more replicas
never hurt a load-balanced cluster; noise can break that, and every evaluated point is reported). Optionally the
disaggregated layout (DistServe) is searched too: for each total N from 2 up to the best colocated answer, every
prefill:decode split, smallest N first. The answer is the configuration with the fewest GPUs (ties: the higher
attainment, then the policy listed first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..bench.workloads import RequestSpec
from .runner import LoadSpec, SimSetup, simulate_rate


@dataclass(frozen=True)
class PlanPoint:
    policy: str
    layout: str  # "colocated" or "disagg P:D"
    replicas: int
    gpus: int
    attainment: float
    goodput: float
    p99_ttft_ms: float | None
    p99_tpot_ms: float | None
    met: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PlanResult:
    rate: float
    target: float
    points: list[PlanPoint] = field(default_factory=list)

    @property
    def feasible(self) -> list[PlanPoint]:
        return [p for p in self.points if p.met]

    def best_per_config(self) -> list[PlanPoint]:
        """Per (policy, layout kind): the smallest configuration that met the target."""
        best: dict[tuple[str, str], PlanPoint] = {}
        for p in self.feasible:
            key = (p.policy, p.layout.split()[0])
            if key not in best or (p.gpus, -p.attainment) < (best[key].gpus, -best[key].attainment):
                best[key] = p
        return list(best.values())

    @property
    def best(self) -> PlanPoint | None:
        options = self.best_per_config()
        order = {p: i for i, p in enumerate(dict.fromkeys(q.policy for q in self.points))}
        return min(options, key=lambda p: (p.gpus, -p.attainment, order[p.policy]), default=None)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "request_rate": self.rate,
            "target_attainment": self.target,
            "best": best.to_dict() if best else None,
            "points": [p.to_dict() for p in self.points],
        }


def _point(
    setup: SimSetup, specs: Sequence[RequestSpec], rate: float, load: LoadSpec, target: float
) -> PlanPoint:
    s = simulate_rate(setup, specs, rate, load).summary
    c = setup.cluster
    layout = f"disagg {c.disaggregated[0]}:{c.disaggregated[1]}" if c.disaggregated else "colocated"
    att = float(s["slo_attainment"])
    return PlanPoint(
        policy=setup.instance.policy,
        layout=layout,
        replicas=c.num_instances,
        gpus=setup.gpus,
        attainment=att,
        goodput=float(s["request_goodput"]),
        p99_ttft_ms=s.get("p99_ttft_ms"),
        p99_tpot_ms=s.get("p99_tpot_ms"),
        met=att >= target,
    )


def min_replicas(evaluate: Callable[[int], PlanPoint], max_replicas: int) -> list[PlanPoint]:
    """Points evaluated while searching the smallest N in [1, max_replicas] that meets the target:
    doubling, then bisection (attainment assumed non-decreasing in N)."""
    seen: dict[int, PlanPoint] = {}

    def at(n: int) -> PlanPoint:
        if n not in seen:
            seen[n] = evaluate(n)
        return seen[n]

    lo, n = 0, 1  # lo: largest N known to miss
    while not at(n).met:
        lo = n
        if n >= max_replicas:
            return list(seen.values())
        n = min(2 * n, max_replicas)
    hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).met:
            hi = mid
        else:
            lo = mid
    return [seen[k] for k in sorted(seen)]


def plan(
    base: SimSetup,
    specs: Sequence[RequestSpec],
    rate: float,
    load: LoadSpec,
    policies: Sequence[str],
    *,
    target: float = 0.9,
    max_replicas: int = 16,
    disaggregated: bool = False,
    on_point: Callable[[PlanPoint], None] | None = None,
) -> PlanResult:
    if not load.slo:
        raise ValueError("planning needs an SLO (--slo ttft:MS tpot:MS)")
    if not 0 < target <= 1 or max_replicas < 1 or not rate > 0:
        raise ValueError("plan needs a rate > 0, a target in (0, 1] and max replicas >= 1")
    result = PlanResult(rate, target)

    def record(p: PlanPoint) -> PlanPoint:
        result.points.append(p)
        if on_point:
            on_point(p)
        return p

    for policy in policies:
        setup = base.with_policy(policy).with_cluster(disaggregated=None)
        min_replicas(
            lambda n, s=setup: record(_point(s.with_cluster(instances=n), specs, rate, load, target)),
            max_replicas,
        )
    if disaggregated:
        colocated = [p.replicas for p in result.feasible]
        limit = min(colocated) if colocated else max_replicas
        found = False
        for total in range(2, max(limit, 2) + 1):
            for prefill in range(1, total):
                setup = base.with_policy("chunked").with_cluster(disaggregated=(prefill, total - prefill))
                found = record(_point(setup, specs, rate, load, target)).met or found
            if found:
                break
    return result
