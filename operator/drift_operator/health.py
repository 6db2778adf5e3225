"""Are the metrics good enough to act on? (pure; the answer becomes the MetricsAvailable condition)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .attainment import WindowStats
from .times import iso

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class MetricsHealth:
    status: ConditionStatus
    reason: str
    message: str

    @property
    def usable(self) -> bool:
        """Only fresh, complete metrics may move replicas or the partition; anything else holds."""
        return self.status == "True"


def assess_metrics(
    *,
    now: float,
    last_success: float | None,
    ready_pods: int,
    scraped_pods: int,
    pods_with_counters: int,
    stats: WindowStats | None,
    stale_after_s: float,
    source_error: str | None = None,
) -> MetricsHealth:
    """Classify this tick's metrics.

    `last_success` is when metrics were last read successfully (any tick); `scraped_pods` and
    `pods_with_counters` describe this tick only.
    """
    if source_error is not None and (last_success is None or now - last_success > stale_after_s):
        return MetricsHealth("False", "MetricsMissing", source_error)
    if ready_pods == 0:
        return MetricsHealth("False", "MetricsMissing", "no ready agent pods to read metrics from")
    if scraped_pods > 0 and pods_with_counters == 0:
        return MetricsHealth("False", "MetricsMissing", "agents export no drift_slo_requests_total counters")
    if last_success is None:
        return MetricsHealth("False", "MetricsMissing", "no agent has answered /metrics yet")
    age = now - last_success
    if age > stale_after_s:
        return MetricsHealth(
            "False",
            "MetricsStale",
            # A time, not an age: a message that stays the same from tick to tick does not rewrite status.
            f"no successful metrics read for over {stale_after_s:.0f}s (last at {iso(last_success)})",
        )
    if source_error is not None:
        return MetricsHealth(
            "False", "MetricsStale", f"{source_error}; holding on data from {iso(last_success)}"
        )
    if scraped_pods * 2 < ready_pods:
        # Deciding on a minority of replicas would extrapolate from a biased sample.
        return MetricsHealth(
            "False", "MetricsPartial", f"only {scraped_pods} of {ready_pods} ready agents answered /metrics"
        )
    if stats is None:
        return MetricsHealth("Unknown", "WarmingUp", "collecting a second scrape to compute increases")
    return MetricsHealth(
        "True",
        "MetricsAvailable",
        # No durations or ages here: the message would change every tick and rewrite status.
        f"{stats.total_requests:.0f} requests from {stats.pods} pod(s) in the window",
    )
