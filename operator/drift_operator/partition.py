"""The steering decision (pure): which way the SLO loop tilts the agents between prefill and decode.

TTFT misses mean prefill is starved, TPOT misses mean decode is. What is moved depends on the policy
(`LLMServiceSpec.steered_setting`): `static-split` runs one fixed SM split, so its prefill share moves toward
the lagging phase; `drift` picks the split every step from the decode budget, so the loop moves its internal
TPOT margin instead (up gives decode more SMs and folds fewer prompts into decode steps; down gives prefill
more). A shift happens only when the other phase has slack (or is clearly less behind), one step at a time,
within bounds, and not more often than the partition cooldown, so the setting cannot oscillate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .attainment import WindowStats
from .health import MetricsHealth
from .spec import LLMServiceSpec, SteeredSetting

# Both phases missing: shift only if one is clearly worse, else replicas (not the split) must fix it.
_BOTH_MISS_MARGIN = 0.05
_EPS = 1e-9


@dataclass(frozen=True)
class Steering:
    """The runtime settings the loop steers on every agent (status.partition keeps them across restarts)."""

    prefill_sm_share: float
    tpot_margin: float

    def get(self, setting: SteeredSetting) -> float:
        return self.prefill_sm_share if setting == "prefill_sm_share" else self.tpot_margin

    def with_value(self, setting: SteeredSetting, value: float) -> Steering:
        return replace(self, **{setting: round(value, 4)})


def _bounds(spec: LLMServiceSpec, setting: SteeredSetting) -> tuple[float, float]:
    p = spec.partition
    if setting == "prefill_sm_share":
        return p.min_prefill_sm_share, p.max_prefill_sm_share
    return p.min_tpot_margin, p.max_tpot_margin


def desired_steering(spec: LLMServiceSpec, steered: Mapping[str, Any] | None) -> Steering:
    """What the agents should run now: the spec's values, except the steered setting, which keeps the value
    the loop moved it to (`steered`, e.g. from status) clamped into its bounds."""
    base = Steering(spec.partition.prefill_sm_share, spec.partition.tpot_margin)
    setting = spec.steered_setting
    value = (steered or {}).get(setting) if setting else None
    if setting is None or not isinstance(value, int | float) or isinstance(value, bool):
        return base
    lo, hi = _bounds(spec, setting)
    return base.with_value(setting, min(hi, max(lo, float(value))))


@dataclass(frozen=True)
class SteeringDecision:
    action: Literal["shift", "hold"]
    setting: SteeredSetting | None
    current: Steering
    desired: Steering
    reason: str
    message: str

    @property
    def changed(self) -> bool:
        return (
            self.setting is not None
            and abs(self.desired.get(self.setting) - self.current.get(self.setting)) > _EPS
        )

    def values(self) -> tuple[str, str]:
        """(before, after) of the steered setting, for the decision log."""
        if self.setting is None:
            return "", ""
        return f"{self.current.get(self.setting):.2f}", f"{self.desired.get(self.setting):.2f}"


def decide_steering(
    spec: LLMServiceSpec,
    *,
    now: float,
    current: Steering,
    metrics: MetricsHealth,
    stats: WindowStats | None,
    last_change_time: float | None,
) -> SteeringDecision:
    setting = spec.steered_setting

    def hold(reason: str, message: str) -> SteeringDecision:
        return SteeringDecision("hold", setting, current, current, reason, message)

    if setting is None:
        why = (
            f"policy {spec.policy}"
            if spec.partition.mode == "auto"
            else f"partition mode {spec.partition.mode}"
        )
        return hold("NotSteerable", f"{why}: nothing is steered")
    if not metrics.usable or stats is None:
        return hold(metrics.reason, metrics.message)
    if stats.total_requests < max(1, spec.scaling.min_requests):
        return hold(
            "InsufficientTraffic", f"{stats.total_requests:.0f} requests since the last change took effect"
        )
    if last_change_time is not None and now - last_change_time < spec.partition.cooldown_seconds:
        return hold("PartitionCooldown", f"last shift {now - last_change_time:.0f}s ago")

    target = spec.slo.attainment_target
    ttft, tpot = stats.attainment("ttft"), stats.attainment("tpot")
    if ttft is None or tpot is None:
        return hold("InsufficientTraffic", "no per-phase attainment yet")
    ttft_deficit, tpot_deficit = target - ttft, target - tpot
    if ttft_deficit > 0 and (tpot_deficit <= 0 or ttft_deficit - tpot_deficit > _BOTH_MISS_MARGIN):
        toward, reason = "prefill", "TTFTViolated"
    elif tpot_deficit > 0 and (ttft_deficit <= 0 or tpot_deficit - ttft_deficit > _BOTH_MISS_MARGIN):
        toward, reason = "decode", "TPOTViolated"
    elif ttft_deficit > 0 and tpot_deficit > 0:
        return hold(
            "BothViolated", f"TTFT {ttft:.3f} and TPOT {tpot:.3f} both below {target}; scaling instead"
        )
    else:
        return hold("SLOMet", f"TTFT {ttft:.3f}, TPOT {tpot:.3f} >= {target}")

    if setting == "prefill_sm_share":
        step, up_is = spec.partition.step, "prefill"
        what = "prefill SM share"
    else:
        step, up_is = spec.partition.margin_step, "decode"
        what = "TPOT margin"
    direction = 1.0 if toward == up_is else -1.0
    lo, hi = _bounds(spec, setting)
    before = current.get(setting)
    after = round(min(hi, max(lo, before + direction * step)), 4)
    if abs(after - before) <= _EPS:
        return hold("AtPartitionBound", f"{reason} but the {what} is already at {before:.2f}")
    return SteeringDecision(
        "shift",
        setting,
        current,
        current.with_value(setting, after),
        reason,
        f"TTFT {ttft:.3f}, TPOT {tpot:.3f} vs target {target}: toward {toward} "
        f"({what} {before:.2f} -> {after:.2f})",
    )
