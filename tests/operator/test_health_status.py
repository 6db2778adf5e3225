"""Metrics health classification, conditions, the decision log, and the status schema guard."""

from __future__ import annotations

from typing import Any

import pytest

from drift_operator.attainment import WindowStats
from drift_operator.health import assess_metrics
from drift_operator.status import (
    Condition,
    DeploymentState,
    append_decision,
    attainment_status,
    iso,
    parse_iso,
    router_status,
    set_conditions,
    slo_condition,
    status_patch,
    workload_conditions,
)

from .crd_validator import CRValidationError, validate

STATS = WindowStats(
    met={"both": 90, "ttft": 95, "tpot": 92}, missed={"both": 10, "ttft": 5, "tpot": 8}, duration_s=60, pods=2
)


def health(**kw: Any) -> Any:
    args = dict(
        now=1000.0,
        last_success=995.0,
        ready_pods=2,
        scraped_pods=2,
        pods_with_counters=2,
        stats=STATS,
        stale_after_s=120,
        source_error=None,
    )
    args.update(kw)
    return assess_metrics(**args)


@pytest.mark.parametrize(
    "kw,status,reason",
    [
        ({}, "True", "MetricsAvailable"),
        ({"ready_pods": 0, "scraped_pods": 0}, "False", "MetricsMissing"),
        ({"last_success": None, "scraped_pods": 0, "pods_with_counters": 0}, "False", "MetricsMissing"),
        ({"pods_with_counters": 0}, "False", "MetricsMissing"),
        ({"last_success": 800.0}, "False", "MetricsStale"),
        ({"scraped_pods": 0, "source_error": "no ready agent answered"}, "False", "MetricsStale"),
        ({"last_success": 700.0, "source_error": "Prometheus down"}, "False", "MetricsMissing"),
        ({"ready_pods": 5, "scraped_pods": 2}, "False", "MetricsPartial"),
        ({"stats": None}, "Unknown", "WarmingUp"),
    ],
)
def test_metrics_health(kw: dict[str, Any], status: str, reason: str) -> None:
    result = health(**kw)
    assert (result.status, result.reason) == (status, reason), result.message
    assert result.usable == (status == "True")


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = set_conditions([], [Condition("Ready", "False", "NoReplicasReady", "0/1")], 100, 1)
    same = set_conditions(first, [Condition("Ready", "False", "Other", "still not")], 200, 2)
    assert same[0]["lastTransitionTime"] == iso(100) and same[0]["reason"] == "Other"
    assert same[0]["observedGeneration"] == 2
    flipped = set_conditions(same, [Condition("Ready", "True", "ReplicasReady", "1/1")], 300, 2)
    assert flipped[0]["lastTransitionTime"] == iso(300)


def test_conditions_keep_a_stable_order() -> None:
    updates = [Condition(t, "True", "R", "m") for t in ("SLOMet", "MetricsAvailable", "Progressing", "Ready")]
    assert [c["type"] for c in set_conditions([], updates, 1, None)] == [
        "Ready", "Progressing", "MetricsAvailable", "SLOMet",
    ]  # fmt: skip


def test_decision_log_is_bounded() -> None:
    log: list[dict[str, Any]] = []
    for i in range(15):
        log = append_decision(
            log, now=i, kind="Scale", before=str(i), after=str(i + 1), reason="R", message="m"
        )
    assert len(log) == 10 and log[0]["from"] == "5" and log[-1]["to"] == "15"


def test_time_round_trip() -> None:
    assert parse_iso(iso(1_700_000_000)) == 1_700_000_000
    assert parse_iso("garbage") is None and parse_iso(None) is None


@pytest.mark.parametrize(
    "desired,state,ready,progressing",
    [
        (2, DeploymentState(2, 2, 2, 2, True), ("True", "ReplicasReady"), ("False", "Stable")),
        (2, DeploymentState(2, 1, 2, 1, True), ("True", "ReplicasReady"), ("True", "RollingOut")),
        (2, DeploymentState(0, 0, 0, 0, False), ("False", "NoReplicasReady"), ("True", "RollingOut")),
        (0, DeploymentState(0, 0, 0, 0, True), ("False", "ScaledToZero"), ("False", "Stable")),
    ],
)
def test_workload_conditions(desired: int, state: DeploymentState, ready: tuple, progressing: tuple) -> None:
    r, p = workload_conditions(desired, state)
    assert (r.status, r.reason) == ready and (p.status, p.reason) == progressing


def test_deployment_state_from_live_object() -> None:
    live = {
        "metadata": {"generation": 3},
        "status": {"observedGeneration": 2, "replicas": 2, "readyReplicas": 2},
    }
    state = DeploymentState.from_live(live)
    assert state.ready == 2 and not state.observed_current
    assert DeploymentState.from_live(None) == DeploymentState(0, 0, 0, 0, False)


def test_slo_condition() -> None:
    ok = health()
    assert slo_condition(ok, STATS, 0.9).status == "True"
    assert slo_condition(ok, STATS, 0.95).reason == "AttainmentBelowTarget"
    idle = WindowStats(met={}, missed={}, duration_s=60)
    assert slo_condition(ok, idle, 0.9).reason == "NoTraffic"
    assert slo_condition(health(stats=None), None, 0.9).status == "Unknown"


