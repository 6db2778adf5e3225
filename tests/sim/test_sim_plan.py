"""`drift sim plan`: the replica search and its answer."""

from __future__ import annotations

import pytest

from drift_agent.bench.metrics import GoodputTargets
from drift_agent.bench.workloads import WorkloadParams, generate
from drift_agent.sim import LoadSpec, SimSetup
from drift_agent.sim.plan import PlanPoint, min_replicas, plan


def _fake(threshold: int, calls: list[int]):
    def evaluate(n: int) -> PlanPoint:
        calls.append(n)
        met = n >= threshold
        return PlanPoint("chunked", "colocated", n, n, 1.0 if met else 0.5, 1.0, None, None, met)

    return evaluate


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 8, 13])
def test_min_replicas_finds_the_threshold_in_few_evaluations(threshold):
    calls: list[int] = []
    points = min_replicas(_fake(threshold, calls), max_replicas=16)
    assert min(p.replicas for p in points if p.met) == threshold
    assert len(calls) == len(set(calls)) <= 2 * (16).bit_length()


def test_min_replicas_reports_when_nothing_meets_the_target():
    calls: list[int] = []
    points = min_replicas(_fake(99, calls), max_replicas=6)
    assert not any(p.met for p in points) and calls == [1, 2, 4, 6]


def test_plan_needs_more_replicas_for_a_higher_rate():
    specs = generate(
        "random", 240, seed=0, params=WorkloadParams(input_len=1024, output_len=128, range_ratio=0.5)
    )
    base = SimSetup.build("llama-3-8b", "h100")
    load = LoadSpec(slo=GoodputTargets(ttft_ms=300, tpot_ms=15))
    low = plan(base, specs, 8.0, load, ["chunked"], max_replicas=8)
    high = plan(base, specs, 40.0, load, ["chunked"], max_replicas=8)
    assert low.best is not None and high.best is not None
    assert low.best.replicas == 1
    assert high.best.replicas > low.best.replicas
    assert high.best.attainment >= 0.9
    # The one below the answer was evaluated and missed: the answer is minimal.
    below = [p for p in high.points if p.replicas == high.best.replicas - 1]
    assert below and not below[0].met
    assert high.to_dict()["best"]["replicas"] == high.best.replicas


def test_plan_searches_disaggregated_layouts_and_checks_inputs():
    specs = generate("random", 120, seed=1, params=WorkloadParams(input_len=1024, output_len=64))
    base = SimSetup.build("llama-3-8b", "h100")
    load = LoadSpec(slo=GoodputTargets(ttft_ms=500, tpot_ms=30))
    result = plan(base, specs, 4.0, load, ["chunked"], max_replicas=4, disaggregated=True)
    assert any(p.layout.startswith("disagg") for p in result.points)
    assert result.best is not None and result.best.layout == "colocated" and result.best.gpus == 1
    with pytest.raises(ValueError, match="SLO"):
        plan(base, specs, 4.0, LoadSpec(), ["chunked"])
