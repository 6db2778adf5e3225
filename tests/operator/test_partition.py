"""Steering decisions: shift toward the violating phase, within bounds, at a bounded pace; static-split's
prefill share, drift's TPOT margin."""

from __future__ import annotations

from typing import Any

import pytest

from drift_operator.attainment import WindowStats
from drift_operator.health import MetricsHealth
from drift_operator.partition import Steering, decide_steering, desired_steering
from drift_operator.spec import parse_spec

OK = MetricsHealth("True", "MetricsAvailable", "fresh")
NOW = 5000.0


def stats(ttft: float, tpot: float, requests: float = 100) -> WindowStats:
    return WindowStats(
        met={"ttft": ttft * requests, "tpot": tpot * requests, "both": min(ttft, tpot) * requests},
        missed={
            "ttft": (1 - ttft) * requests,
            "tpot": (1 - tpot) * requests,
            "both": (1 - min(ttft, tpot)) * requests,
        },
        duration_s=60,
    )


def decide(
    ttft: float, tpot: float, current: float = 0.5, raw: dict[str, Any] | None = None, **kw: Any
) -> Any:
    """static-split (the steered value is the prefill share) unless `raw` says otherwise."""
    spec = parse_spec(
        raw
        or {"policy": "static-split", "partition": {"cooldownSeconds": 60}, "slo": {"attainmentTarget": 0.9}}
    )
    setting = spec.steered_setting or "prefill_sm_share"
    start = desired_steering(spec, None).with_value(setting, current)
    return decide_steering(
        spec,
        now=NOW,
        current=start,
        metrics=kw.get("metrics", OK),
        stats=kw.get("window", stats(ttft, tpot, kw.get("requests", 100))),
        last_change_time=kw.get("last_change_time"),
    )


CASES = [
    ("TTFT misses, TPOT slack: more prefill", dict(ttft=0.7, tpot=0.99), "shift", 0.55, "TTFTViolated"),
    ("TPOT misses, TTFT slack: more decode", dict(ttft=0.99, tpot=0.7), "shift", 0.45, "TPOTViolated"),
    ("both miss, TTFT clearly worse", dict(ttft=0.5, tpot=0.85), "shift", 0.55, "TTFTViolated"),
    ("both miss, TPOT clearly worse", dict(ttft=0.85, tpot=0.5), "shift", 0.45, "TPOTViolated"),
    ("both miss about equally: scaling's job", dict(ttft=0.8, tpot=0.82), "hold", 0.5, "BothViolated"),
    ("both met", dict(ttft=0.95, tpot=0.97), "hold", 0.5, "SLOMet"),
    ("at the prefill bound", dict(ttft=0.5, tpot=1.0, current=0.9), "hold", 0.9, "AtPartitionBound"),
    ("near the bound: clamped", dict(ttft=0.5, tpot=1.0, current=0.88), "shift", 0.9, "TTFTViolated"),
    ("at the decode bound", dict(ttft=1.0, tpot=0.5, current=0.1), "hold", 0.1, "AtPartitionBound"),
    ("cooldown", dict(ttft=0.5, tpot=1.0, last_change_time=NOW - 30), "hold", 0.5, "PartitionCooldown"),
    ("after cooldown", dict(ttft=0.5, tpot=1.0, last_change_time=NOW - 61), "shift", 0.55, "TTFTViolated"),
    ("stale metrics hold", dict(ttft=0.1, tpot=1.0, metrics=MetricsHealth("False", "MetricsStale", "x")), "hold", 0.5, "MetricsStale"),
    ("too few requests", dict(ttft=0.1, tpot=1.0, requests=5), "hold", 0.5, "InsufficientTraffic"),
    ("static mode is not steered", dict(ttft=0.1, tpot=1.0, raw={"policy": "static-split", "partition": {"mode": "static"}}), "hold", 0.5, "NotSteerable"),
    ("drift in static mode is not steered", dict(ttft=0.1, tpot=1.0, raw={"partition": {"mode": "static"}}), "hold", 0.5, "NotSteerable"),
    ("chunked has no partition", dict(ttft=0.1, tpot=1.0, raw={"policy": "chunked"}), "hold", 0.5, "NotSteerable"),
]  # fmt: skip


