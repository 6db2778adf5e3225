"""Pod views, which pods get the runtime policy pushed, and the Prometheus source."""

from __future__ import annotations

from typing import Any

import pytest

from drift_operator.metrics import PodSample
from drift_operator.pods import PodView, pod_view, pods_to_push, runtime_state
from drift_operator.prometheus import freshness_query, slo_query, stats_from_vector
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
    assert not pod_view(_pod(ready="False")).ready  # type: ignore[union-attr]
    assert not pod_view(_pod(ip=None)).ready  # type: ignore[union-attr]
    assert pod_view(_pod(deletionTimestamp="2026-01-01T00:00:00Z")) is None


def test_push_key_changes_with_container_restarts() -> None:
    assert pod_view(_pod(restarts=0)).push_key != pod_view(_pod(restarts=1)).push_key  # type: ignore[union-attr]


def test_runtime_state_body() -> None:
    spec = parse_spec({"policy": "drift", "slo": {"ttftMs": 300, "tpotMs": 30}})
    assert runtime_state(spec, 0.61234) == {
        "policy": "drift",
        "partition": {"mode": "auto", "prefill_sm_share": 0.6123, "fold_max_tokens": 2048},
        "slo": {"ttft_ms": 300.0, "tpot_ms": 30.0},
    }


def test_runtime_state_is_what_the_agent_admin_api_accepts() -> None:
    """The agent's PUT /admin/policy model forbids unknown keys: every key the operator pushes must be one."""
    from drift_agent.server.admin import PolicyUpdate

    spec = parse_spec({"policy": "drift", "partition": {"mode": "static", "foldMaxTokens": 0}})
    update = PolicyUpdate.model_validate(runtime_state(spec, 0.4))
    assert update.partition is not None and update.partition.fold_max_tokens == 0
    assert update.partition.prefill_sm_share == 0.4 and update.policy == "drift"


def test_pods_to_push() -> None:
    spec = parse_spec({})
    desired = runtime_state(spec, 0.55)
    fresh, pushed_ok, drifted, wrong_policy, not_ready = (
        PodView(n, f"u{n}", "1.2.3.4", 8000, n != "e", 0) for n in "abcde"
    )
    pushed = {p.push_key: desired for p in (pushed_ok, drifted, wrong_policy)}
    samples = {
        "ub": PodSample("b", "ub", prefill_share=0.56, policy="drift"),
        "uc": PodSample("c", "uc", prefill_share=0.3, policy="drift"),  # lost our setting
        "ud": PodSample("d", "ud", prefill_share=0.55, policy="chunked"),
    }
    targets = pods_to_push(desired, [fresh, pushed_ok, drifted, wrong_policy, not_ready], pushed, samples)
    assert [p.name for p in targets] == ["a", "c", "d"]


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
