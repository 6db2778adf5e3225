"""Replica decisions across a table of scenarios: violations, headroom, metrics trouble, bounds, cooldowns,
rollouts, low traffic and HPA ownership."""

from __future__ import annotations

from typing import Any

import pytest

from drift_operator.attainment import WindowStats
from drift_operator.health import MetricsHealth
from drift_operator.scaling import ScaleInputs, decide_scale
from drift_operator.sizing import CapacityQuery
from drift_operator.spec import ScalingSpec

NOW = 10_000.0
OK = MetricsHealth("True", "MetricsAvailable", "fresh")
SCALING = ScalingSpec(
    min_replicas=1,
    max_replicas=8,
    max_step=2,
    scale_up_cooldown_seconds=60,
    scale_down_cooldown_seconds=300,
    scale_down_stabilization_seconds=300,
    headroom=0.05,
    min_requests=20,
)


def stats(
    attainment: float, requests: float = 1000, duration: float = 100, waiting: float = 0.0
) -> WindowStats:
    met = attainment * requests
    return WindowStats(
        met={"both": met, "ttft": met, "tpot": requests},
        missed={"both": requests - met, "ttft": requests - met, "tpot": 0.0},
        duration_s=duration,
        pods=2,
        queue_waiting=waiting,
    )


def decide(replicas: int = 2, ready: int | None = None, window: WindowStats | None = None, **kw: Any) -> Any:
    window = window if window is not None else stats(0.95)
    inputs = ScaleInputs(
        now=NOW,
        replicas=replicas,
        ready_replicas=replicas if ready is None else ready,
        owner=kw.pop("owner", "operator"),
        metrics=kw.pop("metrics", OK),
        stats=window,
        target=0.9,
        last_scale_time=kw.pop("last_scale_time", None),
        headroom_since=kw.pop("headroom_since", None),
    )
    query = CapacityQuery(
        replicas=replicas,
        ready_replicas=inputs.ready_replicas,
        demand_rps=window.demand_rps,
        goodput_rps=window.goodput_rps,
        attainment=window.overall,
        target=0.9,
        policy="drift",
        prefill_sm_share=0.5,
        ttft_ms=1000,
        tpot_ms=100,
        gpus_per_replica=1,
        model=None,
    )
    return decide_scale(inputs, kw.pop("scaling", SCALING), query, kw.pop("estimator", None))


CASES: list[tuple[str, dict[str, Any], str, int, str]] = [
    # name, inputs, action, desired, reason
    ("violation sized by throughput", {"window": stats(0.6)}, "scale-out", 4, "SLOViolated"),
    ("mild violation", {"window": stats(0.85)}, "scale-out", 3, "SLOViolated"),
    ("severe violation capped by maxStep", {"replicas": 2, "window": stats(0.1)}, "scale-out", 4, "SLOViolated"),
    ("violation near maxReplicas", {"replicas": 7, "window": stats(0.5)}, "scale-out", 8, "SLOViolated"),
    ("violation at maxReplicas", {"replicas": 8, "window": stats(0.5)}, "hold", 8, "AtMaxReplicas"),
    ("violation in cooldown", {"window": stats(0.5), "last_scale_time": NOW - 30}, "hold", 2, "ScaleUpCooldown"),
    ("violation after cooldown", {"window": stats(0.5), "last_scale_time": NOW - 61}, "scale-out", 4, "SLOViolated"),
    ("within target band", {"window": stats(0.92)}, "hold", 2, "WithinTarget"),
    ("headroom just started", {"window": stats(0.99)}, "hold", 2, "HeadroomNotSustained"),
    ("headroom sustained", {"window": stats(0.99), "headroom_since": NOW - 301}, "scale-in", 1, "SustainedHeadroom"),
    (
        "headroom but scale-down cooldown",
        {"window": stats(0.99), "headroom_since": NOW - 400, "last_scale_time": NOW - 100},
        "hold", 2, "ScaleDownCooldown",
    ),
    ("headroom at minReplicas", {"replicas": 1, "window": stats(1.0), "headroom_since": NOW - 900}, "hold", 1, "AtMinReplicas"),
    ("headroom with a queue", {"window": stats(0.99, waiting=5), "headroom_since": NOW - 400}, "hold", 2, "QueueNotEmpty"),
    ("idle sustained", {"replicas": 3, "window": stats(1.0, requests=0), "headroom_since": NOW - 400}, "scale-in", 2, "Idle"),
    ("too little traffic to judge", {"window": stats(0.2, requests=10)}, "hold", 2, "InsufficientTraffic"),
    ("rollout in progress", {"replicas": 3, "ready": 2, "window": stats(0.5)}, "hold", 3, "RolloutInProgress"),
    ("missing metrics never scale", {"metrics": MetricsHealth("False", "MetricsMissing", "none")}, "hold", 2, "MetricsMissing"),
    ("stale metrics never scale", {"metrics": MetricsHealth("False", "MetricsStale", "old"), "window": stats(0.1)}, "hold", 2, "MetricsStale"),
    ("warming up", {"metrics": MetricsHealth("Unknown", "WarmingUp", "one scrape")}, "hold", 2, "WarmingUp"),
    ("below minReplicas", {"replicas": 0}, "scale-out", 1, "BelowMinReplicas"),
    ("above maxReplicas", {"replicas": 12}, "scale-in", 8, "AboveMaxReplicas"),
    ("HPA owns replicas", {"owner": "external", "window": stats(0.1)}, "hold", 2, "ExternalAutoscaler"),
]  # fmt: skip


