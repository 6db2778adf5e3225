"""Render an LLMService's children (Deployment, Service, ConfigMap, Secret, PodMonitor) as plain dicts.

Pure: the same spec always renders the same objects, which is what makes reconciliation idempotent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from drift_agent.core.config import SLO_SETTINGS, EngineConfig
from drift_agent.server.settings import ServerSettings

from . import constants as c
from .partition import Steering
from .spec import LLMServiceSpec, SpecError

# Settings the agent accepts live through PUT /admin/policy: changing them must not restart pods, so they
# are left out of the config hash (the ConfigMap still carries them, for pods that start later).
RUNTIME_KEYS = frozenset({"policy", "partition", "slo_ttft_ms", "slo_tpot_ms"})


@dataclass(frozen=True)
class Owner:
    """The LLMService as its children's owner and namer."""

    name: str
    namespace: str
    uid: str
    api_version: str = c.API_VERSION
    kind: str = c.KIND

    def reference(self) -> dict[str, Any]:
        # controller=True makes the garbage collector delete children with the LLMService, and marks the
        # child as ours (a second controller reference would be rejected by the API server).
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _metadata(owner: Owner, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**c.common_labels(owner.name), **(extra_labels or {})},
        "ownerReferences": [owner.reference()],
    }


def model_path(spec: LLMServiceSpec) -> str | None:
    """Where the agent finds the Hugging Face directory inside its container; None for the embedded model."""
    model = spec.model
    if model.source == "embedded":
        return None
    if model.source == "image":
        return model.path
    return f"{c.MODEL_MOUNT}/{model.path}".rstrip("/") if model.path else c.MODEL_MOUNT


def render_engine_config(spec: LLMServiceSpec) -> dict[str, Any]:
    """The engine YAML (keys are EngineConfig fields), validated against the agent's own model."""
    config: dict[str, Any] = spec.engine.model_dump(exclude_none=True)
    # The runtime settings at the spec's starting point, as pushed later, under EngineConfig's keys.
    state = runtime_state(spec, Steering(spec.partition.prefill_sm_share, spec.partition.tpot_margin))
    config.update(
        policy=state["policy"],
        partition={**state["partition"], "backend": spec.partition.backend},
        **{SLO_SETTINGS[name]: value for name, value in state["slo"].items()},
    )
    if spec.model.served_model_name:
        config["served_model_name"] = spec.model.served_model_name
    try:
        # The model path travels as --model; validate with it so cross-field rules see the whole picture.
        EngineConfig.model_validate({**config, "model": model_path(spec)})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SpecError(
            f"engine settings rejected by the agent: {f'{loc}: ' if loc else ''}{message}"
        ) from exc
    return config


def runtime_state(spec: LLMServiceSpec, steering: Steering) -> dict[str, Any]:
    """Everything the agent can change without a restart: the spec's settings with the steered values, as the
    body of PUT /admin/policy (the agent's `PolicyUpdate`; `partition` keys are its `PartitionConfig` fields).
    engine.yaml carries the same, so pods that start later begin there."""
    return {
        "policy": spec.policy,
        "partition": {
            "mode": spec.partition.mode,
            "prefill_sm_share": round(steering.prefill_sm_share, 4),
            "tpot_margin": round(steering.tpot_margin, 4),
            "fold_max_tokens": spec.partition.fold_max_tokens,
        },
        "slo": {name: getattr(spec.slo, name) for name in SLO_SETTINGS},
    }


def engine_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=True)


