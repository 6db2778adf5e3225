"""One reconciliation of an LLMService: children, then (on timer ticks) the SLO feedback loop.

This module does the I/O and sequencing; every judgement (rendering, diffing, attainment, health, scaling,
partition, conditions) is delegated to the pure modules. The result is a status patch plus the Kubernetes
Events to post, which the kopf handlers hand to kopf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import constants as c
from .agents import AgentClient, AgentError
from .attainment import SampleWindow, Scrape, WindowStats, window_stats
from .health import MetricsHealth, assess_metrics
from .kube import KubeApiError, KubeClient, object_path
from .metrics import MetricsParseError, PodSample, parse_agent_metrics
from .partition import PartitionDecision, decide_partition, desired_share
from .pods import PodView, pod_view, pods_to_push, runtime_state
from .prometheus import PrometheusError, read_window
from .reconcile import ApplyResult, apply_one, monitoring_available, reconcile_children
from .render import Owner, deployment_replicas, model_path, render_children
from .scaling import ScaleDecision, ScaleInputs, decide_scale
from .settings import OperatorConfig
from .sizing import CapacityEstimator, CapacityQuery
from .spec import LLMServiceSpec, SpecError, parse_spec, replicas_owner
from .status import (
    Condition,
    DeploymentState,
    append_decision,
    attainment_status,
    iso,
    parse_iso,
    set_conditions,
    slo_condition,
    workload_conditions,
)

logger = logging.getLogger(__name__)

# How long our own spec.replicas write may take to come back through the watch before a differing
# value is taken as someone else's newer write (e.g. `kubectl scale`).
_WRITE_GRACE_S = 10.0


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class ServiceMemory:
    """Per-LLMService state that lives in the operator's memory (kopf's per-object memo).

    Times also go to status, so a restarted operator keeps its cooldowns; the scrape window does not (a
    restarted operator waits one tick for a second scrape before it acts again).
    """

    window: SampleWindow = field(default_factory=SampleWindow)
    pushed: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_metrics_success: float | None = None
    last_scale_time: float | None = None
    last_partition_time: float | None = None
    headroom_since: float | None = None
    headroom_tracked: bool = False
    # spec.replicas we wrote, until a body showing it arrives: a tick may still see the old spec.
    replicas_written: tuple[int, float] | None = None

    def effective_replicas(self, observed: int, now: float) -> int:
        if self.replicas_written is None:
            return observed
        value, when = self.replicas_written
        if observed == value or now - when > _WRITE_GRACE_S:
            self.replicas_written = None
            return observed
        return value


@dataclass
class Context:
    """Operator-wide collaborators, shared by all LLMServices."""

    kube: KubeClient
    agents: AgentClient
    config: OperatorConfig = field(default_factory=OperatorConfig)
    # The simulator/performance-model hook for scale-out sizing (see sizing.py); None: observed throughput.
    estimator: CapacityEstimator | None = None
    clock: Callable[[], float] = time.time
    _monitoring: tuple[float, bool] | None = None

    async def monitoring_available(self) -> bool:
        now = self.clock()
        if self._monitoring is None or now - self._monitoring[0] > self.config.discovery_ttl_s:
            self._monitoring = (now, await monitoring_available(self.kube))
        return self._monitoring[1]


@dataclass
class Outcome:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    error: str | None = None  # an API failure worth a retry
    decisions: list[dict[str, Any]] = field(default_factory=list)  # made by this reconciliation


def _condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any]:
    return next((cond for cond in conditions if cond.get("type") == type_), {})


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _latest(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _labels_match(pod: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _model_label(spec: LLMServiceSpec) -> str:
    return spec.model.served_model_name or model_path(spec) or "embedded"


async def reconcile(
    ctx: Context, body: Mapping[str, Any], memory: ServiceMemory, *, run_loop: bool
) -> Outcome:
    meta = body.get("metadata") or {}
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid", "")
    generation = meta.get("generation")
    status_in = body.get("status") or {}
    conditions_in = status_in.get("conditions") or []
    now = ctx.clock()
    status: dict[str, Any] = {"observedGeneration": generation, "selector": c.selector_string(name)}
    events: list[Event] = []
    owner = Owner(name=name, namespace=namespace, uid=uid)

    try:
        spec = parse_spec(body.get("spec"))
        replicas = memory.effective_replicas(spec.replicas, now)
        if replicas != spec.replicas:
            spec = spec.model_copy(update={"replicas": replicas})
        owner_of = replicas_owner(spec, meta.get("annotations"))
        applied = await reconcile_children(
            ctx.kube,
            owner,
            spec,
            owner_of_replicas=owner_of,
            with_monitoring=await ctx.monitoring_available(),
        )
    except SpecError as exc:
        message = str(exc)
        old = _condition(conditions_in, "Ready")
        if old.get("reason") != "InvalidSpec" or old.get("message") != message:
            events.append(Event("Warning", "InvalidSpec", message))
        status["conditions"] = set_conditions(
            conditions_in,
            [
                Condition("Ready", "False", "InvalidSpec", message),
                Condition(
                    "Progressing", "False", "InvalidSpec", "nothing is rolled out until the spec is fixed"
                ),
            ],
            now,
            generation,
        )
        return Outcome(status, events)
    except KubeApiError as exc:
        message = f"applying children failed: {exc}"
        if _condition(conditions_in, "Ready").get("reason") != "ReconcileFailed":
            events.append(Event("Warning", "ReconcileFailed", message))
        status["conditions"] = set_conditions(
            conditions_in, [Condition("Ready", "False", "ReconcileFailed", message)], now, generation
        )
        return Outcome(status, events, error=message)

    events.extend(_child_events(applied, run_loop))
    deployment = DeploymentState.from_live(applied.deployment)
    status_partition = status_in.get("partition") or {}
    share = desired_share(spec, _float(status_partition.get("prefillSmShare")))
    status.update(
        replicas=deployment.replicas,
        readyReplicas=deployment.ready,
        model=_model_label(spec),
        policy=spec.policy,
        partition={"mode": spec.partition.mode, "prefillSmShare": share},
        scaling={"owner": owner_of, "desiredReplicas": deployment_replicas(spec, owner_of)},
    )
    updates = workload_conditions(deployment_replicas(spec, owner_of), deployment)

    decided: list[dict[str, Any]] = []
    if run_loop:
        try:
            updates = await _feedback(
                ctx, body, spec, owner, owner_of, applied, deployment, memory, status, events, decided
            )
        except KubeApiError as exc:
            # Listing pods or patching replicas failed: say so, keep the workload conditions, retry next tick.
            events.append(Event("Warning", "FeedbackLoopFailed", str(exc)))
            return Outcome(
                {**status, "conditions": set_conditions(conditions_in, updates, now, generation)},
                events,
                str(exc),
            )
    status["conditions"] = set_conditions(conditions_in, updates, now, generation)
    return Outcome(status, events, decisions=decided)


def _child_events(applied: ApplyResult, run_loop: bool) -> list[Event]:
    events = []
    for child, action in applied.actions.items():
        if action == "create":
            events.append(Event("Normal", "Created", f"created {child}"))
        elif action == "patch" and run_loop:
            # Between spec changes only a hand edit (or a lost update) makes a child differ.
            events.append(Event("Normal", "Restored", f"{child} differed from its rendered form; restored"))
        elif action == "delete":
            events.append(Event("Normal", "Deleted", f"deleted {child}"))
    return events


async def _scrape(ctx: Context, pod: PodView) -> PodSample | AgentError | MetricsParseError:
    try:
        return parse_agent_metrics(await ctx.agents.scrape(pod), pod.name, pod.uid)
    except (AgentError, MetricsParseError) as exc:
        return exc


async def _collect(
    ctx: Context, spec: LLMServiceSpec, namespace: str, name: str, memory: ServiceMemory, now: float
) -> tuple[list[PodView], dict[str, PodSample], WindowStats | None, MetricsHealth]:
    raw = await ctx.kube.list(object_path("v1", "pods", namespace), c.selector_string(name))
    selector = c.selector_labels(name)
    pods = [view for pod in raw if _labels_match(pod, selector) and (view := pod_view(pod)) is not None]
    ready = [pod for pod in pods if pod.ready]
    results = await asyncio.gather(*(_scrape(ctx, pod) for pod in ready))
    samples = {r.uid: r for r in results if isinstance(r, PodSample)}
    failures = [str(r) for r in results if not isinstance(r, PodSample)]
    if failures:
        logger.debug("scrape failures for %s/%s: %s", namespace, name, failures)
    window_s = spec.slo.window_seconds
    stale_after = float(spec.monitoring.stale_after_seconds)
    prometheus_url = spec.monitoring.prometheus_url or ctx.config.prometheus_url

    if prometheus_url:
        source_error: str | None = None
        stats: WindowStats | None = None
        try:
            stats, age = await read_window(
                ctx.agents.session(), prometheus_url, namespace, name, window_s, len(ready)
            )
            if stats is not None:
                seen = now - age if age is not None else now
                memory.last_metrics_success = _latest(memory.last_metrics_success, seen)
        except PrometheusError as exc:
            source_error = str(exc)
        health = assess_metrics(
            now=now,
            last_success=memory.last_metrics_success,
            ready_pods=len(ready),
            scraped_pods=len(ready),
            pods_with_counters=1 if stats is not None else 0,
            stats=stats,
            stale_after_s=stale_after,
            source_error=source_error,
        )
        return pods, samples, stats, health

    with_counters = sum(1 for s in samples.values() if s.has_slo_counters)
    if samples:
        memory.window.add(Scrape(now, samples), keep_seconds=window_s)
        if with_counters:
            memory.last_metrics_success = now
    stats = window_stats(list(memory.window.scrapes), now, window_s)
    health = assess_metrics(
        now=now,
        last_success=memory.last_metrics_success,
        ready_pods=len(ready),
        scraped_pods=len(samples),
        pods_with_counters=with_counters,
        stats=stats,
        stale_after_s=stale_after,
        source_error="no ready agent answered /metrics" if ready and not samples else None,
    )
    return pods, samples, stats, health


async def _feedback(
    ctx: Context,
    body: Mapping[str, Any],
    spec: LLMServiceSpec,
    owner: Owner,
    owner_of: str,
    applied: ApplyResult,
    deployment: DeploymentState,
    memory: ServiceMemory,
    status: dict[str, Any],
    events: list[Event],
    decided: list[dict[str, Any]],
) -> list[Condition]:
    now = ctx.clock()
    status_in = body.get("status") or {}
    conditions_in = status_in.get("conditions") or []
    pods, samples, stats, health = await _collect(ctx, spec, owner.namespace, owner.name, memory, now)

    # --- replicas ---------------------------------------------------------------------------------------
    scaling_in = status_in.get("scaling") or {}
    memory.last_scale_time = _latest(memory.last_scale_time, parse_iso(scaling_in.get("lastScaleTime")))
    headroom_since = (
        memory.headroom_since if memory.headroom_tracked else parse_iso(scaling_in.get("headroomSince"))
    )
    target = spec.slo.attainment_target
    share = status["partition"]["prefillSmShare"]
    query = CapacityQuery(
        replicas=spec.replicas,
        ready_replicas=deployment.ready,
        demand_rps=stats.demand_rps if stats else None,
        goodput_rps=stats.goodput_rps if stats else None,
        attainment=stats.overall if stats else None,
        target=target,
        policy=spec.policy,
        prefill_sm_share=share,
        ttft_ms=spec.slo.ttft_ms,
        tpot_ms=spec.slo.tpot_ms,
        gpus_per_replica=spec.resources.gpus_per_replica,
        model=model_path(spec),
    )
    scale = decide_scale(
        ScaleInputs(
            now=now,
            replicas=spec.replicas,
            ready_replicas=deployment.ready,
            owner=owner_of,  # type: ignore[arg-type]
            metrics=health,
            stats=stats,
            target=target,
            last_scale_time=memory.last_scale_time,
            headroom_since=headroom_since,
        ),
        spec.scaling,
        query,
        ctx.estimator,
    )
    memory.headroom_since, memory.headroom_tracked = scale.headroom_since, True
    decisions = list(status_in.get("lastDecisions") or [])
    decisions_changed = False
    if scale.changed:
        await _apply_scale(ctx, owner, spec, owner_of, scale)
        memory.last_scale_time = now
        memory.replicas_written = (scale.desired, now)
        decisions = append_decision(
            decisions, now=now, kind="Scale", before=str(scale.current), after=str(scale.desired),
            reason=scale.reason, message=scale.message,
        )  # fmt: skip
        decisions_changed = True
        verb = "ScaledOut" if scale.desired > scale.current else "ScaledIn"
        events.append(Event("Normal", verb, f"replicas {scale.current} -> {scale.desired}: {scale.message}"))

    # --- partition --------------------------------------------------------------------------------------
    partition_in = status_in.get("partition") or {}
    memory.last_partition_time = _latest(
        memory.last_partition_time, parse_iso(partition_in.get("lastChangeTime"))
    )
    part = decide_partition(
        spec, now=now, current=share, metrics=health, stats=stats, last_change_time=memory.last_partition_time
    )
    if part.changed:
        memory.last_partition_time = now
        decisions = append_decision(
            decisions, now=now, kind="Partition", before=f"{part.current:.2f}", after=f"{part.desired:.2f}",
            reason=part.reason, message=part.message,
        )  # fmt: skip
        decisions_changed = True
        events.append(Event("Normal", "PartitionShifted", part.message))
    events.extend(await _push_runtime_state(ctx, spec, part.desired, pods, samples, applied.token, memory))

    # --- status -----------------------------------------------------------------------------------------
    status["attainment"] = attainment_status(stats, target, spec.slo.window_seconds, now)
    status["partition"] = _partition_status(spec, part, memory)
    status["scaling"] = _scaling_status(owner_of, scale, memory, now)
    status["replicaStatus"] = _replica_status(pods, samples)
    if decisions_changed:
        status["lastDecisions"] = decisions
        decided.extend(decisions[-(int(scale.changed) + int(part.changed)) :])

    old_metrics = _condition(conditions_in, "MetricsAvailable")
    if health.status == "False" and old_metrics.get("reason") != health.reason:
        events.append(Event("Warning", health.reason, f"holding replicas and partition: {health.message}"))
    elif health.status == "True" and old_metrics.get("status") == "False":
        events.append(Event("Normal", "MetricsRecovered", health.message))

    desired = scale.desired if owner_of == "operator" else deployment_replicas(spec, owner_of)
    updates = workload_conditions(desired, deployment if not scale.changed else _unsettled(deployment))
    if scale.changed:
        updates[1] = Condition(
            "Progressing",
            "True",
            "ScalingOut" if scale.desired > scale.current else "ScalingIn",
            scale.message,
        )
    updates.append(Condition("MetricsAvailable", health.status, health.reason, health.message))
    updates.append(slo_condition(health, stats, target))
    return updates


def _unsettled(deployment: DeploymentState) -> DeploymentState:
    return DeploymentState(
        deployment.replicas, deployment.ready, deployment.updated, deployment.available, False
    )


async def _apply_scale(
    ctx: Context, owner: Owner, spec: LLMServiceSpec, owner_of: str, scale: ScaleDecision
) -> None:
    """Write the decision where an HPA would (spec.replicas), and converge the Deployment right away
    instead of waiting for the update event to come back."""
    path = object_path(c.API_VERSION, c.PLURAL, owner.namespace, owner.name)
    await ctx.kube.patch(path, {"spec": {"replicas": scale.desired}})
    scaled = spec.model_copy(update={"replicas": scale.desired})
    children = render_children(owner, scaled, owner_of, with_podmonitor=False)
    await apply_one(ctx.kube, children.deployment, {})


async def _push_runtime_state(
    ctx: Context,
    spec: LLMServiceSpec,
    share: float,
    pods: Sequence[PodView],
    samples: Mapping[str, PodSample],
    token: str | None,
    memory: ServiceMemory,
) -> list[Event]:
    """PUT /admin/policy to every ready pod that is not known to run the desired runtime state."""
    live_keys = {pod.push_key for pod in pods}
    for key in [k for k in memory.pushed if k not in live_keys]:
        del memory.pushed[key]
    if token is None:
        return []
    desired = runtime_state(spec, share)
    targets = pods_to_push(desired, pods, memory.pushed, samples)

    async def push(pod: PodView) -> AgentError | None:
        try:
            await ctx.agents.push_policy(pod, token, desired)
            return None
        except AgentError as exc:
            return exc

    events = []
    for pod, error in zip(targets, await asyncio.gather(*(push(p) for p in targets)), strict=True):
        if error is None:
            memory.pushed[pod.push_key] = desired
        elif 400 <= error.status < 500:
            # The agent refused this body (bad token, invalid value): retrying the same body cannot help.
            memory.pushed[pod.push_key] = desired
            events.append(Event("Warning", "AgentRejectedPolicy", str(error)))
        else:
            logger.info("policy push to %s failed, retrying next tick: %s", pod.name, error)
    return events


def _partition_status(spec: LLMServiceSpec, part: PartitionDecision, memory: ServiceMemory) -> dict[str, Any]:
    return {
        "mode": spec.partition.mode,
        "prefillSmShare": part.desired,
        "lastChangeTime": iso(memory.last_partition_time) if memory.last_partition_time else None,
        "lastEvaluation": {"action": part.action, "reason": part.reason, "message": part.message[:512]},
    }


def _scaling_status(owner_of: str, scale: ScaleDecision, memory: ServiceMemory, now: float) -> dict[str, Any]:
    return {
        "owner": owner_of,
        "desiredReplicas": scale.desired,
        "lastScaleTime": iso(memory.last_scale_time) if memory.last_scale_time else None,
        "headroomSince": iso(scale.headroom_since) if scale.headroom_since is not None else None,
        "lastEvaluation": {
            "time": iso(now),
            "action": scale.action,
            "reason": scale.reason,
            "message": scale.message[:512],
        },
    }


def _replica_status(pods: Sequence[PodView], samples: Mapping[str, PodSample]) -> list[dict[str, Any]]:
    out = []
    for pod in sorted(pods, key=lambda p: p.name)[: c.MAX_REPLICA_STATUS]:
        sample = samples.get(pod.uid)
        entry: dict[str, Any] = {"pod": pod.name, "ready": pod.ready, "metrics": sample is not None}
        if sample is not None:
            # List items are replaced whole by a merge patch, so unknown values are left out, not nulled.
            for key, value in (
                ("policy", sample.policy),
                ("prefillSmShare", sample.prefill_share),
                ("queueWaiting", sample.waiting),
                ("kvCacheUsage", sample.kv_usage),
            ):
                if value is not None:
                    entry[key] = round(value, 4) if isinstance(value, float) else value
        out.append(entry)
    return out


def memory_of(memo: Any) -> ServiceMemory:
    """The ServiceMemory inside kopf's per-object memo (created on first use)."""
    existing = memo.get("drift") if isinstance(memo, Mapping) else getattr(memo, "drift", None)
    if isinstance(existing, ServiceMemory):
        return existing
    created = ServiceMemory()
    if isinstance(memo, dict):
        memo["drift"] = created
    else:
        memo.drift = created
    return created


__all__ = ["Context", "Event", "Outcome", "ServiceMemory", "SpecError", "memory_of", "reconcile"]
