"""Render an LLMService's children (Deployments, Services, ConfigMap, Secret, router RBAC, PodMonitor).

Pure: the same spec always renders the same objects, which is what makes reconciliation idempotent.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml
from pydantic import ValidationError

from drift_agent.core.config import SLO_SETTINGS, EngineConfig
from drift_agent.router import worst_case_shutdown_s as router_worst_case_shutdown_s
from drift_agent.server.settings import ServerSettings

from . import constants as c
from .diff import parse_quantity
from .partition import Steering
from .spec import LLMServiceSpec, SpecError

# Settings the agent accepts live through PUT /admin/policy: changing them must not restart pods, so they
# are left out of the config hash (the ConfigMap still carries them, for pods that start later).
RUNTIME_KEYS = frozenset({"policy", "partition", "slo_ttft_ms", "slo_tpot_ms", "fairness", "preemption_mode"})
_GIB = Decimal(2) ** 30

_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
_CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
# Used when spec.router.resources is empty: a proxy's footprint, not an agent's.
ROUTER_DEFAULT_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"memory": "1Gi"},
}
ENDPOINTSLICE_RULE: dict[str, Any] = {
    "apiGroups": ["discovery.k8s.io"],
    "resources": ["endpointslices"],
    "verbs": ["get", "list", "watch"],
}


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


def _metadata(
    owner: Owner,
    name: str,
    extra_labels: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**(labels or c.common_labels(owner.name)), **(extra_labels or {})},
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
        fairness=state["fairness"],
        preemption_mode=state["preemption_mode"],
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
        "fairness": spec.engine.fairness,
        "preemption_mode": spec.engine.preemption_mode,
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


def _http_service_port() -> dict[str, Any]:
    return {
        "name": c.AGENT_PORT_NAME,
        "port": c.AGENT_PORT,
        "targetPort": c.AGENT_PORT_NAME,
        "protocol": "TCP",
        "appProtocol": "http",
    }


def render_service(owner: Owner, router: bool = False) -> dict[str, Any]:
    """The client-facing Service: same name and port whatever is behind it, so clients never change; it
    selects the router's pods when the router is on, the agents' otherwise."""
    selector = c.router_selector_labels(owner.name) if router else c.selector_labels(owner.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name),
        "spec": {"type": "ClusterIP", "selector": selector, "ports": [_http_service_port()]},
    }


def render_agents_service(owner: Owner) -> dict[str, Any]:
    """The agents' headless Service: no virtual IP (the router balances per request itself); its
    EndpointSlices, kept by the endpointslice controller from the agents' readiness, are the router's
    backends."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, c.agents_service_name(owner.name)),
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "None",
            "selector": c.selector_labels(owner.name),
            "ports": [_http_service_port()],
        },
    }


def _quantities(values: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def _format_bytes(value: Decimal) -> str:
    """Bytes as a quantity, in the largest binary unit that holds them exactly (fractions round up)."""
    total = math.ceil(value)
    for suffix, unit in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if total % unit == 0:
            return f"{total // unit}{suffix}"
    return str(total)


def _plus_host_tier(spec: LLMServiceSpec, values: dict[str, str], kind: str, *, add_if_unset: bool) -> None:
    """Add the host KV tier (`engine.swapSpaceGb`; pinned on CUDA, so it counts against the cgroup) to the
    container's memory `kind` ("requests"/"limits"): the user's value is what everything else needs."""
    tier = Decimal(str(spec.engine.swap_space_gb)) * _GIB
    if tier <= 0 or ("memory" not in values and not add_if_unset):
        return
    base = parse_quantity(values.get("memory", 0))
    if base is None:
        raise SpecError(f"spec.resources.{kind}.memory: {values['memory']!r} is not a quantity")
    values["memory"] = _format_bytes(base + tier)


def _container_resources(spec: LLMServiceSpec) -> dict[str, Any]:
    requests = _quantities(spec.resources.requests)
    limits = _quantities(spec.resources.limits)
    # The request always reserves the tier; a limit grows only where there is one (none: unbounded). An
    # unset request defaults to the limit, so with only a limit the request is the limit, tier included.
    _plus_host_tier(spec, limits, "limits", add_if_unset=False)
    _plus_host_tier(spec, requests, "requests", add_if_unset="memory" not in limits)
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
    if spec.auth.secret_name:
        # By reference: the keys stay in the Secret; a missing Secret or key keeps the pod from starting
        # (CreateContainerConfigError) rather than serving without authentication.
        env.append(
            {
                "name": c.API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": spec.auth.secret_name, "key": spec.auth.key}},
            }
        )
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
        "securityContext": copy.deepcopy(_CONTAINER_SECURITY_CONTEXT),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(_POD_SECURITY_CONTEXT),
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


def _router_metadata(owner: Owner) -> dict[str, Any]:
    return _metadata(owner, c.router_name(owner.name), labels=c.router_labels(owner.name))


def render_router_serviceaccount(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _router_metadata(owner)}


def render_router_role(owner: Owner) -> dict[str, Any]:
    # EndpointSlice names are generated, so resourceNames cannot narrow this; the namespace does.
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _router_metadata(owner),
        "rules": [copy.deepcopy(ENDPOINTSLICE_RULE)],
    }


