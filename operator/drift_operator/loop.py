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
from dataclasses import asdict, dataclass, field
from typing import Any

from . import constants as c
from .agents import AgentClient, AgentError
from .attainment import SampleWindow, Scrape, WindowStats, window_stats
from .health import MetricsHealth, assess_metrics
from .kube import KubeApiError, KubeClient, object_path
from .metrics import MetricsParseError, PodSample, parse_agent_metrics
from .partition import Steering, SteeringDecision, decide_steering, desired_steering
from .pods import PodView, pod_view, pods_to_push
from .prometheus import PrometheusError, empty_stats, no_series_message, read_window
from .reconcile import ApplyResult, apply_one, monitoring_available, reconcile_children
from .render import Owner, deployment_replicas, model_path, render_children, runtime_state
from .scaling import BOUNDS_REASONS, ScaleDecision, ScaleInputs, decide_scale, hold_scale
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
    router_status,
    slo_condition,
    status_patch,
    workload_conditions,
)

logger = logging.getLogger(__name__)

# How long our own spec.replicas write may take to come back through the watch before a differing
# value is taken as someone else's newer write (e.g. `kubectl scale`).
_WRITE_GRACE_S = 10.0
# An action that has not taken effect after this long (replicas that never become ready, an agent that never
# answers) stops holding decisions: the loop decides on what it sees from then on.
_EFFECT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class ServiceMemory:
    """Per-LLMService state that lives in the operator's memory (kopf's per-object memo).

    The loop is the only writer of what it steers: `steering` is the authority once set, and a handler that
    runs on a stale body cannot revert it. Times also go to status, so a restarted operator keeps its cooldowns
    and its steered values; the scrape window does not (a restarted operator waits for a second scrape).
    """

    window: SampleWindow = field(default_factory=SampleWindow)
    steering: Steering | None = None
    pushed: dict[str, dict[str, Any]] = field(default_factory=dict)  # push key -> state the agent accepted
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)  # push key -> state it refused (4xx)
    rejections: dict[str, str] = field(default_factory=dict)  # push key -> the agent's reason
    last_metrics_success: float | None = None
    last_scale_time: float | None = None
    last_partition_time: float | None = None
    headroom_since: float | None = None
    headroom_tracked: bool = False
    # spec.replicas we wrote, until a body showing it arrives: a tick may still see the old spec.
    replicas_written: tuple[int, float] | None = None
    # Decisions read only requests that finished after the last action took effect (a scale-out once its
    # replicas are ready, a steering change once every ready agent accepted it); None: no action yet.
    effective_since: float | None = None
    pending_scale: int | None = None
    pending_steering: bool = False
    # The decision log; the loop is its only writer (a stale body's copy must not drop a newer entry).
    decisions: list[dict[str, Any]] | None = None
    # kopf runs the spec handler and the timer of one object concurrently; both reconcile the children, so
    # they take turns (else both create a missing child, and a hand edit restored by the handler posts no
    # Restored event).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The generation whose children were last applied: a child differing after that is a hand edit.
    applied_generation: int | None = None

    def effective_replicas(self, observed: int, now: float) -> int:
        if self.replicas_written is None:
            return observed
        value, when = self.replicas_written
        if observed == value or now - when > _WRITE_GRACE_S:
            self.replicas_written = None
            return observed
        return value

    def steering_for(self, spec: LLMServiceSpec, status_partition: Mapping[str, Any]) -> Steering:
        """The steering to run now: our own value, or (first sight, e.g. after a restart) the one in status."""
        if self.steering is None:
            self.steering = desired_steering(spec, _steered_in_status(status_partition))
        else:
            self.steering = desired_steering(spec, asdict(self.steering))
        return self.steering


def _steered_in_status(partition: Mapping[str, Any]) -> dict[str, Any]:
    return {"prefill_sm_share": partition.get("prefillSmShare"), "tpot_margin": partition.get("tpotMargin")}


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
    status: dict[str, Any]  # status fields this reconciliation owns (None values remove a field)
    conditions: list[Condition] = field(default_factory=list)  # condition updates, merged by type
    events: list[Event] = field(default_factory=list)
    error: str | None = None  # an API failure worth a retry
    decisions: list[dict[str, Any]] = field(default_factory=list)  # made by this reconciliation


