"""Rendering: golden expectations on the fields that matter, and validity against Kubernetes and the agent."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from drift_agent.core.config import SLO_SETTINGS, EngineConfig
from drift_operator.partition import Steering
from drift_operator.render import (
    Owner,
    config_hash,
    render_children,
    render_engine_config,
    render_secret,
    runtime_state,
)
from drift_operator.spec import SpecError, parse_spec

OWNER = Owner(name="chat", namespace="team-a", uid="0000-1111")


def _children(raw: dict[str, Any], owner_of: str = "operator", monitoring: bool = True) -> Any:
    return render_children(OWNER, parse_spec(raw), owner_of, monitoring)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_deployment_golden_fields_embedded_cpu() -> None:
    deployment = _children({"replicas": 2}).deployment
    meta = deployment["metadata"]
    assert (meta["name"], meta["namespace"]) == ("chat", "team-a")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "serving.drift.dev/v1alpha1",
            "kind": "LLMService",
            "name": "chat",
            "uid": "0000-1111",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"] == {
        "matchLabels": {"serving.drift.dev/llmservice": "chat", "app.kubernetes.io/component": "agent"}
    }
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    container = _container(deployment)
    assert container["command"] == [
        "drift", "serve", "--host", "0.0.0.0", "--port", "8000", "--admin-port", "8001",
        "--config", "/etc/drift/engine.yaml",
    ]  # fmt: skip
    assert container["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "admin", "containerPort": 8001, "protocol": "TCP"},
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http", "scheme": "HTTP"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    token = next(e for e in container["env"] if e["name"] == "DRIFT_ADMIN_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "chat-admin-token", "key": "token"}}
    assert "resources" not in container or "nvidia.com/gpu" not in container["resources"].get("limits", {})
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/drift"]["readOnly"] is True and "/tmp" in mounts and "/models" not in mounts
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert spec["template"]["metadata"]["annotations"]["serving.drift.dev/config-hash"]


def test_deployment_for_an_8b_model_on_a_gpu_node() -> None:
    raw = {
        "model": {"source": "pvc", "claimName": "models", "path": "Llama-3.1-8B"},
        "resources": {
            "gpusPerReplica": 1,
            "requests": {"cpu": "4", "memory": "32Gi"},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "runtimeClassName": "nvidia",
        },
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "imagePullSecrets": ["regcred"],
    }
    deployment = _children(raw).deployment
    container = _container(deployment)
    assert container["command"][-2:] == ["--model", "/models/Llama-3.1-8B"]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    assert container["env"][-1] == {"name": "NCCL_DEBUG", "value": "WARN"}
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["runtimeClassName"] == "nvidia" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    # No surge: a GPU cluster rarely has a spare GPU for an extra pod during a rollout.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize(
    "model,expected",
    [
        ({"source": "hostPath", "hostPath": "/data/models", "path": "qwen"}, "/models/qwen"),
        ({"source": "hostPath", "hostPath": "/data/models/qwen"}, "/models"),
        ({"source": "image", "path": "/opt/models/qwen"}, "/opt/models/qwen"),
    ],
)
def test_model_sources(model: dict[str, Any], expected: str) -> None:
    deployment = _children({"model": model}).deployment
    assert _container(deployment)["command"][-2:] == ["--model", expected]
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert ("model" in volumes) == (model["source"] != "image")


def test_replicas_clamped_for_the_operator_but_not_for_an_external_autoscaler() -> None:
    raw = {"replicas": 0, "scaling": {"minReplicas": 2, "maxReplicas": 3}}
    assert _children(raw).deployment["spec"]["replicas"] == 2
    assert _children(raw, owner_of="external").deployment["spec"]["replicas"] == 0
    assert _children({**raw, "replicas": 9}).deployment["spec"]["replicas"] == 3


HTTP_PORT = {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}


def test_service_exposes_the_http_port_of_the_router_or_the_agents() -> None:
    """Same name and port whatever is behind it: clients never change."""
    routed = _children({}).service  # maxReplicas 4 by default: the router is on
    direct = _children({"scaling": {"maxReplicas": 1}}).service
    for service in (routed, direct):
        assert service["metadata"]["name"] == "chat" and service["spec"]["ports"] == [HTTP_PORT]
        assert service["spec"]["type"] == "ClusterIP" and "clusterIP" not in service["spec"]
    assert routed["spec"]["selector"] == {
        "serving.drift.dev/llmservice": "chat",
        "app.kubernetes.io/component": "router",
    }
    assert direct["spec"]["selector"] == {
        "serving.drift.dev/llmservice": "chat",
        "app.kubernetes.io/component": "agent",
    }


@pytest.mark.parametrize(
    "raw,enabled",
    [
        ({}, True),
        ({"scaling": {"maxReplicas": 1}}, False),
        ({"scaling": {"maxReplicas": 1}, "router": {"enabled": True}}, True),
        ({"router": {"enabled": False}}, False),
    ],
)
def test_router_is_on_by_default_when_there_can_be_more_than_one_replica(
    raw: dict[str, Any], enabled: bool
) -> None:
    children = _children(raw)
    assert (children.router is not None) == enabled
    # The agents' headless Service exists either way (the router's discovery, or anyone else's).
    assert children.agents_service is not None


def test_agents_headless_service() -> None:
    service = _children({}).agents_service
    assert service["metadata"]["name"] == "chat-agents"
    assert service["spec"]["clusterIP"] == "None"  # headless: EndpointSlices only, no virtual IP
    assert service["spec"]["selector"] == {
        "serving.drift.dev/llmservice": "chat",
        "app.kubernetes.io/component": "agent",
    }
    assert service["spec"]["ports"] == [HTTP_PORT]  # the router's --discover-port names this port


def test_router_deployment_golden_fields() -> None:
    router = _children({"router": {"policy": "least-kv"}, "imagePullSecrets": ["regcred"]}).router
    assert router is not None
    deployment = router.deployment
    meta = deployment["metadata"]
    assert (meta["name"], meta["namespace"]) == ("chat-router", "team-a")
    assert meta["ownerReferences"][0]["uid"] == OWNER.uid and meta["ownerReferences"][0]["controller"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == {
        "serving.drift.dev/llmservice": "chat",
        "app.kubernetes.io/component": "router",
    }
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/name"] == "drift-router"
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "chat-router" and pod["automountServiceAccountToken"] is True
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    # SIGTERM: a 5 s drain (still serving), 30 s for open streams, a 10 s margin; no preStop hook needed.
    assert pod["terminationGracePeriodSeconds"] == 45
    container = pod["containers"][0]
    assert "lifecycle" not in container
    assert container["image"] == "ghcr.io/drift-serving/drift-agent:0.1.0"  # the agent image
    assert container["command"] == [
        "drift", "router", "--host", "0.0.0.0", "--port", "8000",
        "--discover", "team-a/chat-agents", "--discover-port", "http", "--policy", "least-kv",
    ]  # fmt: skip
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http", "scheme": "HTTP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The router's pods must never count as agents (scraped, pushed to, or behind the headless Service).
    agent_selector = _children({}).deployment["spec"]["selector"]["matchLabels"]
    assert not agent_selector.items() <= labels.items()


def test_router_follows_its_spec() -> None:
    router = _children(
        {
            "router": {
                "replicas": 3,
                "policy": "round-robin",
                "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": 2, "memory": "2Gi"}},
            }
        }
    ).router
    assert router is not None
    container = router.deployment["spec"]["template"]["spec"]["containers"][0]
    assert router.deployment["spec"]["replicas"] == 3
    assert container["command"][-2:] == ["--policy", "round-robin"]
    assert container["resources"] == {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "2Gi"}}


def test_router_rbac_reads_endpointslices_only() -> None:
    router = _children({}).router
    assert router is not None
    assert router.serviceaccount["metadata"]["name"] == "chat-router"
    assert router.role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert router.rolebinding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "chat-router",
    }
    assert router.rolebinding["subjects"] == [
        {"kind": "ServiceAccount", "name": "chat-router", "namespace": "team-a"}
    ]
    for obj in router.objects():
        assert obj["metadata"]["ownerReferences"] == [OWNER.reference()]


def test_engine_config_is_what_the_agent_loads(tmp_path: Path) -> None:
    raw = {
        "engine": {"dtype": "bfloat16", "maxModelLen": 4096, "maxNumBatchedTokens": 1024},
        "policy": "static-split",
        "partition": {"mode": "static", "prefillSmShare": 0.3, "backend": "mps", "foldMaxTokens": 512},
        "slo": {"ttftMs": 400, "tpotMs": 40},
        "model": {"servedModelName": "chat-model"},
    }
    configmap = _children(raw).configmap
    assert configmap["metadata"]["name"] == "chat-engine"
    path = tmp_path / "engine.yaml"
    path.write_text(configmap["data"]["engine.yaml"])
    loaded = EngineConfig.from_sources(path)
    assert (
        loaded.dtype == "bfloat16" and loaded.max_model_len == 4096 and loaded.max_num_batched_tokens == 1024
    )
    assert loaded.policy == "static-split" and loaded.partition.prefill_sm_share == 0.3
    assert loaded.partition.backend == "mps" and loaded.partition.mode == "static"
    assert loaded.partition.fold_max_tokens == 512
    assert (loaded.slo_ttft_ms, loaded.slo_tpot_ms) == (400, 40)
    assert loaded.served_model_name == "chat-model"


def test_host_tier_preemption_and_fairness_reach_the_agent(tmp_path: Path) -> None:
    raw = {
        "engine": {"swapSpaceGb": 8, "preemptionMode": "swap", "fairness": "vtc", "fairnessPreemptGap": 512},
    }
    config = _children(raw).configmap["data"]["engine.yaml"]
    path = tmp_path / "engine.yaml"
    path.write_text(config)
    loaded = EngineConfig.from_sources(path)
    assert (loaded.swap_space_gb, loaded.preemption_mode) == (8, "swap")
    assert (loaded.fairness, loaded.fairness_preempt_gap) == ("vtc", 512)
    # The two the agent takes live are in the PUT /admin/policy body too (pods already running get them so).
    spec = parse_spec(raw)
    body = runtime_state(spec, Steering(0.5, 0.0))
    assert (body["fairness"], body["preemption_mode"]) == ("vtc", "swap")


@pytest.mark.parametrize(
    "resources,expected",
    [
        # The user's memory is what everything else needs: the host tier comes on top of request and limit.
        (
            {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "48Gi"}},
            {"requests": {"cpu": "4", "memory": "40Gi"}, "limits": {"memory": "56Gi"}},
        ),
        # No limit stays no limit; the request still reserves the tier.
        ({"requests": {"memory": "512Mi"}}, {"requests": {"memory": "8704Mi"}}),
        ({}, {"requests": {"memory": "8Gi"}}),
        ({"requests": {"cpu": "2"}}, {"requests": {"cpu": "2", "memory": "8Gi"}}),
        # Only a limit: the API server defaults the request to it (tier included), so none is added.
        ({"limits": {"memory": "16Gi"}}, {"limits": {"memory": "24Gi"}}),
        # Decimal units and plain byte counts are summed exactly.
        ({"requests": {"memory": "4G"}}, {"requests": {"memory": "12294858Ki"}}),  # 4e9 + 8 * 2^30 bytes
        ({"requests": {"memory": "100000001"}}, {"requests": {"memory": "8689934593"}}),
        ({"requests": {"memory": 1073741824}}, {"requests": {"memory": "9Gi"}}),
    ],
)
def test_host_tier_is_added_to_the_container_memory(
    resources: dict[str, Any], expected: dict[str, Any]
) -> None:
    deployment = _children({"engine": {"swapSpaceGb": 8}, "resources": resources}).deployment
    assert _container(deployment)["resources"] == expected
    kubernetes_validate.validate(yaml.safe_load(yaml.safe_dump(deployment)), "1.30", strict=True)


def test_memory_is_left_alone_without_a_host_tier() -> None:
    assert _container(_children({}).deployment)["resources"] == {}
    resources = {"requests": {"memory": "4Gi"}, "limits": {"memory": "6Gi"}}
    assert _container(_children({"resources": resources}).deployment)["resources"] == resources


def test_host_tier_with_gpus_and_fractional_sizes() -> None:
    raw = {
        "engine": {"swapSpaceGb": 1.5},
        "resources": {"gpusPerReplica": 1, "requests": {"memory": "32Gi"}, "limits": {"memory": "48Gi"}},
    }
    assert _container(_children(raw).deployment)["resources"] == {
        "requests": {"memory": "34304Mi"},  # 33.5 GiB
        "limits": {"memory": "50688Mi", "nvidia.com/gpu": "1"},  # 49.5 GiB
    }


def test_an_unreadable_memory_quantity_with_a_host_tier_is_a_spec_error() -> None:
    spec = parse_spec({"engine": {"swapSpaceGb": 2}, "resources": {"limits": {"memory": "lots"}}})
    with pytest.raises(SpecError, match=r"spec.resources.limits.memory: 'lots' is not a quantity"):
        render_children(OWNER, spec, "operator", True)


def test_engine_yaml_starts_where_the_runtime_push_does() -> None:
    """engine.yaml's runtime settings and the PUT /admin/policy body come from one function: a pod that starts
    later runs what the loop would push it at the spec's starting point."""
    spec = parse_spec({"policy": "drift", "partition": {"tpotMargin": 0.2}, "slo": {"ttftMs": 300}})
    config = render_engine_config(spec)
    body = runtime_state(spec, Steering(spec.partition.prefill_sm_share, spec.partition.tpot_margin))
    assert config["policy"] == body["policy"]
    assert config["partition"] == {**body["partition"], "backend": spec.partition.backend}
    assert {name: config[key] for name, key in SLO_SETTINGS.items()} == body["slo"]
    assert (config["fairness"], config["preemption_mode"]) == (body["fairness"], body["preemption_mode"])


