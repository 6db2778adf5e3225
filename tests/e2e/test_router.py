"""The router the operator deploys in front of the agents, on a real control plane: Deployment, Services,
RBAC (checked by the API server's own authorizer), status, and switching it off.

No kubelet: the test marks a router pod Ready itself (what the kubelet would write once /ready answers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from .kube import (
    LLMS,
    OperatorProcess,
    apply,
    condition,
    get_obj,
    kubectl,
    list_items,
    llmservice,
    owned_by,
    reconciled,
    wait_for,
)

pytestmark = pytest.mark.e2e

NAME = "chat"
FIRST_RECONCILE_S = 150.0
CONVERGE_S = 30.0
ROUTER_KINDS = ("deployment", "serviceaccount", "role", "rolebinding")


def _router_condition(namespace: str) -> dict[str, Any]:
    return condition(get_obj(LLMS, NAME, namespace), "RouterReady") or {}


def _mark_ready(namespace: str, pod: str) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "phase": "Running",
        "podIP": "10.244.1.10",
        "podIPs": [{"ip": "10.244.1.10"}],
        "startTime": now,
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ],
    }
    kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))  # fmt: skip


def _can(namespace: str, verb: str, resource: str) -> bool:
    user = f"system:serviceaccount:{namespace}:{NAME}-router"
    out = kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", user, check=False)
    return out.strip() == "yes"


def test_router_rendered_reported_and_switched_off(
    namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    apply(llmservice(NAME, namespace, {"scaling": {"maxReplicas": 3}, "router": {"policy": "least-kv"}}))
    op = operator(namespace)
    obj, kids = wait_for(
        lambda: reconciled(NAME, namespace), FIRST_RECONCILE_S, message=lambda: f"reconciled\n{op.log_tail()}"
    )
    uid = obj["metadata"]["uid"]

    # The router: its Deployment from the agent image, its identity and grant, all owned by the LLMService.
    router = {kind: get_obj(kind, f"{NAME}-router", namespace) for kind in ROUTER_KINDS}
    assert all(owned_by(o, uid) for o in router.values()), router
    container = router["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == kids["deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["command"] == [
        "drift", "router", "--host", "0.0.0.0", "--port", "8000",
        "--discover", f"{namespace}/{NAME}-agents", "--discover-port", "http", "--policy", "least-kv",
    ]  # fmt: skip
    assert router["deployment"]["spec"]["replicas"] == 2
    assert router["deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == f"{NAME}-router"
    # The API server's authorizer: the router may read EndpointSlices in its namespace, and nothing else.
    assert _can(namespace, "watch", "endpointslices.discovery.k8s.io")
    assert _can(namespace, "list", "endpointslices.discovery.k8s.io")
    assert not _can(namespace, "list", "pods") and not _can(namespace, "get", "secrets")

    # Clients keep the Service's name and port; behind it now the router. The agents: a headless Service.
    service = kids["service"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]
    agents = get_obj("service", f"{NAME}-agents", namespace)
    assert owned_by(agents, uid) and agents["spec"]["clusterIP"] == "None"
    assert agents["spec"]["selector"]["app.kubernetes.io/component"] == "agent"

    # Status: the router's pods are Pending (no kubelet) until the test marks one Ready.
    wait_for(
        lambda: _router_condition(namespace).get("reason") == "NoRouterReplicasReady",
        CONVERGE_S,
        message=lambda: f"RouterReady=False NoRouterReplicasReady\n{op.log_tail()}",
    )
    selector = "serving.drift.dev/llmservice=chat,app.kubernetes.io/component=router"
    pods = wait_for(
        lambda: list_items("pods", namespace, selector), CONVERGE_S, message="router pods created"
    )
    assert all(p["spec"]["serviceAccountName"] == f"{NAME}-router" for p in pods)
    _mark_ready(namespace, pods[0]["metadata"]["name"])
    wait_for(
        lambda: _router_condition(namespace).get("status") == "True",
        CONVERGE_S,
        message=lambda: f"RouterReady=True once a router pod is Ready\n{op.log_tail()}",
    )
    status = get_obj(LLMS, NAME, namespace)["status"]
    assert status["router"] == {"enabled": True, "policy": "least-kv", "replicas": 2, "readyReplicas": 1}
    assert _router_condition(namespace)["message"] == "1/2 router replicas ready"

    # Off: the client Service selects the agents again, and the router's objects are deleted.
    kubectl(
        "patch", "llms", NAME, "-n", namespace, "--type=merge", "-p", '{"spec":{"router":{"enabled":false}}}'
    )

    def direct() -> bool:
        live = get_obj("service", NAME, namespace)
        return bool(
            live
            and live["spec"]["selector"].get("app.kubernetes.io/component") == "agent"
            and not any(get_obj(kind, f"{NAME}-router", namespace) for kind in ROUTER_KINDS)
            and _router_condition(namespace).get("reason") == "RouterDisabled"
        )

    wait_for(
        direct, CONVERGE_S, message=lambda: f"the Service back on the agents, no router\n{op.log_tail()}"
    )
    assert get_obj(LLMS, NAME, namespace)["status"]["router"] == {"enabled": False}
    assert get_obj("service", f"{NAME}-agents", namespace) is not None
    assert get_obj("deployment", NAME, namespace) is not None

    # On again: rendered anew, and the Service follows.
    kubectl(
        "patch", "llms", NAME, "-n", namespace, "--type=merge", "-p", '{"spec":{"router":{"enabled":true}}}'
    )
    wait_for(
        lambda: (
            (get_obj("service", NAME, namespace) or {})
            .get("spec", {})
            .get("selector", {})
            .get("app.kubernetes.io/component")
            == "router"
            and get_obj("deployment", f"{NAME}-router", namespace) is not None
        ),
        CONVERGE_S,
        message=lambda: f"the router back\n{op.log_tail()}",
    )
    forbidden = [line for line in op.log_text().splitlines() if "forbidden" in line.lower()]
    assert not forbidden, "\n".join(forbidden[:5])
    op.assert_alive()
