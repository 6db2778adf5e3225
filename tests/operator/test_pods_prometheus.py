"""Pod views, which pods get the runtime policy pushed, and the Prometheus source."""

from __future__ import annotations

from typing import Any

import pytest

from drift_operator.metrics import PodSample, parse_agent_metrics
from drift_operator.partition import Steering
from drift_operator.pods import PodView, pod_view, pods_to_push
from drift_operator.prometheus import freshness_query, slo_query, stats_from_vector
from drift_operator.render import runtime_state
from drift_operator.spec import parse_spec


def _pod(
    name: str = "p1", ready: str = "True", ip: str | None = "10.0.0.5", restarts: int = 0, **meta: Any
) -> dict:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", **meta},
        "spec": {"containers": [{"name": "agent", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": ready}],
            "containerStatuses": [{"name": "agent", "restartCount": restarts}],
        },
    }


def test_pod_view() -> None:
    view = pod_view(_pod())
    assert view is not None and view.ready and view.base_url == "http://10.0.0.5:8000"
    ipv6 = pod_view(_pod(ip="fd00::5"))
    assert ipv6 is not None and ipv6.base_url == "http://[fd00::5]:8000"
    assert view.admin_url == view.base_url  # no admin port declared: the admin API is on the main port
    with_admin = _pod()
    with_admin["spec"]["containers"][0]["ports"].append({"name": "admin", "containerPort": 8001})
    assert pod_view(with_admin).admin_url == "http://10.0.0.5:8001"  # type: ignore[union-attr]
    assert not pod_view(_pod(ready="False")).ready  # type: ignore[union-attr]
    assert not pod_view(_pod(ip=None)).ready  # type: ignore[union-attr]
    assert pod_view(_pod(deletionTimestamp="2026-01-01T00:00:00Z")) is None


def test_push_key_changes_with_container_restarts() -> None:
    assert pod_view(_pod(restarts=0)).push_key != pod_view(_pod(restarts=1)).push_key  # type: ignore[union-attr]


def test_runtime_state_body() -> None:
    spec = parse_spec({"policy": "drift", "slo": {"ttftMs": 300, "tpotMs": 30}})
    assert runtime_state(spec, Steering(0.61234, -0.1)) == {
        "policy": "drift",
        "partition": {
            "mode": "auto",
            "prefill_sm_share": 0.6123,
            "tpot_margin": -0.1,
            "fold_max_tokens": 2048,
        },
        "slo": {"ttft_ms": 300.0, "tpot_ms": 30.0},
        "fairness": "none",
        "preemption_mode": "auto",
    }


def test_runtime_state_is_what_the_agent_admin_api_accepts() -> None:
    """The agent's PUT /admin/policy model forbids unknown keys: every key the operator pushes must be one."""
    from drift_agent.server.admin import PolicyUpdate

    spec = parse_spec(
        {
            "policy": "drift",
            "partition": {"mode": "static", "foldMaxTokens": 0},
            "engine": {"fairness": "vtc", "preemptionMode": "recompute"},
        }
    )
    update = PolicyUpdate.model_validate(runtime_state(spec, Steering(0.4, 0.2)))
    assert update.engine_settings()["fairness"] == "vtc"
    assert update.engine_settings()["preemption_mode"] == "recompute"
    assert update.partition is not None and update.partition.fold_max_tokens == 0
    assert update.partition.prefill_sm_share == 0.4 and update.policy == "drift"
    assert update.partition.tpot_margin == 0.2


def test_pods_to_push() -> None:
    spec = parse_spec({})
    desired = runtime_state(spec, Steering(0.5, 0.1))
    config = {"prefill_sm_share": 0.5, "tpot_margin": 0.1, "fold_max_tokens": 2048}
    fresh, pushed_ok, drifted, wrong_policy, not_ready, refused = (
        PodView(n, f"u{n}", "1.2.3.4", 8000, n != "e", 0) for n in "abcdef"
    )
    pushed = {p.push_key: desired for p in (pushed_ok, drifted, wrong_policy)}
    samples = {
        # The dispatcher's per-step split differs from the configured one: that is not a reason to push.
        "ub": PodSample("b", "ub", prefill_share=0.8, policy="drift", configured=config),
        "uc": PodSample("c", "uc", policy="drift", configured={**config, "tpot_margin": 0.0}),  # lost ours
        "ud": PodSample("d", "ud", policy="chunked", configured=config),
    }
    rejected = {refused.push_key: desired}
    pods = [fresh, pushed_ok, drifted, wrong_policy, not_ready, refused]
    targets = pods_to_push(desired, pods, pushed, rejected, samples)
    assert [p.name for p in targets] == ["a", "c", "d"]


def test_agent_metrics_separate_configured_settings_from_the_per_step_split() -> None:
    text = """# TYPE drift_partition_sm_share gauge
drift_partition_sm_share{phase="prefill"} 0.8
drift_partition_sm_share{phase="decode"} 0.2
# TYPE drift_partition_config gauge
drift_partition_config{model_name="m",setting="prefill_sm_share"} 0.5
drift_partition_config{model_name="m",setting="tpot_margin"} -0.1
"""
    sample = parse_agent_metrics(text, "p", "u")
    assert sample.prefill_share == 0.8
    assert sample.configured == {"prefill_sm_share": 0.5, "tpot_margin": -0.1}


def test_prometheus_queries_select_the_service() -> None:
    query = slo_query("team-a", "chat", 300)
    assert query == (
        'sum by (phase, outcome) (increase(drift_slo_requests_total{namespace="team-a",llmservice="chat"}[300s]))'
    )
    assert freshness_query("team-a", "chat").startswith("time() - max(timestamp(")


def test_stats_from_a_prometheus_vector() -> None:
    vector = [
        {"metric": {"phase": "both", "outcome": "met"}, "value": [0, "90"]},
        {"metric": {"phase": "both", "outcome": "missed"}, "value": [0, "10"]},
        {"metric": {"phase": "ttft", "outcome": "met"}, "value": [0, "NaN"]},
        {"metric": {"phase": "bogus", "outcome": "met"}, "value": [0, "5"]},
    ]
    stats = stats_from_vector(vector, 300, pods=3)
    assert stats is not None and stats.attainment("both") == pytest.approx(0.9)
    assert stats.requests("ttft") == 0 and stats.duration_s == 300 and stats.pods == 3
    assert stats_from_vector([], 300, 1) is None


def test_no_prometheus_series_names_prometheus_not_the_agents() -> None:
    from drift_operator.health import assess_metrics
    from drift_operator.prometheus import no_series_message

    message = no_series_message("http://prom:9090", "team-a", "chat")
    health = assess_metrics(
        now=100, last_success=None, ready_pods=2, scraped_pods=2, pods_with_counters=0, stats=None,
        stale_after_s=120, source_error=message,
    )  # fmt: skip
    assert health.reason == "MetricsMissing" and health.message == message
    assert "Prometheus at http://prom:9090 has no drift_slo_requests_total series" in message
    assert "llmservice='chat'" in message and "agents export no" not in message