@pytest.mark.parametrize("name,inputs,action,desired,reason", CASES, ids=[c[0] for c in CASES])
def test_partition_decision_table(
    name: str, inputs: dict[str, Any], action: str, desired: float, reason: str
) -> None:
    decision = decide(**inputs)
    assert (decision.action, decision.reason) == (action, reason), decision.message
    assert decision.desired.prefill_sm_share == pytest.approx(desired)


def test_desired_steering_start_clamp_and_static() -> None:
    auto = parse_spec(
        {
            "policy": "static-split",
            "partition": {"prefillSmShare": 0.4, "minPrefillSmShare": 0.3, "maxPrefillSmShare": 0.7},
        }
    )
    assert desired_steering(auto, None).prefill_sm_share == 0.4
    # bounds tightened after the split moved
    assert desired_steering(auto, {"prefill_sm_share": 0.95}).prefill_sm_share == 0.7
    static = parse_spec({"policy": "static-split", "partition": {"mode": "static", "prefillSmShare": 0.25}})
    assert desired_steering(static, {"prefill_sm_share": 0.6}).prefill_sm_share == 0.25
    drift = parse_spec({"partition": {"tpotMargin": 0.1, "maxTpotMargin": 0.2}})
    assert desired_steering(drift, None) == Steering(0.5, 0.1)
    # drift steers its margin, never its prefill share
    assert desired_steering(drift, {"prefill_sm_share": 0.9, "tpot_margin": 0.4}) == Steering(0.5, 0.2)


DRIFT = {"partition": {"cooldownSeconds": 60}, "slo": {"attainmentTarget": 0.9}}
MARGIN_CASES = [
    ("TPOT lags: more margin, decode gets more", dict(ttft=0.99, tpot=0.7), "shift", 0.1, "TPOTViolated"),
    ("TTFT lags: less margin, prefill gets more", dict(ttft=0.7, tpot=0.99), "shift", -0.1, "TTFTViolated"),
    ("at the upper margin bound", dict(ttft=0.99, tpot=0.7, current=0.5), "hold", 0.5, "AtPartitionBound"),
    ("at the lower margin bound", dict(ttft=0.7, tpot=0.99, current=-0.3), "hold", -0.3, "AtPartitionBound"),
    ("both met", dict(ttft=0.95, tpot=0.97), "hold", 0.0, "SLOMet"),
]  # fmt: skip


@pytest.mark.parametrize("name,inputs,action,desired,reason", MARGIN_CASES, ids=[c[0] for c in MARGIN_CASES])
def test_drift_steers_its_tpot_margin(
    name: str, inputs: dict[str, Any], action: str, desired: float, reason: str
) -> None:
    decision = decide(**{"current": 0.0, **inputs}, raw=DRIFT)
    assert (decision.action, decision.reason, decision.setting) == (action, reason, "tpot_margin")
    assert decision.desired.tpot_margin == pytest.approx(desired)
    assert decision.desired.prefill_sm_share == decision.current.prefill_sm_share


def test_repeated_violations_walk_the_split_one_step_at_a_time() -> None:
    share, time = 0.5, None
    shares = []
    for _ in range(12):
        decision = decide(ttft=0.5, tpot=1.0, current=share, last_change_time=time)
        if decision.changed:
            share, time = decision.desired.prefill_sm_share, NOW
        shares.append(share)
        time = time - 61 if time is not None else None  # the next tick is past the cooldown
    assert shares[:3] == pytest.approx([0.55, 0.6, 0.65]) and shares[-1] == pytest.approx(0.9)