def test_everything_the_operator_writes_to_status_is_in_the_crd_schema(crd: dict[str, Any]) -> None:
    """A field missing from the status schema would be pruned silently by the API server."""
    status = {
        "observedGeneration": 3,
        "replicas": 2,
        "readyReplicas": 1,
        "selector": "a=b",
        "model": "embedded",
        "policy": "drift",
        "attainment": {
            **{k: v for k, v in attainment_status(STATS, 0.9, 300).items() if v is not None},
            "updatedAt": iso(1000),
        },
        "partition": {
            "mode": "auto",
            "steered": "tpot_margin",
            "prefillSmShare": 0.55,
            "tpotMargin": -0.1,
            "lastChangeTime": iso(1000),
            "lastEvaluation": {"action": "shift", "reason": "TTFTViolated", "message": "m"},
        },
        "scaling": {
            "owner": "operator",
            "desiredReplicas": 3,
            "lastScaleTime": iso(900),
            "headroomSince": iso(950),
            "lastEvaluation": {"action": "hold", "reason": "WithinTarget", "message": "m"},
        },
        "replicaStatus": [
            {"pod": "p", "ready": True, "metrics": True, "policy": "drift", "prefillSmShare": 0.5,
             "queueWaiting": 0.0, "kvCacheUsage": 0.3},
        ],
        "lastDecisions": append_decision([], now=1, kind="Partition", before="0.50", after="0.55", reason="R", message="m"),
        "router": router_status(True, "prefix-affinity", 2, {"status": {"readyReplicas": 1}})[0],
        "conditions": set_conditions([], [Condition("Ready", "True", "ReplicasReady", "1/1")], 1, 3),
    }  # fmt: skip
    obj = {
        "apiVersion": "serving.drift.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "x"},
        "spec": {},
    }
    validate(crd, {**obj, "status": status})
    with pytest.raises(CRValidationError):
        validate(crd, {**obj, "status": {**status, "lastDecisions": [{"type": "Bogus"}]}})


def test_status_patch_writes_only_what_changed_and_a_coarse_heartbeat() -> None:
    fields = {
        "policy": "drift",
        "attainment": attainment_status(STATS, 0.9, 300),
        "partition": {"mode": "auto"},
    }
    first = status_patch(
        {}, fields, [Condition("Ready", "True", "R", "m")], now=1000, generation=2, heartbeat_s=600
    )
    assert first is not None and first["attainment"]["updatedAt"] == iso(1000)
    live = {**first}
    # Nothing changed: no write, however often the loop ticks, until the heartbeat is due.
    for now in (1015, 1300, 1599):
        same = status_patch(
            live, fields, [Condition("Ready", "True", "R", "m")], now=now, generation=2, heartbeat_s=600
        )
        assert same is None
    beat = status_patch(live, fields, [], now=1600, generation=2, heartbeat_s=600)
    assert beat == {"attainment": {**fields["attainment"], "updatedAt": iso(1600)}}
    # A changed field, or a None that removes one, is written alone.
    moved = status_patch(live, {**fields, "partition": {"mode": "auto", "tpotMargin": 0.1}}, [], now=1100,
                         generation=2, heartbeat_s=600)  # fmt: skip
    assert moved == {"partition": {"mode": "auto", "tpotMargin": 0.1}}
    assert status_patch(live, {"partition": {"mode": None}}, [], now=1100, generation=2, heartbeat_s=600) == {
        "partition": {"mode": None}
    }
    flipped = status_patch(
        live, {}, [Condition("Ready", "False", "X", "m")], now=1100, generation=2, heartbeat_s=600
    )
    assert flipped is not None and flipped["conditions"][0]["status"] == "False"


@pytest.mark.parametrize(
    "raw,keys",
    [
        ({"policy": "drift"}, {"tpotMargin"}),
        ({"policy": "drift", "partition": {"mode": "static"}}, {"prefillSmShare"}),
        ({"policy": "drift", "partition": {"mode": "off"}}, set()),
        ({"policy": "static-split"}, {"prefillSmShare"}),
        ({"policy": "static-split", "partition": {"mode": "off"}}, set()),
        ({"policy": "chunked"}, set()),
    ],
)
def test_status_shows_only_settings_that_mean_something(raw: dict[str, Any], keys: set[str]) -> None:
    from drift_operator.loop import ServiceMemory, _partition_status
    from drift_operator.partition import desired_steering
    from drift_operator.spec import parse_spec

    spec = parse_spec(raw)
    shown = _partition_status(spec, desired_steering(spec, None), ServiceMemory(), None)
    assert {k for k in ("tpotMargin", "prefillSmShare") if shown.get(k) is not None} == keys


def test_router_status_and_condition_follow_the_router_deployment() -> None:
    fields, cond = router_status(True, "least-kv", 2, None)
    assert fields == {"enabled": True, "policy": "least-kv", "replicas": 2, "readyReplicas": 0}
    assert (cond.type, cond.status, cond.reason) == ("RouterReady", "False", "NoRouterReplicasReady")
    live = {
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 1},
    }
    fields, cond = router_status(True, "least-kv", 2, live)
    assert fields["readyReplicas"] == 1
    assert (cond.status, cond.reason, cond.message) == (
        "True",
        "RouterReplicasReady",
        "1/2 router replicas ready",
    )
    fields, cond = router_status(False, "least-kv", 2, live)
    assert (cond.status, cond.reason) == ("False", "RouterDisabled")
    # Switched off: only `enabled` stays, the rest is removed by the merge patch (and then reads back equal).
    patch = status_patch({}, {"router": fields}, [cond], now=1, generation=1, heartbeat_s=600)
    assert patch is not None and patch["router"]["enabled"] is False
    live_status = {"router": {"enabled": False}, "conditions": patch["conditions"]}
    assert status_patch(live_status, {"router": fields}, [cond], now=2, generation=1, heartbeat_s=600) is None
