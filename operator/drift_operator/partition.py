"""The prefill/decode SM-split decision (pure).

TTFT misses mean prefill is starved, so prefill gets more SMs; TPOT misses mean decode is starved, so decode
gets more. A shift happens only when the other phase has slack (or is clearly less behind), one step at a
time, within bounds, and not more often than the partition cooldown, so the split cannot oscillate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .attainment import WindowStats
from .health import MetricsHealth
from .spec import LLMServiceSpec

# Both phases missing: shift only if one is clearly worse, else replicas (not the split) must fix it.
_BOTH_MISS_MARGIN = 0.05
_EPS = 1e-9


@dataclass(frozen=True)
class PartitionDecision:
    action: Literal["shift", "hold"]
    current: float
    desired: float
    reason: str
    message: str

    @property
    def changed(self) -> bool:
        return abs(self.desired - self.current) > _EPS


def desired_share(spec: LLMServiceSpec, current: float | None) -> float:
    """The share agents should run now: the fixed one for static mode, else the steered one (or the start)."""
    if spec.partition.mode == "static" or current is None:
        return spec.partition.prefill_sm_share
    lo, hi = spec.partition.min_prefill_sm_share, spec.partition.max_prefill_sm_share
    return min(hi, max(lo, current))


def decide_partition(
    spec: LLMServiceSpec,
    *,
    now: float,
    current: float,
    metrics: MetricsHealth,
    stats: WindowStats | None,
    last_change_time: float | None,
) -> PartitionDecision:
    def hold(reason: str, message: str) -> PartitionDecision:
        return PartitionDecision("hold", current, current, reason, message)

    if not spec.partition_steerable:
        why = (
            f"policy {spec.policy}"
            if spec.partition.mode == "auto"
            else f"partition mode {spec.partition.mode}"
        )
        return hold("NotSteerable", f"{why}: the split is not steered")
    if not metrics.usable or stats is None:
        return hold(metrics.reason, metrics.message)
    if stats.total_requests < max(1, spec.scaling.min_requests):
        return hold("InsufficientTraffic", f"{stats.total_requests:.0f} requests in the window")
    if last_change_time is not None and now - last_change_time < spec.partition.cooldown_seconds:
        return hold("PartitionCooldown", f"last shift {now - last_change_time:.0f}s ago")

    target = spec.slo.attainment_target
    ttft, tpot = stats.attainment("ttft"), stats.attainment("tpot")
    if ttft is None or tpot is None:
        return hold("InsufficientTraffic", "no per-phase attainment yet")
    ttft_deficit, tpot_deficit = target - ttft, target - tpot
    step = spec.partition.step
    if ttft_deficit > 0 and (tpot_deficit <= 0 or ttft_deficit - tpot_deficit > _BOTH_MISS_MARGIN):
        direction, reason = 1.0, "TTFTViolated"
    elif tpot_deficit > 0 and (ttft_deficit <= 0 or tpot_deficit - ttft_deficit > _BOTH_MISS_MARGIN):
        direction, reason = -1.0, "TPOTViolated"
    elif ttft_deficit > 0 and tpot_deficit > 0:
        return hold(
            "BothViolated", f"TTFT {ttft:.3f} and TPOT {tpot:.3f} both below {target}; scaling instead"
        )
    else:
        return hold("SLOMet", f"TTFT {ttft:.3f}, TPOT {tpot:.3f} >= {target}")

    lo, hi = spec.partition.min_prefill_sm_share, spec.partition.max_prefill_sm_share
    desired = round(min(hi, max(lo, current + direction * step)), 4)
    if abs(desired - current) <= _EPS:
        return hold("AtPartitionBound", f"{reason} but prefill share already at {current:.2f}")
    phase = "prefill" if direction > 0 else "decode"
    return PartitionDecision(
        "shift",
        current,
        desired,
        reason,
        f"TTFT {ttft:.3f}, TPOT {tpot:.3f} vs target {target}: more SMs to {phase} "
        f"({current:.2f} -> {desired:.2f} prefill)",
    )
