"""The operator end to end against kmock's Kubernetes emulator: kopf, our handlers, real HTTP to fake agents."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import kmock
import pytest

from .fakes import (
    CONFIGMAPS,
    DEPLOYMENTS,
    LLMS,
    PODMONITORS,
    ROLEBINDINGS,
    ROLES,
    SECRETS,
    SERVICEACCOUNTS,
    SERVICES,
    Cluster,
    GenerateNameEmulator,
    eventually,
)

pytestmark = pytest.mark.kmock(cls=GenerateNameEmulator)

# Fast-moving loop settings, so decisions happen within a few 0.2 s ticks.
FAST = {
    "slo": {"window": "60s", "attainmentTarget": 0.9},
    "scaling": {"maxReplicas": 4, "maxStep": 2, "scaleUpCooldownSeconds": 0, "minRequests": 5},
    "partition": {"cooldownSeconds": 0},
}


def _cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    assert obj is not None
    found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_]
    assert found, f"no {type_} condition yet"
    return found[0]


def _must(value: Any) -> Any:
    assert value is not None
    return value


def _token(cluster: Cluster, name: str) -> str:
    secret = _must(cluster.get(SECRETS, f"{name}-admin-token"))
    return base64.b64decode(secret["data"]["token"]).decode()


async def test_create_renders_children_status_and_events(cluster: Cluster, operator: Any) -> None:
    cluster.add_llmservice(
        "chat", {"replicas": 2, "resources": {"gpusPerReplica": 1}, "policy": "static-split"}
    )

    deployment = await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    assert deployment["spec"]["replicas"] == 2
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["command"][:2] == ["drift", "serve"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "admin", "containerPort": 8001, "protocol": "TCP"},
    ]
    # The kubelet waits for the agent's drain (20 s), flush (5 s), uvicorn (5 s) and a margin.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    service = await eventually(lambda: _must(cluster.get(SERVICES, "chat")))  # applied after the Deployment
    assert service["spec"]["ports"][0]["name"] == "http"
    configmap = _must(cluster.get(CONFIGMAPS, "chat-engine"))
    assert "policy: static-split" in configmap["data"]["engine.yaml"]
    assert len(_token(cluster, "chat")) >= 32
    for obj in (deployment, service, configmap, cluster.get(SECRETS, "chat-admin-token")):
        ref = _must(obj)["metadata"]["ownerReferences"][0]
        assert ref["uid"] == "uid-chat" and ref["controller"] is True and ref["kind"] == "LLMService"
    assert not cluster.exists(PODMONITORS, "chat")  # no Prometheus Operator in this cluster

    llms = await eventually(
        lambda: _cond(cluster.get(LLMS, "chat"), "MetricsAvailable") and cluster.get(LLMS, "chat")
    )
    status = llms["status"]
    assert status["selector"] == "app.kubernetes.io/component=agent,serving.drift.dev/llmservice=chat"
    assert status["observedGeneration"] == 1
    assert _cond(llms, "Ready")["reason"] == "NoReplicasReady"  # the emulator runs no controllers
    assert _cond(llms, "MetricsAvailable")["reason"] == "MetricsMissing"
    assert _cond(llms, "SLOMet")["status"] == "Unknown"
    assert llms["metadata"]["finalizers"] == ["serving.drift.dev/finalizer"]
    await eventually(lambda: _must(cluster.events("Created") or None))
    await eventually(lambda: _must(cluster.events("MetricsMissing") or None))


async def test_violation_scales_out_then_steers_drift_once_the_scale_took_effect(
    cluster: Cluster, operator: Any, agents: Any
) -> None:
    cluster.add_llmservice("chat", {"replicas": 1, **FAST})
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    cluster.mark_deployment_ready("chat", 1)
    agent = await agents(ttft_met_fraction=0.5, tpot_met_fraction=1.0)
    cluster.add_agent_pod("chat", agent)

    await eventually(lambda: _must(cluster.get(LLMS, "chat")["spec"]["replicas"] == 2 or None))
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")["spec"]["replicas"] == 2 or None))
    decisions = await eventually(lambda: _must(cluster.get(LLMS, "chat")["status"].get("lastDecisions")))
    scale = [d for d in decisions if d["type"] == "Scale"][0]
    assert (scale["from"], scale["to"], scale["reason"]) == ("1", "2", "SLOViolated")
    assert "throughput" in scale["message"]  # sized by observed goodput, not a blind +1

    # Both were decided on the same window: TTFT lags under drift, so the loop also lowered drift's TPOT
    # margin (prefill gets more of the device).
    partition = [d for d in decisions if d["type"] == "Partition"][0]
    assert (partition["from"], partition["to"], partition["reason"]) == ("0.00", "-0.10", "TTFTViolated")
    # Nothing more is decided until the scale-out took effect (its replicas ready) and the agents run the
    # margin, and then only on requests that finished after that.
    await eventually(
        lambda: _must(
            cluster.get(LLMS, "chat")["status"]["partition"]["lastEvaluation"]["reason"] == "WaitingForEffect"
            or None
        )
    )
    await asyncio.sleep(0.6)
    assert len(cluster.get(LLMS, "chat")["status"]["lastDecisions"]) == 2
    second = await agents(ttft_met_fraction=0.5, tpot_met_fraction=1.0)
    cluster.add_agent_pod("chat", second)
    cluster.mark_deployment_ready("chat", 2)
    await eventually(
        lambda: _must(
            cluster.get(LLMS, "chat")["status"]["partition"]["lastEvaluation"]["reason"] != "WaitingForEffect"
            or None
        )
    )

    # The new margin reached both agents through the admin API, authenticated with the generated token.
    for each in (agent, second):
        put = await eventually(
            lambda a=each: [p for p in a.policy_puts if p["body"]["partition"]["tpot_margin"] < 0][0]
        )
        assert put["authorization"] == f"Bearer {_token(cluster, 'chat')}"
        assert put["body"]["policy"] == "drift" and put["body"]["slo"] == {
            "ttft_ms": 1000.0,
            "tpot_ms": 100.0,
        }

    # The status write follows the push within the same tick: poll for it.
    status = await eventually(
        lambda: (
            _must(cluster.get(LLMS, "chat")["status"]["partition"]["tpotMargin"] <= -0.1 or None)
            and cluster.get(LLMS, "chat")["status"]
        )
    )
    assert "prefillSmShare" not in status["partition"]  # drift's split is the dispatcher's, per step
    assert status["attainment"]["ttft"] == pytest.approx(0.5)
    assert status["attainment"]["tpot"] == pytest.approx(1.0)
    assert _cond(cluster.get(LLMS, "chat"), "SLOMet")["reason"] == "AttainmentBelowTarget"
    await eventually(
        lambda: _must(_cond(cluster.get(LLMS, "chat"), "AgentsConfigured")["status"] == "True" or None)
    )
    assert status["replicaStatus"][0]["policy"] == "drift"
    await eventually(lambda: _must(cluster.events("ScaledOut") or None))
    await eventually(lambda: _must(cluster.events("PartitionShifted") or None))


async def test_agents_are_pushed_once_per_change_and_4xx_is_not_retried(
    cluster: Cluster, operator: Any, agents: Any
) -> None:
    cluster.add_llmservice("chat", {"replicas": 1, **FAST})
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    cluster.mark_deployment_ready("chat", 1)
    agent = await agents(ttft_met_fraction=1.0, tpot_met_fraction=1.0)  # attainment met: nothing to steer
    cluster.add_agent_pod("chat", agent)
    await eventually(lambda: _must(agent.policy_puts or None))
    await asyncio.sleep(1.0)  # five more ticks
    assert len(agent.policy_puts) == 1, agent.policy_puts

    # A body the agent refuses: one attempt, a condition, one event; no retry on later ticks.
    agent.reject_with = 422
    await cluster.patch_llmservice("chat", {"spec": {"slo": {"ttftMs": 900}}})
    condition = await eventually(
        lambda: (
            _must(_cond(cluster.get(LLMS, "chat"), "AgentsConfigured")["status"] == "False" or None)
            and _cond(cluster.get(LLMS, "chat"), "AgentsConfigured")
        )
    )
    assert condition["reason"] == "AgentRejectedPolicy" and "422" in condition["message"]
    attempts = len(agent.policy_puts)
    await asyncio.sleep(1.0)
    assert len(agent.policy_puts) == attempts == 2
    assert len(cluster.events("AgentRejectedPolicy")) == 1


async def test_fairness_and_preemption_mode_are_pushed_live_without_a_restart(
    cluster: Cluster, operator: Any, agents: Any
) -> None:
    cluster.add_llmservice("chat", {"replicas": 1, **FAST})
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    cluster.mark_deployment_ready("chat", 1)
    agent = await agents(ttft_met_fraction=1.0, tpot_met_fraction=1.0)
    cluster.add_agent_pod("chat", agent)
    await eventually(lambda: _must(agent.policy_puts or None))
    assert agent.policy_puts[0]["body"]["fairness"] == "none"
    hash_key = "serving.drift.dev/config-hash"
    before = _must(cluster.get(DEPLOYMENTS, "chat"))["spec"]["template"]["metadata"]["annotations"][hash_key]

    await cluster.patch_llmservice(
        "chat", {"spec": {"engine": {"fairness": "vtc", "preemptionMode": "swap"}}}
    )
    put = await eventually(lambda: [p for p in agent.policy_puts if p["body"]["fairness"] == "vtc"][0])
    assert put["body"]["preemption_mode"] == "swap"
    # engine.yaml follows too (for pods that start later), and the pod template's hash does not.
    await eventually(
        lambda: _must(
            "fairness: vtc" in cluster.get(CONFIGMAPS, "chat-engine")["data"]["engine.yaml"] or None
        )
    )
    deployment = _must(cluster.get(DEPLOYMENTS, "chat"))
    assert deployment["spec"]["template"]["metadata"]["annotations"][hash_key] == before  # no restart


async def test_external_autoscaler_keeps_replicas_and_steers_partition(
    cluster: Cluster, operator: Any, agents: Any
) -> None:
    cluster.add_llmservice(
        "chat",
        {"replicas": 1, **FAST, "policy": "static-split"},
        annotations={"serving.drift.dev/replicas-owner": "external"},
    )
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    cluster.mark_deployment_ready("chat", 1)
    agent = await agents(
        ttft_met_fraction=1.0, tpot_met_fraction=0.5, policy="static-split"
    )  # decode starved
    cluster.add_agent_pod("chat", agent)

    await eventually(
        lambda: [p for p in agent.policy_puts if p["body"]["partition"]["prefill_sm_share"] <= 0.45][0]
    )

    def steered_not_scaled() -> None:
        llms = _must(cluster.get(LLMS, "chat"))
        assert llms["spec"]["replicas"] == 1
        assert llms["status"]["scaling"]["owner"] == "external"
        assert llms["status"]["scaling"]["lastEvaluation"]["reason"] == "ExternalAutoscaler"
        assert llms["status"]["partition"]["prefillSmShare"] <= 0.45
        assert [d["type"] for d in llms["status"]["lastDecisions"]] == ["Partition"] * len(
            llms["status"]["lastDecisions"]
        )
        assert llms["status"]["lastDecisions"][0]["reason"] == "TPOTViolated"

    await eventually(steered_not_scaled)


async def test_agents_without_slo_counters_hold_with_metrics_missing(
    cluster: Cluster, operator: Any, agents: Any
) -> None:
    cluster.add_llmservice("chat", {"replicas": 1, **FAST})
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    cluster.mark_deployment_ready("chat", 1)
    agent = await agents(with_counters=False)
    cluster.add_agent_pod("chat", agent)

    def held() -> dict[str, Any]:
        llms = _must(cluster.get(LLMS, "chat"))
        assert "counters" in _cond(llms, "MetricsAvailable")["message"]
        return llms

    llms = await eventually(held)
    assert _cond(llms, "MetricsAvailable")["reason"] == "MetricsMissing"
    assert llms["status"]["scaling"]["lastEvaluation"]["action"] == "hold"
    await asyncio.sleep(0.6)
    llms = _must(cluster.get(LLMS, "chat"))
    assert llms["spec"]["replicas"] == 1 and "lastDecisions" not in llms["status"]


async def test_invalid_spec_is_reported_then_fixed(cluster: Cluster, operator: Any) -> None:
    cluster.add_llmservice("chat", {"scaling": {"minReplicas": 5, "maxReplicas": 2}})

    ready = await eventually(lambda: _cond(cluster.get(LLMS, "chat"), "Ready"))
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "minReplicas must not exceed" in ready["message"]
    assert not cluster.exists(DEPLOYMENTS, "chat")
    await eventually(lambda: _must(cluster.events("InvalidSpec") or None))

    await cluster.patch_llmservice("chat", {"spec": {"scaling": {"minReplicas": 1}}})
    await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    await eventually(
        lambda: _must(_cond(cluster.get(LLMS, "chat"), "Ready")["reason"] != "InvalidSpec" or None)
    )


async def test_reconcile_is_idempotent_and_restores_hand_edits(cluster: Cluster, operator: Any) -> None:
    cluster.add_llmservice("chat", {"replicas": 1})
    deployment = await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
    await eventually(lambda: _cond(cluster.get(LLMS, "chat"), "MetricsAvailable"))  # the timer has run
    writes_before = len(cluster.requests("PATCH", DEPLOYMENTS)) + len(cluster.requests("POST", DEPLOYMENTS))
    await asyncio.sleep(0.8)  # several loop ticks, each re-reconciling
    writes_after = len(cluster.requests("PATCH", DEPLOYMENTS)) + len(cluster.requests("POST", DEPLOYMENTS))
    assert writes_after == writes_before == 2  # agents and router: each created once, never rewritten

    edited = dict(deployment)
    edited["spec"] = {**deployment["spec"], "replicas": 7}
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    cluster.set_object(DEPLOYMENTS, "chat", edited)

    def restored() -> None:
        live = _must(cluster.get(DEPLOYMENTS, "chat"))
        assert live["spec"]["replicas"] == 1
        assert live["spec"]["template"]["spec"]["containers"][0]["image"].startswith("ghcr.io/drift-serving/")

    await eventually(restored)
    await eventually(lambda: _must(cluster.events("Restored") or None))


async def test_delete_releases_the_object(cluster: Cluster, operator: Any) -> None:
    cluster.add_llmservice("chat", {})
    await eventually(lambda: _cond(cluster.get(LLMS, "chat"), "MetricsAvailable"))
    await cluster.delete_llmservice("chat")
    # The finalizer is removed once the timer is stopped; then the object is gone.
    await eventually(lambda: _must(cluster.get(LLMS, "chat") is None or None))
    # Children are left to the garbage collector, which follows their controller owner reference.
    assert (
        _must(cluster.get(DEPLOYMENTS, "chat"))["metadata"]["ownerReferences"][0]["blockOwnerDeletion"]
        is True
    )


async def test_podmonitor_is_created_when_prometheus_operator_is_installed(
    cluster: Cluster, operator: Any
) -> None:
    cluster.enable_monitoring_crds()
    cluster.add_llmservice("chat", {"monitoring": {"labels": {"release": "kube-prometheus-stack"}}})
    monitor = await eventually(lambda: _must(cluster.get(PODMONITORS, "chat")))
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"


async def test_prometheus_source_feeds_attainment(cluster: Cluster, operator: Any, agents: Any) -> None:
    prometheus = kmock.RawHandler()
    vector = [
        {"metric": {"phase": phase, "outcome": outcome}, "value": [0, str(value)]}
        for (phase, outcome), value in {
            ("ttft", "met"): 95,
            ("ttft", "missed"): 5,
            ("tpot", "met"): 80,
            ("tpot", "missed"): 20,
            ("both", "met"): 78,
            ("both", "missed"): 22,
        }.items()
    ]

    def answer(request: Any) -> dict[str, Any]:
        query = request.params.get("query", "")
        result = [{"metric": {}, "value": [0, "3"]}] if query.startswith("time()") else vector
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    prometheus["get /api/v1/query"] << answer
    agent = await agents()  # before the Prometheus server: kmock servers must stop in reverse order
    async with prometheus, kmock.Server(prometheus) as server:
        spec = {**FAST, "monitoring": {"prometheusUrl": str(server.url).rstrip("/")}}
        cluster.add_llmservice("chat", spec)
        await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat")))
        cluster.mark_deployment_ready("chat", 1)
        cluster.add_agent_pod("chat", agent)
        attainment = await eventually(lambda: cluster.get(LLMS, "chat")["status"]["attainment"]["both"] and (
            cluster.get(LLMS, "chat")["status"]["attainment"]))  # fmt: skip
        assert attainment == {**attainment, "ttft": 0.95, "tpot": 0.8, "both": 0.78, "requests": 100}
        queries = [r.params["query"] for r in prometheus]
        assert any('llmservice="chat"' in q and 'namespace="ns1"' in q for q in queries)


async def test_a_foreign_object_with_a_childs_name_is_left_alone(cluster: Cluster, operator: Any) -> None:
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": Cluster.NAMESPACE, "labels": {"team": "other"}},
        "spec": {"replicas": 3},
    }
    cluster.set_object(DEPLOYMENTS, "chat", foreign)
    cluster.add_llmservice("chat", {})

    ready = await eventually(lambda: _cond(cluster.get(LLMS, "chat"), "Ready"))
    assert (ready["status"], ready["reason"]) == ("False", "ReconcileFailed")
    assert "Deployment/chat" in ready["message"] and "not created by this LLMService" in ready["message"]
    assert _must(cluster.get(DEPLOYMENTS, "chat")) == foreign
    assert not cluster.requests("PATCH", DEPLOYMENTS)


async def test_router_is_rendered_reported_and_removed_when_switched_off(
    cluster: Cluster, operator: Any
) -> None:
    cluster.add_llmservice("chat", {"scaling": {"maxReplicas": 3}, "router": {"policy": "slo-aware"}})

    router = await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "chat-router")))
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["drift", "router"]
    assert container["command"][-2:] == ["--policy", "slo-aware"]
    assert "ns1/chat-agents" in container["command"]
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == "chat-router"
    for resource in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS):
        obj = await eventually(lambda r=resource: _must(cluster.get(r, "chat-router")))
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    agents = await eventually(lambda: _must(cluster.get(SERVICES, "chat-agents")))
    assert agents["spec"]["clusterIP"] == "None"
    cond = await eventually(lambda: _cond(cluster.get(LLMS, "chat"), "RouterReady"))
    assert (cond["status"], cond["reason"]) == ("False", "NoRouterReplicasReady")
    assert cluster.get(LLMS, "chat")["status"]["router"] == {
        "enabled": True,
        "policy": "slo-aware",
        "replicas": 2,
        "readyReplicas": 0,
    }
    # No router pod ready yet: the client Service still selects the agents (it is reconciled every tick).
    ticks = len(cluster.requests("GET", SERVICES))
    await eventually(lambda: _must(len(cluster.requests("GET", SERVICES)) >= ticks + 4 or None))
    service = _must(cluster.get(SERVICES, "chat"))
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "agent"

    cluster.mark_deployment_ready("chat-router", 2)
    await eventually(
        lambda: _must(_cond(cluster.get(LLMS, "chat"), "RouterReady")["status"] == "True" or None)
    )
    assert cluster.get(LLMS, "chat")["status"]["router"]["readyReplicas"] == 2
    # One router replica ready: the client Service turns to the router.
    await eventually(
        lambda: _must(
            _must(cluster.get(SERVICES, "chat"))["spec"]["selector"]["app.kubernetes.io/component"]
            == "router"
            or None
        )
    )

    # Off: the client Service turns back to the agents, and the router's objects go.
    await cluster.patch_llmservice("chat", {"spec": {"router": {"enabled": False}}})

    def direct() -> None:
        assert (
            _must(cluster.get(SERVICES, "chat"))["spec"]["selector"]["app.kubernetes.io/component"] == "agent"
        )
        for resource in (DEPLOYMENTS, SERVICEACCOUNTS, ROLES, ROLEBINDINGS):
            assert cluster.get(resource, "chat-router") is None, resource
        assert _cond(cluster.get(LLMS, "chat"), "RouterReady")["reason"] == "RouterDisabled"
        assert cluster.get(LLMS, "chat")["status"]["router"] == {"enabled": False}

    await eventually(direct)
    assert cluster.exists(DEPLOYMENTS, "chat") and cluster.exists(SERVICES, "chat-agents")
    await eventually(lambda: _must(cluster.events("Deleted") or None))


async def test_a_router_object_the_service_does_not_own_is_never_deleted(
    cluster: Cluster, operator: Any
) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "chat-router", "namespace": Cluster.NAMESPACE, "labels": {"team": "other"}},
    }
    cluster.set_object(SERVICEACCOUNTS, "chat-router", foreign)
    cluster.add_llmservice("chat", {"router": {"enabled": False}})
    await eventually(lambda: _cond(cluster.get(LLMS, "chat"), "MetricsAvailable"))
    await asyncio.sleep(0.6)
    assert cluster.get(SERVICEACCOUNTS, "chat-router") == foreign
    assert not cluster.requests("DELETE", SERVICEACCOUNTS)


async def test_api_key_secret_is_referenced_not_copied(cluster: Cluster, operator: Any) -> None:
    """The operator never reads the keys: the Deployment references the user's Secret, the admin token
    (the operator's own channel to the agents) is unchanged, and switching auth off drops the reference."""
    cluster.add_llmservice("keyed", {"auth": {"secretName": "keyed-api", "key": "keys"}})
    deployment = await eventually(lambda: _must(cluster.get(DEPLOYMENTS, "keyed")))
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    ref = {"secretKeyRef": {"name": "keyed-api", "key": "keys"}}
    assert {"name": "DRIFT_API_KEY", "valueFrom": ref} in env
    assert not cluster.exists(SECRETS, "keyed-api")  # the user's Secret: neither created nor read
    assert not cluster.requests("GET", SECRETS, "keyed-api")
    assert len(_token(cluster, "keyed")) >= 32
    await cluster.patch_llmservice("keyed", {"spec": {"auth": None}})

    def dropped() -> Any:
        containers = _must(cluster.get(DEPLOYMENTS, "keyed"))["spec"]["template"]["spec"]["containers"]
        return all(e["name"] != "DRIFT_API_KEY" for e in containers[0]["env"]) or None

    await eventually(dropped)