def test_engine_config_rejections_become_spec_errors() -> None:
    # maxModelLen set with a step budget below the block size: valid field by field, rejected as a whole.
    spec = parse_spec({"engine": {"maxModelLen": 64, "blockSize": 64, "maxNumBatchedTokens": 32}})
    with pytest.raises(SpecError, match="rejected by the agent"):
        render_engine_config(spec)


def test_config_hash_ignores_settings_pushed_live() -> None:
    base = parse_spec({})

    def digest(raw: dict[str, Any]) -> str:
        spec = parse_spec(raw)
        return config_hash(render_engine_config(spec), spec)

    reference = config_hash(render_engine_config(base), base)
    # Policy, split and SLO targets go through PUT /admin/policy: no restart.
    assert digest({"policy": "chunked"}) == reference
    assert digest({"partition": {"prefillSmShare": 0.6}}) == reference
    assert digest({"slo": {"ttftMs": 300}}) == reference
    assert digest({"partition": {"foldMaxTokens": 0}}) == reference
    assert digest({"engine": {"fairness": "vtc", "preemptionMode": "recompute"}}) == reference
    # Anything the engine reads only at start-up rolls the pods.
    assert digest({"engine": {"maxNumSeqs": 8}}) != reference
    assert digest({"engine": {"swapSpaceGb": 4}}) != reference  # the host tier is allocated at start-up
    assert digest({"engine": {"fairnessPreemptGap": 100}}) != reference
    assert digest({"partition": {"backend": "mps"}}) != reference
    assert digest({"model": {"source": "image", "path": "/m"}}) != reference


