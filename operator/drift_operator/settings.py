"""Operator-wide settings from the environment (the operator Deployment sets them; `drift operator` flags too)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    # Seconds between feedback-loop ticks (one metrics scrape = one sample of the attainment window).
    loop_interval_s: float = 15.0
    # Default Prometheus for every LLMService without spec.monitoring.prometheusUrl; None: scrape agents.
    prometheus_url: str | None = None
    # Per-request timeout for agent /metrics scrapes and /admin/policy pushes.
    agent_timeout_s: float = 3.0
    # How long a Prometheus Operator discovery answer is trusted before asking again.
    discovery_ttl_s: float = 60.0
    # Port for the operator's own /metrics (operator_metrics.py); None: not served.
    metrics_port: int | None = None
    # Namespaces given explicitly (`drift operator -n`): kopf needs no namespace scanning, which the shipped
    # RBAC does not grant (without this kopf retries the 403 for about a minute before serving).
    namespaced: bool = False
    # status is written only when it changes, and status.attainment.updatedAt at least this often.
    status_heartbeat_s: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env

        def number(key: str, default: float, zero_ok: bool = False) -> float:
            raw = env.get(key)
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError as exc:
                raise ValueError(f"{key}={raw!r} is not a number") from exc
            if value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"{key} must be positive" + (" or 0" if zero_ok else ""))
            return value

        return cls(
            loop_interval_s=number("DRIFT_OPERATOR_LOOP_INTERVAL", cls.loop_interval_s),
            prometheus_url=env.get("DRIFT_PROMETHEUS_URL") or None,
            agent_timeout_s=number("DRIFT_OPERATOR_AGENT_TIMEOUT", cls.agent_timeout_s),
            discovery_ttl_s=number("DRIFT_OPERATOR_DISCOVERY_TTL", cls.discovery_ttl_s),
            metrics_port=int(number("DRIFT_OPERATOR_METRICS_PORT", 0, zero_ok=True)) or None,
            namespaced=bool(env.get("DRIFT_OPERATOR_NAMESPACES")),
            status_heartbeat_s=number("DRIFT_OPERATOR_STATUS_HEARTBEAT", cls.status_heartbeat_s),
        )
