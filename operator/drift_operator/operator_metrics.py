"""The operator's own Prometheus metrics: what the loop saw and decided, per LLMService.

Agents export raw counters; these gauges add the operator's view (target, desired replicas, steered split),
which the dashboard and the PrometheusRule alerts compare against. Served on $DRIFT_OPERATOR_METRICS_PORT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()
_LABELS = ("namespace", "llmservice")

ATTAINMENT = Gauge(
    "drift_operator_slo_attainment",
    "SLO attainment over the LLMService's window, as computed by the operator",
    [*_LABELS, "phase"],
    registry=REGISTRY,
)
TARGET = Gauge(
    "drift_operator_slo_attainment_target", "spec.slo.attainmentTarget", _LABELS, registry=REGISTRY
)
DESIRED = Gauge(
    "drift_operator_desired_replicas", "Replicas the LLMService should run", _LABELS, registry=REGISTRY
)
READY = Gauge("drift_operator_ready_replicas", "Ready agent replicas", _LABELS, registry=REGISTRY)
SHARE = Gauge(
    "drift_operator_prefill_sm_share", "Prefill SM share the operator steers to", _LABELS, registry=REGISTRY
)
MARGIN = Gauge(
    "drift_operator_tpot_margin", "drift's TPOT margin the operator steers to", _LABELS, registry=REGISTRY
)
METRICS_OK = Gauge(
    "drift_operator_metrics_available",
    "1 when metrics are fresh enough to act on",
    _LABELS,
    registry=REGISTRY,
)
DECISIONS = Counter(
    "drift_operator_decisions",
    "Scaling and partition decisions",
    [*_LABELS, "type", "reason"],
    registry=REGISTRY,
)


def observe(
    namespace: str, name: str, status: Mapping[str, Any], new_decisions: Sequence[Mapping[str, Any]]
) -> None:
    """Mirror one reconciliation's status into the gauges."""
    labels = {"namespace": namespace, "llmservice": name}
    attainment = status.get("attainment") or {}
    for phase in ("ttft", "tpot", "both"):
        value = attainment.get(phase)
        if isinstance(value, int | float):
            ATTAINMENT.labels(**labels, phase=phase).set(value)
        else:
            _remove(ATTAINMENT, namespace, name, phase)
    if isinstance(attainment.get("target"), int | float):
        TARGET.labels(**labels).set(attainment["target"])
    scaling = status.get("scaling") or {}
    if isinstance(scaling.get("desiredReplicas"), int):
        DESIRED.labels(**labels).set(scaling["desiredReplicas"])
    if isinstance(status.get("readyReplicas"), int):
        READY.labels(**labels).set(status["readyReplicas"])
    partition = status.get("partition") or {}
    for gauge, key in ((SHARE, "prefillSmShare"), (MARGIN, "tpotMargin")):
        value = partition.get(key)
        if isinstance(value, int | float):
            gauge.labels(**labels).set(value)
        else:
            _remove(gauge, namespace, name)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "MetricsAvailable":
            METRICS_OK.labels(**labels).set(1.0 if cond.get("status") == "True" else 0.0)
    for decision in new_decisions:
        DECISIONS.labels(**labels, type=decision.get("type", ""), reason=decision.get("reason", "")).inc()


def _remove(metric: Gauge, *labelvalues: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labelvalues)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted LLMService's series so dashboards do not show it forever."""
    for gauge in (TARGET, DESIRED, READY, SHARE, MARGIN, METRICS_OK):
        _remove(gauge, namespace, name)
    for phase in ("ttft", "tpot", "both"):
        _remove(ATTAINMENT, namespace, name, phase)