def test_secret_carries_the_token() -> None:
    secret = render_secret(OWNER, "s3cr3t")
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cr3t"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_podmonitor_follows_monitoring_settings() -> None:
    monitor = _children({"monitoring": {"labels": {"release": "prom"}, "scrapeInterval": "30s"}}).podmonitor
    assert monitor["metadata"]["labels"]["release"] == "prom"
    # One PodMonitor for agents and router: both serve /metrics on the port named http.
    assert monitor["spec"]["selector"] == {
        "matchLabels": {"serving.drift.dev/llmservice": "chat"},
        "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["agent", "router"]}
        ],
    }
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "30s")
    assert endpoint["relabelings"][0]["targetLabel"] == "llmservice"
    assert _children({"monitoring": {"enabled": False}}).podmonitor is None
    assert _children({}, monitoring=False).podmonitor is None


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"model": {"source": "pvc", "claimName": "m", "path": "x"}, "resources": {"gpusPerReplica": 2}},
        {
            "model": {"source": "hostPath", "hostPath": "/d"},
            "resources": {"tolerations": [{"operator": "Exists"}]},
        },
    ],
)
def test_rendered_children_are_valid_kubernetes_objects(raw: dict[str, Any]) -> None:
    children = _children(raw)
    objects = [children.deployment, children.service, children.configmap, render_secret(OWNER, "t")]
    assert children.router is not None and children.agents_service is not None
    objects += [children.agents_service, *children.router.objects()]
    for obj in objects:
        kubernetes_validate.validate(yaml.safe_load(yaml.safe_dump(obj)), "1.30", strict=True)