@pytest.mark.parametrize("name,inputs,action,desired,reason", CASES, ids=[c[0] for c in CASES])
def test_scale_decision_table(
    name: str, inputs: dict[str, Any], action: str, desired: int, reason: str
) -> None:
    decision = decide(**inputs)
    assert (decision.action, decision.desired, decision.reason) == (action, desired, reason), decision.message


def test_missing_metrics_hold_even_below_any_traffic() -> None:
    """Broken metrics hold at the current size; they never walk the service down (let alone to zero)."""
    for reason in ("MetricsMissing", "MetricsStale", "MetricsPartial"):
        decision = decide(
            replicas=5, metrics=MetricsHealth("False", reason, "x"), window=stats(1.0, requests=0)
        )
        assert decision.desired == 5 and decision.headroom_since is None


def test_headroom_clock_is_kept_while_holding_and_reset_by_a_violation() -> None:
    first = decide(window=stats(0.99))
    assert first.headroom_since == NOW
    kept = decide(window=stats(0.99), headroom_since=NOW - 100)
    assert kept.headroom_since == NOW - 100
    assert decide(window=stats(0.92), headroom_since=NOW - 100).headroom_since is None  # hysteresis band
    assert decide(window=stats(0.5), headroom_since=NOW - 100).headroom_since is None


def test_estimator_hook_sizes_scale_out() -> None:
    seen = []

    def estimator(query: Any) -> float:
        seen.append(query)
        return 2.0  # requests/s per replica at SLO

    decision = decide(window=stats(0.6, requests=1000, duration=100), estimator=estimator)  # 10 req/s demand
    assert seen and seen[0].demand_rps == pytest.approx(10.0)
    assert decision.desired == 4 and "estimator" in decision.message  # ceil(10 / 2) = 5, capped by maxStep 2
    wide = SCALING.model_copy(update={"max_step": 10})
    assert decide(window=stats(0.6), estimator=estimator, scaling=wide).desired == 5


def test_estimator_guides_scale_in() -> None:
    def estimator(query: Any) -> float:
        return 3.0

    # 10 req/s at 80% of 3 req/s per replica needs 5 replicas: 6 -> 5, not further.
    decision = decide(replicas=6, window=stats(0.99), headroom_since=NOW - 400, estimator=estimator)
    assert (decision.action, decision.desired) == ("scale-in", 5)
    held = decide(replicas=5, window=stats(0.99), headroom_since=NOW - 400, estimator=estimator)
    assert (held.action, held.reason) == ("hold", "CapacityNeeded")
