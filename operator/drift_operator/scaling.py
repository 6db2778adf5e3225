"""The replica decision (pure): scale out on SLO violation, in only on sustained headroom, else hold.

Guards, in order: an external autoscaler owns replicas; the replica bounds; usable metrics; a rollout in
progress; enough traffic to trust the attainment; cooldowns. Missing or stale metrics always hold, so a
broken metrics path can never walk the service down to its minimum, let alone to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .attainment import WindowStats
from .health import MetricsHealth
from .sizing import CapacityEstimator, CapacityQuery, size_scale_in, size_scale_out
from .spec import ScalingSpec

ScaleAction = Literal["scale-out", "scale-in", "hold"]

# Decisions that only move spec.replicas back into [minReplicas, maxReplicas].
BOUNDS_REASONS = ("BelowMinReplicas", "AboveMaxReplicas")
# A queue this deep per replica means the replicas are busy, whatever the attainment says.
_MAX_QUEUE_FOR_SCALE_IN = 1.0


@dataclass(frozen=True)
class ScaleInputs:
    now: float
    replicas: int  # spec.replicas, the current decision
    ready_replicas: int
    owner: Literal["operator", "external"]
    metrics: MetricsHealth
    stats: WindowStats | None
    target: float
    last_scale_time: float | None
    headroom_since: float | None


@dataclass(frozen=True)
class ScaleDecision:
    action: ScaleAction
    current: int
    desired: int
    reason: str
    message: str
    headroom_since: float | None = None

    @property
    def changed(self) -> bool:
        return self.desired != self.current


def hold_scale(
    inputs: ScaleInputs, reason: str, message: str, headroom_since: float | None = None
) -> ScaleDecision:
    return ScaleDecision("hold", inputs.replicas, inputs.replicas, reason, message, headroom_since)


def decide_scale(
    inputs: ScaleInputs,
    scaling: ScalingSpec,
    query: CapacityQuery,
    estimator: CapacityEstimator | None = None,
) -> ScaleDecision:
    n = inputs.replicas
    if inputs.owner == "external":
        return hold_scale(
            inputs, "ExternalAutoscaler", "an HPA/KEDA owns spec.replicas; only the partition is steered"
        )
    if n < scaling.min_replicas:
        return ScaleDecision(
            "scale-out",
            n,
            scaling.min_replicas,
            "BelowMinReplicas",
            f"{n} < minReplicas {scaling.min_replicas}",
        )
    if n > scaling.max_replicas:
        return ScaleDecision(
            "scale-in",
            n,
            scaling.max_replicas,
            "AboveMaxReplicas",
            f"{n} > maxReplicas {scaling.max_replicas}",
        )
    if not inputs.metrics.usable or inputs.stats is None:
        return hold_scale(inputs, inputs.metrics.reason, f"holding at {n}: {inputs.metrics.message}")
    if inputs.ready_replicas < n:
        return hold_scale(inputs, "RolloutInProgress", f"{inputs.ready_replicas}/{n} replicas ready; waiting")

    stats = inputs.stats
    since_scale = inputs.now - inputs.last_scale_time if inputs.last_scale_time is not None else float("inf")
    idle = stats.total_requests == 0
    attainment = stats.overall
    if not idle and stats.total_requests < scaling.min_requests:
        return hold_scale(
            inputs,
            "InsufficientTraffic",
            f"{stats.total_requests:.0f} requests in the window (< minRequests {scaling.min_requests})",
        )

    if not idle and attainment is not None and attainment < inputs.target:
        if n >= scaling.max_replicas:
            return hold_scale(
                inputs, "AtMaxReplicas", f"attainment {attainment:.3f} < {inputs.target}, at maxReplicas"
            )
        if since_scale < scaling.scale_up_cooldown_seconds:
            return hold_scale(inputs, "ScaleUpCooldown", f"last scaling {since_scale:.0f}s ago")
        sizing = size_scale_out(
            query, max_step=scaling.max_step, max_replicas=scaling.max_replicas, estimator=estimator
        )
        return ScaleDecision(
            "scale-out",
            n,
            sizing.desired,
            "SLOViolated",
            f"attainment {attainment:.3f} < target {inputs.target}; sized by {sizing.describe()}",
        )

    if idle or (attainment is not None and attainment >= min(1.0, inputs.target + scaling.headroom)):
        since = inputs.headroom_since if inputs.headroom_since is not None else inputs.now
        what = "no traffic" if idle else f"attainment {attainment:.3f} >= target+headroom"
        if n <= scaling.min_replicas:
            return hold_scale(inputs, "AtMinReplicas", f"{what}, at minReplicas", since)
        if inputs.now - since < scaling.scale_down_stabilization_seconds:
            return hold_scale(inputs, "HeadroomNotSustained", f"{what} for {inputs.now - since:.0f}s", since)
        if since_scale < scaling.scale_down_cooldown_seconds:
            return hold_scale(inputs, "ScaleDownCooldown", f"last scaling {since_scale:.0f}s ago", since)
        if stats.queue_waiting is not None and stats.queue_waiting > _MAX_QUEUE_FOR_SCALE_IN:
            return hold_scale(
                inputs, "QueueNotEmpty", f"{stats.queue_waiting:.1f} requests waiting per replica", since
            )
        sizing = size_scale_in(
            query,
            max_step=scaling.max_scale_down_step,
            min_replicas=scaling.min_replicas,
            estimator=estimator,
        )
        if sizing.desired >= n:
            return hold_scale(inputs, "CapacityNeeded", f"{what}, but {sizing.describe()} needs {n}", since)
        # The clock restarts: the smaller service must show headroom anew before the next step down.
        return ScaleDecision(
            "scale-in",
            n,
            sizing.desired,
            "Idle" if idle else "SustainedHeadroom",
            f"{what}; {sizing.describe()}",
        )

    return hold_scale(inputs, "WithinTarget", f"attainment {attainment:.3f} within [target, target+headroom)")