def _condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any]:
    return next((cond for cond in conditions if cond.get("type") == type_), {})


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
            logger.warning("%s/%s: invalid spec: %s", namespace, name, message)
        return Outcome(
            status,
            [
                Condition("Ready", "False", "InvalidSpec", message),
                Condition(
                    "Progressing", "False", "InvalidSpec", "nothing is rolled out until the spec is fixed"
                ),
            ],
            events,
        )
    except KubeApiError as exc:
        message = f"applying children failed: {_explain(exc, namespace)}"
        if _condition(conditions_in, "Ready").get("message") != message:
            events.append(Event("Warning", "ReconcileFailed", message))
            logger.warning("%s/%s: %s", namespace, name, message)
        return Outcome(
            status, [Condition("Ready", "False", "ReconcileFailed", message)], events, error=message
        )

    # Between spec changes only a hand edit (or a lost update) makes a child differ. kopf may run the spec
    # handler again on an unchanged spec (e.g. after a restart), so the generation tells, not the path.
    events.extend(_child_events(applied, restoring=run_loop or memory.applied_generation == generation))
    memory.applied_generation = generation
    deployment = DeploymentState.from_live(applied.deployment)
    status.update(
        replicas=deployment.replicas,
        readyReplicas=deployment.ready,
        model=_model_label(spec),
        policy=spec.policy,
    )
    status["router"], router_ready = router_status(
        spec.router_enabled, spec.router.policy, spec.router.replicas, applied.router_deployment
    )
    updates = [*workload_conditions(deployment_replicas(spec, owner_of), deployment), router_ready]
    if not run_loop:
        # The spec-change path writes only what follows from the spec and the children; the loop's fields
        # (partition, scaling, attainment, decisions) are left to the loop, their only writer.
        return Outcome(status, updates, events)

    decided: list[dict[str, Any]] = []
    try:
        updates = await _feedback(
            ctx, body, spec, owner, owner_of, applied, deployment, memory, status, events, decided
        )
    except KubeApiError as exc:
        # Listing pods or patching replicas failed: say so, keep the workload conditions, retry next tick.
        events.append(Event("Warning", "FeedbackLoopFailed", str(exc)))
        return Outcome(status, updates, events, str(exc))
    return Outcome(status, [*updates, router_ready], events, decisions=decided)


def _explain(exc: KubeApiError, namespace: str) -> str:
    """An API error as a user can act on it (a 403 names the permission to grant)."""
    if exc.status == 403:
        return (
            f"{exc} (the operator lacks a permission in namespace {namespace}; for Secrets, bind "
            f"ClusterRole drift-operator-secrets there: kubectl create rolebinding drift-operator-secrets "
            f"-n {namespace} --clusterrole=drift-operator-secrets "
            f"--serviceaccount=drift-system:drift-operator)"
        )
    return str(exc)


def _child_events(applied: ApplyResult, *, restoring: bool) -> list[Event]:
    events = []
    for child, action in applied.actions.items():
        if action == "create":
            events.append(Event("Normal", "Created", f"created {child}"))
        elif action == "patch" and restoring:
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
    ctx: Context,
    spec: LLMServiceSpec,
    namespace: str,
    name: str,
    memory: ServiceMemory,
    now: float,
    since: float | None,
) -> tuple[list[PodView], dict[str, PodSample], WindowStats | None, WindowStats | None, MetricsHealth]:
    """Pods, this tick's samples, the window's counts (shown in status), the counts of requests that finished
    after `since` within the window (what decisions read), and the metrics' health."""
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
    recent_s = window_s if since is None else max(0.0, min(window_s, now - since))

    if prometheus_url:
        source_error: str | None = None
        shown: WindowStats | None = None
        recent: WindowStats | None = None
        try:
            session = ctx.agents.session()
            shown, age = await read_window(session, prometheus_url, namespace, name, window_s, len(ready))
            if age is None:
                source_error = no_series_message(prometheus_url, namespace, name)
            else:
                memory.last_metrics_success = _latest(memory.last_metrics_success, now - age)
                shown = shown or empty_stats(window_s, len(ready))  # series exist, none in the window
                recent = shown
                if recent_s < window_s:
                    part, _ = await read_window(
                        session, prometheus_url, namespace, name, recent_s, len(ready)
                    )
                    recent = part or empty_stats(recent_s, len(ready))
        except PrometheusError as exc:
            source_error = str(exc)
        health = assess_metrics(
            now=now,
            last_success=memory.last_metrics_success,
            ready_pods=len(ready),
            scraped_pods=len(ready),
            pods_with_counters=len(ready) if shown is not None else 0,
            stats=shown,
            stale_after_s=stale_after,
            source_error=source_error,
        )
        return pods, samples, shown, recent, health

    with_counters = sum(1 for s in samples.values() if s.has_slo_counters)
    if samples:
        memory.window.add(Scrape(now, samples), keep_seconds=window_s)
        if with_counters:
            memory.last_metrics_success = now
    scrapes = list(memory.window.scrapes)
    shown = window_stats(scrapes, now, window_s)
    recent = window_stats(scrapes, now, window_s, since=since) if since is not None else shown
    health = assess_metrics(
        now=now,
        last_success=memory.last_metrics_success,
        ready_pods=len(ready),
        scraped_pods=len(samples),
        pods_with_counters=with_counters,
        stats=shown,
        stale_after_s=stale_after,
        source_error="no ready agent answered /metrics" if ready and not samples else None,
    )
    return pods, samples, shown, recent, health


