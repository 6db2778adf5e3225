"""Scale-out sizing: estimator hook, observed throughput, proportional fallback, bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from drift_operator.sizing import CapacityQuery, size_scale_in, size_scale_out

Q = CapacityQuery(
    replicas=2,
    ready_replicas=2,
    demand_rps=12.0,
    goodput_rps=6.0,
    attainment=0.5,
    target=0.9,
    policy="drift",
    prefill_sm_share=0.5,
    ttft_ms=500,
    tpot_ms=50,
    gpus_per_replica=1,
    model="/models/x",
)


def test_throughput_sizing_uses_goodput_per_replica() -> None:
    sizing = size_scale_out(Q, max_step=10, max_replicas=10)
    assert (sizing.desired, sizing.basis, sizing.capacity_rps) == (4, "throughput", 3.0)  # 12 / (6 / 2)


def test_proportional_fallback_without_throughput() -> None:
    sizing = size_scale_out(replace(Q, goodput_rps=None, demand_rps=None), max_step=10, max_replicas=10)
    assert (sizing.desired, sizing.basis) == (4, "proportional")  # ceil(2 * 0.9 / 0.5)


def test_zero_goodput_falls_back_to_proportional_with_a_floor() -> None:
    sizing = size_scale_out(replace(Q, goodput_rps=0.0, attainment=0.0), max_step=3, max_replicas=10)
    assert (sizing.desired, sizing.basis) == (5, "proportional")  # huge, capped by max_step


def test_estimator_wins_and_bad_estimates_are_ignored() -> None:
    assert (
        size_scale_out(Q, max_step=10, max_replicas=10, estimator=lambda q: 1.0).desired == 10
    )  # ceil(12/1)=12
    assert size_scale_out(Q, max_step=10, max_replicas=20, estimator=lambda q: 1.0).desired == 12
    for bad in (None, 0.0, -1.0, float("inf"), float("nan")):
        assert (
            size_scale_out(Q, max_step=10, max_replicas=10, estimator=lambda q, b=bad: b).basis
            == "throughput"
        )


@pytest.mark.parametrize("max_step,max_replicas,expected", [(1, 10, 3), (10, 3, 3), (10, 10, 4)])
def test_scale_out_bounds(max_step: int, max_replicas: int, expected: int) -> None:
    assert size_scale_out(Q, max_step=max_step, max_replicas=max_replicas).desired == expected


def test_scale_out_always_adds_at_least_one() -> None:
    # Observed capacity says 2 replicas suffice, yet the SLO is missed: add one anyway.
    assert size_scale_out(replace(Q, goodput_rps=11.0), max_step=4, max_replicas=10).desired == 3


def test_scale_in_steps() -> None:
    big = replace(Q, replicas=6, ready_replicas=6, demand_rps=4.0)
    assert size_scale_in(big, max_step=1, min_replicas=1).desired == 5
    assert (
        size_scale_in(big, max_step=3, min_replicas=1, estimator=lambda q: 2.0).desired == 3
    )  # ceil(4/1.6)=3
    assert size_scale_in(big, max_step=10, min_replicas=4, estimator=lambda q: 100.0).desired == 4
    idle = replace(big, demand_rps=0.0)
    assert size_scale_in(idle, max_step=10, min_replicas=1, estimator=lambda q: 2.0).desired == 1