def config_hash(config: dict[str, Any], spec: LLMServiceSpec) -> str:
    restart_only = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    restart_only["partition_backend"] = spec.partition.backend  # the partitioner is chosen at start-up
    restart_only["model"] = model_path(spec)
    digest = hashlib.sha256(json.dumps(restart_only, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def render_configmap(owner: Owner, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, c.configmap_name(owner.name)),
        "data": {c.ENGINE_CONFIG_FILE: engine_yaml(config)},
    }


def render_secret(owner: Owner, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, c.secret_name(owner.name)),
        "data": {c.ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def render_service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "type": "ClusterIP",
            "selector": c.selector_labels(owner.name),
            "ports": [
                {
                    "name": c.AGENT_PORT_NAME,
                    "port": c.AGENT_PORT,
                    "targetPort": c.AGENT_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def _quantities(values: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def _container_resources(spec: LLMServiceSpec) -> dict[str, Any]:
    requests = _quantities(spec.resources.requests)
    limits = _quantities(spec.resources.limits)
    if spec.resources.gpus_per_replica > 0:
        # Extended resources are requested through limits (requests default to them and must be equal).
        limits[spec.resources.gpu_resource_name] = str(spec.resources.gpus_per_replica)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _http_probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": c.AGENT_PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _command(spec: LLMServiceSpec) -> list[str]:
    command = ["drift", "serve", "--host", "0.0.0.0", "--port", str(c.AGENT_PORT)]
    command += ["--admin-port", str(c.AGENT_ADMIN_PORT)]
    command += ["--config", f"{c.ENGINE_CONFIG_DIR}/{c.ENGINE_CONFIG_FILE}"]
    path = model_path(spec)
    if path is not None:
        command += ["--model", path]
    return command


def _env(owner: Owner, spec: LLMServiceSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": c.ADMIN_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": c.secret_name(owner.name), "key": c.ADMIN_TOKEN_KEY}},
        },
        # The root filesystem is read-only: every cache goes to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    for var in spec.env:  # user variables last: for duplicates, Kubernetes uses the last one
        item: dict[str, Any] = {"name": var.name}
        if var.value is not None:
            item["value"] = var.value
        if var.value_from is not None:
            item["valueFrom"] = var.value_from
        env.append(item)
    return env


def _volumes(owner: Owner, spec: LLMServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "engine-config", "configMap": {"name": c.configmap_name(owner.name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "engine-config", "mountPath": c.ENGINE_CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.model.source == "pvc":
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": spec.model.claim_name, "readOnly": True}}
        )
        mounts.append({"name": "model", "mountPath": c.MODEL_MOUNT, "readOnly": True})
    elif spec.model.source == "hostPath":
        volumes.append({"name": "model", "hostPath": {"path": spec.model.host_path, "type": "Directory"}})
        mounts.append({"name": "model", "mountPath": c.MODEL_MOUNT, "readOnly": True})
    if spec.resources.gpus_per_replica > 0:
        # CUDA IPC and the MPS client use shared memory; the default 64 MiB /dev/shm is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def render_deployment(
    owner: Owner, spec: LLMServiceSpec, replicas: int, config_digest: str
) -> dict[str, Any]:
    volumes, mounts = _volumes(owner, spec)
    container: dict[str, Any] = {
        "name": c.AGENT_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": _command(spec),
        "ports": [
            {"name": c.AGENT_PORT_NAME, "containerPort": c.AGENT_PORT, "protocol": "TCP"},
            {"name": c.AGENT_ADMIN_PORT_NAME, "containerPort": c.AGENT_ADMIN_PORT, "protocol": "TCP"},
        ],
        "env": _env(owner, spec),
        "readinessProbe": _http_probe("/ready", period=5, failures=3, timeout=2),
        "livenessProbe": _http_probe("/health", period=10, failures=3, timeout=5),
        # Loading weights can take minutes; the startup probe holds liveness off until /health answers.
        "startupProbe": _http_probe("/health", period=10, failures=90, timeout=5),
        "resources": _container_resources(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the agent never talks to the API server
        # SIGTERM drains running requests first: the kubelet must wait for the agent's worst case.
        "terminationGracePeriodSeconds": math.ceil(
            ServerSettings().worst_case_shutdown_s + c.SHUTDOWN_MARGIN_S
        ),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations
        ]
    if spec.resources.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.resources.runtime_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]

    gpu = spec.resources.gpus_per_replica > 0
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": c.selector_labels(owner.name)},
            # With GPUs a surge pod usually has no free GPU to land on, so replace in place instead.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}
                if gpu
                else {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": c.common_labels(owner.name),
                    "annotations": {c.ANNOTATION_CONFIG_HASH: config_digest},
                },
                "spec": pod_spec,
            },
        },
    }


def render_podmonitor(owner: Owner, spec: LLMServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": f"{c.MONITORING_GROUP}/{c.MONITORING_VERSION}",
        "kind": "PodMonitor",
        "metadata": _metadata(owner, owner.name, spec.monitoring.labels),
        "spec": {
            "selector": {"matchLabels": c.selector_labels(owner.name)},
            "podMetricsEndpoints": [
                {
                    "port": c.AGENT_PORT_NAME,
                    "path": "/metrics",
                    "interval": spec.monitoring.scrape_interval,
                    # The `llmservice` label lets dashboards, alerts and the operator's Prometheus queries
                    # group series by service without parsing pod names.
                    "relabelings": [
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_serving_drift_dev_llmservice"],
                            "targetLabel": "llmservice",
                        }
                    ],
                }
            ],
        },
    }


def deployment_replicas(spec: LLMServiceSpec, owner_of_replicas: str) -> int:
    """The Deployment's replica count. The operator's own decisions stay within [min, max]; an external
    autoscaler's value is taken as written (KEDA may legitimately scale to zero)."""
    if owner_of_replicas == "external":
        return spec.replicas
    return max(spec.scaling.min_replicas, min(spec.scaling.max_replicas, spec.replicas))


@dataclass(frozen=True)
class Children:
    configmap: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]
    podmonitor: dict[str, Any] | None


def render_children(
    owner: Owner, spec: LLMServiceSpec, owner_of_replicas: str, with_podmonitor: bool
) -> Children:
    """Everything but the Secret (whose token is generated once and never re-rendered)."""
    config = render_engine_config(spec)
    return Children(
        configmap=render_configmap(owner, config),
        deployment=render_deployment(
            owner, spec, deployment_replicas(spec, owner_of_replicas), config_hash(config, spec)
        ),
        service=render_service(owner),
        podmonitor=render_podmonitor(owner, spec) if with_podmonitor and spec.monitoring.enabled else None,
    )