def _settle(memory: ServiceMemory, deployment: DeploymentState, now: float) -> bool:
    """Mark the last action effective once it is (True while one is still taking effect)."""
    scaled = memory.pending_scale
    if (
        scaled is not None
        and deployment.observed_current
        and deployment.ready >= scaled == deployment.replicas
    ):
        memory.pending_scale = None
        memory.effective_since = now
    last_action = _latest(memory.last_scale_time, memory.last_partition_time)
    pending = memory.pending_scale is not None or memory.pending_steering
    if pending and last_action is not None and now - last_action > _EFFECT_TIMEOUT_S:
        logger.warning("the last action did not take effect in %.0fs; deciding again", _EFFECT_TIMEOUT_S)
        memory.pending_scale, memory.pending_steering = None, False
        memory.effective_since = now
        pending = False
    return pending


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
    scaling_in = status_in.get("scaling") or {}
    partition_in = status_in.get("partition") or {}
    memory.last_scale_time = _latest(memory.last_scale_time, parse_iso(scaling_in.get("lastScaleTime")))
    memory.last_partition_time = _latest(
        memory.last_partition_time, parse_iso(partition_in.get("lastChangeTime"))
    )
    if memory.effective_since is None:
        # After a restart: nothing before the last recorded action counts (its exact effect time is lost).
        memory.effective_since = _latest(memory.last_scale_time, memory.last_partition_time)
    settling = _settle(memory, deployment, now)
    pods, samples, shown, stats, health = await _collect(
        ctx, spec, owner.namespace, owner.name, memory, now, memory.effective_since
    )
    if not settling and health.usable and stats is None:
        settling = True  # a second scrape since the last action is needed before anything is counted
    steering = memory.steering_for(spec, partition_in)

    # --- replicas ---------------------------------------------------------------------------------------
    headroom_since = (
        memory.headroom_since if memory.headroom_tracked else parse_iso(scaling_in.get("headroomSince"))
    )
    target = spec.slo.attainment_target
    inputs = ScaleInputs(
        now=now,
        replicas=spec.replicas,
        ready_replicas=deployment.ready,
        owner=owner_of,  # type: ignore[arg-type]
        metrics=health,
        stats=stats,
        target=target,
        last_scale_time=memory.last_scale_time,
        headroom_since=headroom_since,
    )
    query = CapacityQuery(
        replicas=spec.replicas,
        ready_replicas=deployment.ready,
        demand_rps=stats.demand_rps if stats else None,
        goodput_rps=stats.goodput_rps if stats else None,
        attainment=stats.overall if stats else None,
        target=target,
        policy=spec.policy,
        prefill_sm_share=steering.prefill_sm_share,
        ttft_ms=spec.slo.ttft_ms,
        tpot_ms=spec.slo.tpot_ms,
        gpus_per_replica=spec.resources.gpus_per_replica,
        model=model_path(spec),
    )
    waiting = "the last action has not taken effect yet, or nothing was counted since it did"
    scale = decide_scale(inputs, spec.scaling, query, ctx.estimator)
    bounds = (
        scale.reason in BOUNDS_REASONS
    )  # kept whatever else is pending (e.g. `kubectl scale --replicas=0`)
    if settling and not bounds:
        scale = hold_scale(inputs, "WaitingForEffect", waiting)
    memory.headroom_since, memory.headroom_tracked = scale.headroom_since, True
    if memory.decisions is None:  # first sight (or a restart): the log so far is in status
        memory.decisions = list(status_in.get("lastDecisions") or [])
    decisions = memory.decisions
    decisions_changed = False
    if scale.changed:
        await _apply_scale(ctx, owner, spec, owner_of, scale)
        memory.last_scale_time = now
        memory.replicas_written = (scale.desired, now)
        if not bounds:  # a correction into the bounds is not an SLO action whose effect decisions await
            memory.pending_scale = scale.desired
        decisions = append_decision(
            decisions, now=now, kind="Scale", before=str(scale.current), after=str(scale.desired),
            reason=scale.reason, message=scale.message,
        )  # fmt: skip
        decisions_changed = True
        verb = "ScaledOut" if scale.desired > scale.current else "ScaledIn"
        events.append(Event("Normal", verb, f"replicas {scale.current} -> {scale.desired}: {scale.message}"))
        logger.info("%s/%s: %s: %s", owner.namespace, owner.name, verb, scale.message)

    # --- steering ---------------------------------------------------------------------------------------
    if settling:
        part = SteeringDecision("hold", spec.steered_setting, steering, steering, "WaitingForEffect", waiting)
    else:
        part = decide_steering(
            spec,
            now=now,
            current=steering,
            metrics=health,
            stats=stats,
            last_change_time=memory.last_partition_time,
        )
    if part.changed:
        memory.steering = part.desired
        memory.last_partition_time = now
        memory.pending_steering = True
        before, after = part.values()
        decisions = append_decision(
            decisions, now=now, kind="Partition", before=before, after=after,
            reason=part.reason, message=part.message,
        )  # fmt: skip
        decisions_changed = True
        events.append(Event("Normal", "PartitionShifted", part.message))
        logger.info("%s/%s: PartitionShifted: %s", owner.namespace, owner.name, part.message)
    push_events, agents = await _push_runtime_state(
        ctx, spec, part.desired, pods, samples, applied.token, memory, now
    )
    events.extend(push_events)

    # --- status -----------------------------------------------------------------------------------------
    status["attainment"] = attainment_status(shown, target, spec.slo.window_seconds)
    status["partition"] = _partition_status(spec, part.desired, memory, part)
    status["scaling"] = _scaling_status(owner_of, scale, memory)
    status["replicaStatus"] = _replica_status(pods, samples)
    if decisions_changed:
        memory.decisions = decisions
        decided.extend(decisions[-(int(scale.changed) + int(part.changed)) :])
    status["lastDecisions"] = memory.decisions or None

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
    updates.append(slo_condition(health, shown, target))
    updates.append(agents)
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
    steering: Steering,
    pods: Sequence[PodView],
    samples: Mapping[str, PodSample],
    token: str | None,
    memory: ServiceMemory,
    now: float,
) -> tuple[list[Event], Condition]:
    """PUT /admin/policy to every ready pod not known to run the desired runtime state; the condition says
    whether every ready agent runs it. A refused body (4xx) is not sent again until the desired state changes
    or the pod restarts: the condition and one Warning event say why."""
    live_keys = {pod.push_key for pod in pods}
    for table in (memory.pushed, memory.rejected, memory.rejections):
        for key in [k for k in table if k not in live_keys]:
            del table[key]
    desired = runtime_state(spec, steering)
    targets = [] if token is None else pods_to_push(desired, pods, memory.pushed, memory.rejected, samples)

    async def push(pod: PodView) -> AgentError | None:
        try:
            await ctx.agents.push_policy(pod, token or "", desired)
            return None
        except AgentError as exc:
            return exc

    events = []
    for pod, error in zip(targets, await asyncio.gather(*(push(p) for p in targets)), strict=True):
        if error is None:
            memory.pushed[pod.push_key] = desired
            memory.rejected.pop(pod.push_key, None)
            memory.rejections.pop(pod.push_key, None)
        elif 400 <= error.status < 500:
            memory.rejected[pod.push_key] = desired
            memory.rejections[pod.push_key] = str(error)
            events.append(Event("Warning", "AgentRejectedPolicy", str(error)))
            logger.warning("agent refused the runtime policy, not retrying it: %s", error)
        else:
            logger.info("policy push to %s failed, retrying next tick: %s", pod.name, error)

    ready = [pod for pod in pods if pod.ready]
    refused = [memory.rejections[p.push_key] for p in ready if memory.rejected.get(p.push_key) == desired]
    running = sum(1 for p in ready if memory.pushed.get(p.push_key) == desired)
    if memory.pending_steering and running + len(refused) == len(ready):
        memory.pending_steering = False
        memory.effective_since = now
    if not ready:
        return events, Condition(
            "AgentsConfigured", "Unknown", "NoReadyAgents", "no ready agent to configure"
        )
    if refused:
        return events, Condition(
            "AgentsConfigured",
            "False",
            "AgentRejectedPolicy",
            f"{len(refused)}/{len(ready)} ready agents refused the runtime policy: {refused[0]}",
        )
    if running < len(ready):
        return events, Condition(
            "AgentsConfigured",
            "False",
            "AgentsUnreachable",
            f"{running}/{len(ready)} ready agents run the runtime policy; retrying the rest",
        )
    return events, Condition(
        "AgentsConfigured", "True", "Applied", f"{running}/{len(ready)} ready agents run the runtime policy"
    )