def render_router_rolebinding(owner: Owner) -> dict[str, Any]:
    name = c.router_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _router_metadata(owner),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def router_command(owner: Owner, spec: LLMServiceSpec) -> list[str]:
    return [
        "drift", "router", "--host", "0.0.0.0", "--port", str(c.AGENT_PORT),
        "--discover", f"{owner.namespace}/{c.agents_service_name(owner.name)}",
        "--discover-port", c.AGENT_PORT_NAME,
        "--policy", spec.router.policy,
    ]  # fmt: skip


def _router_resources(spec: LLMServiceSpec) -> dict[str, Any]:
    requests = _quantities(spec.router.resources.requests)
    limits = _quantities(spec.router.resources.limits)
    if not requests and not limits:
        return copy.deepcopy(ROUTER_DEFAULT_RESOURCES)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def render_router_deployment(owner: Owner, spec: LLMServiceSpec) -> dict[str, Any]:
    """`drift router` from the agent image, on the agents' port and port name (so the client Service and the
    PodMonitor treat both alike), reading backends from the agents' headless Service."""
    name = c.router_name(owner.name)
    container: dict[str, Any] = {
        "name": c.ROUTER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": router_command(owner, spec),
        "ports": [{"name": c.AGENT_PORT_NAME, "containerPort": c.AGENT_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "readinessProbe": _http_probe("/ready", period=5, failures=3, timeout=2),
        "livenessProbe": _http_probe("/health", period=10, failures=3, timeout=5),
        "resources": _router_resources(spec),
        "securityContext": copy.deepcopy(_CONTAINER_SECURITY_CONTEXT),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": name,
        "automountServiceAccountToken": True,  # it watches EndpointSlices
        "securityContext": copy.deepcopy(_POD_SECURITY_CONTEXT),
        "enableServiceLinks": False,
        # On SIGTERM the router drains (/ready 503, still serving while it leaves the endpoints; no preStop
        # needed), then lets open streams finish: they last no longer than an agent's own drain.
        "terminationGracePeriodSeconds": math.ceil(
            max(ServerSettings().worst_case_shutdown_s, router_worst_case_shutdown_s()) + c.SHUTDOWN_MARGIN_S
        ),
        # Replicas on different nodes, so one node's loss does not take the front door down.
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": c.router_selector_labels(owner.name)},
                        },
                    }
                ]
            }
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _router_metadata(owner),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": c.router_selector_labels(owner.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": c.router_labels(owner.name)}, "spec": pod_spec},
        },
    }


def render_podmonitor(owner: Owner, spec: LLMServiceSpec) -> dict[str, Any]:
    # Agents and router: both serve /metrics on the port named "http".
    return {
        "apiVersion": f"{c.MONITORING_GROUP}/{c.MONITORING_VERSION}",
        "kind": "PodMonitor",
        "metadata": _metadata(owner, owner.name, spec.monitoring.labels),
        "spec": {
            "selector": {
                "matchLabels": {c.LABEL_SERVICE: owner.name},
                "matchExpressions": [
                    {"key": c.LABEL_COMPONENT, "operator": "In", "values": [c.COMPONENT, c.ROUTER_COMPONENT]}
                ],
            },
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
class RouterChildren:
    """In apply order: the identity and its grant before the pods that use them."""

    serviceaccount: dict[str, Any]
    role: dict[str, Any]
    rolebinding: dict[str, Any]
    deployment: dict[str, Any]

    def objects(self) -> list[dict[str, Any]]:
        return [self.serviceaccount, self.role, self.rolebinding, self.deployment]


@dataclass(frozen=True)
class Children:
    configmap: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]  # client-facing: the router's pods when there is a router, else the agents'
    podmonitor: dict[str, Any] | None
    agents_service: dict[str, Any] | None = None
    router: RouterChildren | None = None  # None: the router is off (ours, if any, is deleted)


def render_children(
    owner: Owner, spec: LLMServiceSpec, owner_of_replicas: str, with_podmonitor: bool
) -> Children:
    """Everything but the Secret (whose token is generated once and never re-rendered)."""
    config = render_engine_config(spec)
    router = spec.router_enabled
    return Children(
        configmap=render_configmap(owner, config),
        deployment=render_deployment(
            owner, spec, deployment_replicas(spec, owner_of_replicas), config_hash(config, spec)
        ),
        service=render_service(owner, router=router),
        podmonitor=render_podmonitor(owner, spec) if with_podmonitor and spec.monitoring.enabled else None,
        agents_service=render_agents_service(owner),
        router=RouterChildren(
            serviceaccount=render_router_serviceaccount(owner),
            role=render_router_role(owner),
            rolebinding=render_router_rolebinding(owner),
            deployment=render_router_deployment(owner, spec),
        )
        if router
        else None,
    )
