"""Names shared by the CRD, the rendered children and the handlers (one place, so they cannot drift apart)."""

from __future__ import annotations

GROUP = "serving.drift.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "llmservices"
KIND = "LLMService"

DEFAULT_IMAGE = "ghcr.io/drift-serving/drift-agent:0.1.0"

# The agent's HTTP contract: one port serving the OpenAI API, /health, /ready, /metrics and /admin/*.
AGENT_PORT = 8000
AGENT_PORT_NAME = "http"
# The admin API on its own port (`drift serve --admin-port`), not behind the Service: a NetworkPolicy can
# admit only the operator to it.
AGENT_ADMIN_PORT = 8001
AGENT_ADMIN_PORT_NAME = "admin"
# Beyond the agent's worst-case shutdown (drain deadline, flush, uvicorn), for the engine and process exit.
SHUTDOWN_MARGIN_S = 10
AGENT_CONTAINER = "agent"
ENGINE_CONFIG_DIR = "/etc/drift"
ENGINE_CONFIG_FILE = "engine.yaml"
MODEL_MOUNT = "/models"
ADMIN_TOKEN_ENV = "DRIFT_ADMIN_TOKEN"
ADMIN_TOKEN_KEY = "token"
API_KEY_ENV = "DRIFT_API_KEY"  # the agents' API keys (spec.auth), comma-separated

# Labels: the recommended app.kubernetes.io set plus our own key that selects one LLMService's pods.
LABEL_SERVICE = f"{GROUP}/llmservice"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
APP_NAME = "drift-agent"
COMPONENT = "agent"
ROUTER_APP_NAME = "drift-router"
ROUTER_COMPONENT = "router"
ROUTER_CONTAINER = "router"
MANAGER = "drift-operator"

# Annotations.
ANNOTATION_REPLICAS_OWNER = f"{GROUP}/replicas-owner"  # "external": an HPA/KEDA owns spec.replicas
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"  # restarts pods when restart-only engine settings change
ANNOTATION_LAST_APPLIED = f"{GROUP}/last-applied"  # what we last applied, so removed fields get removed

FINALIZER = f"{GROUP}/finalizer"

# Prometheus Operator resources (created only when their CRDs are served).
MONITORING_GROUP = "monitoring.coreos.com"
MONITORING_VERSION = "v1"

# Bound on status.lastDecisions so the object stays small.
MAX_DECISIONS = 10
# Bound on status.replicaStatus entries.
MAX_REPLICA_STATUS = 32


def configmap_name(name: str) -> str:
    return f"{name}-engine"


def secret_name(name: str) -> str:
    return f"{name}-admin-token"


def agents_service_name(name: str) -> str:
    """The agents' headless Service: what the router discovers backends through (its EndpointSlices)."""
    return f"{name}-agents"


def router_name(name: str) -> str:
    """The router's Deployment, ServiceAccount, Role and RoleBinding."""
    return f"{name}-router"


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment's (immutable) selector: kept minimal so later label additions never need a re-create."""
    return {LABEL_SERVICE: name, LABEL_COMPONENT: COMPONENT}


def selector_string(name: str) -> str:
    """The same selector as a string: the scale subresource's labelSelectorPath must point at one."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def common_labels(name: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: COMPONENT,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_PART_OF: "drift",
        LABEL_SERVICE: name,
    }


def router_selector_labels(name: str) -> dict[str, str]:
    return {LABEL_SERVICE: name, LABEL_COMPONENT: ROUTER_COMPONENT}


def router_labels(name: str) -> dict[str, str]:
    return {**common_labels(name), LABEL_NAME: ROUTER_APP_NAME, LABEL_COMPONENT: ROUTER_COMPONENT}
