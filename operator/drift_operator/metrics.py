"""Parse one agent's Prometheus exposition into the numbers the loop needs (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

SLO_COUNTER = "drift_slo_requests_total"
PARTITION_GAUGE = "drift_partition_sm_share"  # the split the dispatcher chose last (per step)
CONFIG_GAUGE = "drift_partition_config"  # configured runtime settings, by `setting`
POLICY_INFO = "drift_policy_info"
WAITING_GAUGE = "vllm:num_requests_waiting"
RUNNING_GAUGE = "vllm:num_requests_running"
KV_USAGE_GAUGE = "vllm:kv_cache_usage_perc"

PHASES = ("ttft", "tpot", "both")
OUTCOMES = ("met", "missed")

CounterKey = tuple[str, str]  # (phase, outcome)


class MetricsParseError(ValueError):
    """The /metrics body is not Prometheus text."""


@dataclass(frozen=True)
class PodSample:
    """What one scrape of one agent said."""

    pod: str
    uid: str
    counts: Mapping[CounterKey, float] = field(default_factory=dict)
    prefill_share: float | None = None
    policy: str | None = None
    configured: Mapping[str, float] = field(default_factory=dict)  # drift_partition_config by setting
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None

    @property
    def has_slo_counters(self) -> bool:
        return bool(self.counts)


def parse_agent_metrics(text: str, pod: str, uid: str) -> PodSample:
    counts: dict[CounterKey, float] = {}
    gauges: dict[str, float] = {}
    prefill_share: float | None = None
    policy: str | None = None
    configured: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsParseError(f"{pod}: unparsable /metrics: {exc}") from exc
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == SLO_COUNTER:
                phase, outcome = labels.get("phase"), labels.get("outcome")
                if phase in PHASES and outcome in OUTCOMES:
                    # Summed over any other labels (e.g. model_name), so several served names add up.
                    counts[(phase, outcome)] = counts.get((phase, outcome), 0.0) + value
            elif name == PARTITION_GAUGE and labels.get("phase") == "prefill":
                prefill_share = value
            elif name == PARTITION_GAUGE and labels.get("phase") == "decode" and prefill_share is None:
                prefill_share = 1.0 - value
            elif name == CONFIG_GAUGE and "setting" in labels:
                configured[labels["setting"]] = value
            elif name == POLICY_INFO and value >= 1.0 and "policy" in labels:
                policy = labels["policy"]
            elif name in (WAITING_GAUGE, RUNNING_GAUGE, KV_USAGE_GAUGE):
                gauges[name] = gauges.get(name, 0.0) + value
    return PodSample(
        pod=pod,
        uid=uid,
        counts=counts,
        prefill_share=prefill_share,
        policy=policy,
        configured=configured,
        waiting=gauges.get(WAITING_GAUGE),
        running=gauges.get(RUNNING_GAUGE),
        kv_usage=gauges.get(KV_USAGE_GAUGE),
    )
