"""Status building blocks (pure): timestamps, metav1.Condition lists, the decision log, child readiness."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .attainment import WindowStats
from .constants import MAX_DECISIONS
from .health import ConditionStatus, MetricsHealth
from .times import iso, parse_iso


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str


def set_conditions(
    existing: Sequence[Mapping[str, Any]] | None,
    updates: Sequence[Condition],
    now: float,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Merge condition updates into a list; lastTransitionTime moves only when the status flips."""
    by_type: dict[str, dict[str, Any]] = {
        str(c.get("type")): dict(c) for c in existing or [] if c.get("type")
    }
    for cond in updates:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message[:1024],
            "lastTransitionTime": iso(now)
            if changed or old is None
            else old.get("lastTransitionTime", iso(now)),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[cond.type] = entry
    order = ["Ready", "Progressing", "MetricsAvailable", "SLOMet"]
    return sorted(
        by_type.values(), key=lambda c: (order.index(c["type"]) if c["type"] in order else 99, c["type"])
    )


def condition_status(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> str | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return str(cond.get("status"))
    return None


def append_decision(
    decisions: Sequence[Mapping[str, Any]] | None,
    *,
    now: float,
    kind: str,
    before: str,
    after: str,
    reason: str,
    message: str,
) -> list[dict[str, Any]]:
    entry = {
        "time": iso(now),
        "type": kind,
        "from": before,
        "to": after,
        "reason": reason,
        "message": message[:512],
    }
    return [*(dict(d) for d in decisions or []), entry][-MAX_DECISIONS:]


@dataclass(frozen=True)
class DeploymentState:
    replicas: int
    ready: int
    updated: int
    available: int
    observed_current: bool

    @classmethod
    def from_live(cls, live: Mapping[str, Any] | None) -> DeploymentState:
        if not live:
            return cls(0, 0, 0, 0, False)
        status = live.get("status") or {}
        generation = (live.get("metadata") or {}).get("generation")
        observed = status.get("observedGeneration")
        return cls(
            replicas=int(status.get("replicas") or 0),
            ready=int(status.get("readyReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            available=int(status.get("availableReplicas") or 0),
            observed_current=generation is None or observed is None or observed >= generation,
        )


def workload_conditions(desired_replicas: int, deployment: DeploymentState) -> list[Condition]:
    """Ready and Progressing from the Deployment's own status."""
    ready_text = f"{deployment.ready}/{desired_replicas} replicas ready"
    if desired_replicas == 0:
        ready = Condition("Ready", "False", "ScaledToZero", "replicas is 0")
    elif deployment.ready > 0:
        ready = Condition("Ready", "True", "ReplicasReady", ready_text)
    else:
        ready = Condition("Ready", "False", "NoReplicasReady", ready_text)
    converged = (
        deployment.observed_current
        and deployment.updated >= desired_replicas
        and deployment.ready >= desired_replicas
        and deployment.replicas == desired_replicas
    )
    progressing = (
        Condition("Progressing", "False", "Stable", ready_text)
        if converged
        else Condition("Progressing", "True", "RollingOut", ready_text)
    )
    return [ready, progressing]


def router_status(
    enabled: bool, policy: str, desired: int, live: Mapping[str, Any] | None
) -> tuple[dict[str, Any], Condition]:
    """status.router and the RouterReady condition, from the router Deployment's own status. Ready means at
    least one router replica serves: the client Service then reaches the agents. Off, the fields other than
    `enabled` are None (removed by the merge patch)."""
    if not enabled:
        fields: dict[str, Any] = {"enabled": False, "policy": None, "replicas": None, "readyReplicas": None}
        return fields, Condition(
            "RouterReady", "False", "RouterDisabled", "no router: the Service selects the agents directly"
        )
    state = DeploymentState.from_live(live)
    fields = {"enabled": True, "policy": policy, "replicas": desired, "readyReplicas": state.ready}
    text = f"{state.ready}/{desired} router replicas ready"
    if state.ready > 0:
        return fields, Condition("RouterReady", "True", "RouterReplicasReady", text)
    return fields, Condition("RouterReady", "False", "NoRouterReplicasReady", text)


def slo_condition(metrics: MetricsHealth, stats: WindowStats | None, target: float) -> Condition:
    if not metrics.usable or stats is None:
        return Condition("SLOMet", "Unknown", metrics.reason, f"attainment unknown: {metrics.message}")
    overall = stats.overall
    if overall is None:
        return Condition("SLOMet", "Unknown", "NoTraffic", "no requests in the window")
    parts = []
    for phase in ("ttft", "tpot"):
        value = stats.attainment(phase)
        if value is not None:
            parts.append(f"{phase.upper()} {value:.3f}")
    detail = f"attainment {overall:.3f} ({', '.join(parts)}) vs target {target}"
    if overall >= target:
        return Condition("SLOMet", "True", "AttainmentMet", detail)
    return Condition("SLOMet", "False", "AttainmentBelowTarget", detail)


def attainment_status(stats: WindowStats | None, target: float, window_s: float) -> dict[str, Any]:
    """status.attainment without its `updatedAt` stamp (`status_patch` adds it when the values change, or on
    the heartbeat); keys with unknown values are None, which a merge patch turns into removals."""

    def rounded(value: float | None, digits: int = 4) -> float | None:
        return round(value, digits) if value is not None else None

    known = stats is not None
    return {
        "ttft": rounded(stats.attainment("ttft")) if known else None,
        "tpot": rounded(stats.attainment("tpot")) if known else None,
        "both": rounded(stats.overall) if known else None,
        "target": target,
        "windowSeconds": int(window_s),
        "requests": int(stats.total_requests) if known else None,
        "demandRps": rounded(stats.demand_rps, 3) if known else None,
        "goodputRps": rounded(stats.goodput_rps, 3) if known else None,
    }


def _pruned(value: Any) -> Any:
    """A value as it reads back after a merge patch: None entries removed, recursively."""
    if isinstance(value, Mapping):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_pruned(v) for v in value]
    return value


def status_patch(
    live: Mapping[str, Any],
    fields: Mapping[str, Any],
    conditions: Sequence[Condition],
    *,
    now: float,
    generation: int | None,
    heartbeat_s: float,
) -> dict[str, Any] | None:
    """The merge patch that brings `live` status to `fields` plus the condition updates, holding only what
    differs; None when nothing does, so an idle service's status is not rewritten every tick. The only
    periodic write is `attainment.updatedAt`, refreshed once per `heartbeat_s` to show the loop is alive."""
    patch: dict[str, Any] = {}
    for key, value in fields.items():
        current = live.get(key)
        if key == "attainment" and isinstance(value, Mapping):
            stamp = parse_iso((current or {}).get("updatedAt")) if isinstance(current, Mapping) else None
            bare = {k: v for k, v in (current or {}).items() if k != "updatedAt"} if current else None
            if _pruned(value) != _pruned(bare) or stamp is None or now - stamp >= heartbeat_s:
                patch[key] = {**value, "updatedAt": iso(now)}
        elif _pruned(value) != _pruned(current):
            patch[key] = value
    if conditions:
        merged = set_conditions(live.get("conditions"), conditions, now, generation)
        if merged != list(live.get("conditions") or []):
            patch["conditions"] = merged
    return patch or None