def _partition_status(
    spec: LLMServiceSpec, steering: Steering, memory: ServiceMemory, part: SteeringDecision | None
) -> dict[str, Any]:
    """status.partition: only the settings that mean something for the policy and mode (a prefill share
    under `partition.mode: off`, or a TPOT margin under a fixed split, would mislead)."""
    fixed_split = spec.policy == "static-split" or spec.partition.mode == "static"
    out: dict[str, Any] = {
        "mode": spec.partition.mode,
        "steered": spec.steered_setting,
        "prefillSmShare": steering.prefill_sm_share if spec.runs_partition and fixed_split else None,
        "tpotMargin": steering.tpot_margin
        if spec.policy == "drift" and spec.partition.mode == "auto"
        else None,
        "lastChangeTime": iso(memory.last_partition_time) if memory.last_partition_time else None,
    }
    if part is not None:
        out["lastEvaluation"] = {"action": part.action, "reason": part.reason, "message": part.message[:512]}
    return out


def _scaling_status(owner_of: str, scale: ScaleDecision, memory: ServiceMemory) -> dict[str, Any]:
    # No evaluation time: it would change every tick and make an idle service's status churn.
    return {
        "owner": owner_of,
        "desiredReplicas": scale.desired,
        "lastScaleTime": iso(memory.last_scale_time) if memory.last_scale_time else None,
        "headroomSince": iso(scale.headroom_since) if scale.headroom_since is not None else None,
        "lastEvaluation": {"action": scale.action, "reason": scale.reason, "message": scale.message[:512]},
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


async def publish_status(ctx: Context, body: Mapping[str, Any], outcome: Outcome) -> None:
    """Write the outcome's status fields and conditions, only where they differ from the live status, with
    optimistic concurrency: the patch carries the resourceVersion it was computed against. On a conflict the
    object is read again; if its spec moved on (another generation), this outcome is stale and is dropped (the
    reconciliation of the new spec writes instead), else the difference is recomputed and written."""
    meta = body.get("metadata") or {}
    name, namespace = meta["name"], meta["namespace"]
    generation = meta.get("generation")
    item = object_path(c.API_VERSION, c.PLURAL, namespace, name)
    live: Mapping[str, Any] | None = body
    for _ in range(3):
        assert live is not None
        patch = status_patch(
            live.get("status") or {},
            outcome.status,
            outcome.conditions,
            now=ctx.clock(),
            generation=generation,
            heartbeat_s=ctx.config.status_heartbeat_s,
        )
        if patch is None:
            return
        version = (live.get("metadata") or {}).get("resourceVersion")
        try:
            await ctx.kube.patch(
                f"{item}/status", {"metadata": {"resourceVersion": version}, "status": patch}
            )
            return
        except KubeApiError as exc:
            if exc.status != 409:
                raise
        live = await ctx.kube.get(item)
        if live is None or (live.get("metadata") or {}).get("generation") != generation:
            return
    logger.info("%s/%s: status kept conflicting; written on the next reconciliation", namespace, name)


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