def test_rendering_is_deterministic() -> None:
    raw = {"resources": {"gpusPerReplica": 1}, "env": [{"name": "A", "value": "1"}]}
    assert _children(raw) == _children(raw)


def test_an_engine_rule_the_agent_refuses_reads_cleanly() -> None:
    """A cross-field rule of the agent's EngineConfig has no field location: the message must not be
    garbled (": : Value error, ...")."""
    from drift_operator.render import render_engine_config
    from drift_operator.spec import SpecError, parse_spec

    spec = parse_spec({"engine": {"maxModelLen": 64, "maxNumBatchedTokens": 16, "blockSize": 32}})
    with pytest.raises(SpecError) as caught:
        render_engine_config(spec)
    assert str(caught.value) == (
        "engine settings rejected by the agent: max_num_batched_tokens must be at least block_size"
    )


def test_api_keys_come_from_the_secret_by_reference() -> None:
    """spec.auth.secretName: the agents read DRIFT_API_KEY through a secretKeyRef; no key is in the pod spec."""
    assert "DRIFT_API_KEY" not in str(_children({}).deployment)  # no auth unless asked for
    deployment = _children({"auth": {"secretName": "chat-keys"}}).deployment
    env = {e["name"]: e for e in _container(deployment)["env"]}
    assert env["DRIFT_API_KEY"] == {
        "name": "DRIFT_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "chat-keys", "key": "api-keys"}},
    }
    custom = _children({"auth": {"secretName": "chat-keys", "key": "keys.txt"}}).deployment
    assert {"name": "chat-keys", "key": "keys.txt"} in [
        e.get("valueFrom", {}).get("secretKeyRef") for e in _container(custom)["env"]
    ]
    assert all("value" not in e for e in _container(custom)["env"] if e["name"] == "DRIFT_API_KEY")


@pytest.mark.parametrize(
    "auth", [{"secretName": "Bad_Name"}, {"secretName": "keys", "key": ""}, {"secretName": "k", "key": "a/b"}]
)
def test_bad_auth_is_refused(auth: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="auth"):
        parse_spec({"auth": auth})
