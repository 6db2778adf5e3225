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


def _service_component(namespace: str) -> str | None:
    live = get_obj("service", NAME, namespace) or {}
    return live.get("spec", {}).get("selector", {}).get("app.kubernetes.io/component")


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

    # Clients keep the Service's name and port. No router pod is ready yet: it still selects the agents
    # (checked over several reconciles). The agents: a headless Service.
    service = kids["service"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]
    for _ in range(3):
        time.sleep(1.0)  # the operator's interval is 1 s: each sleep spans a reconcile
        live = get_obj("service", NAME, namespace)
        assert live["spec"]["selector"]["app.kubernetes.io/component"] == "agent", live["spec"]
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
    # One router pod ready (the Deployment controller counted it): the client Service turns to the router.
    wait_for(
        lambda: _service_component(namespace) == "router",
        CONVERGE_S,
        message=lambda: f"the Service on the router once one is ready\n{op.log_tail()}",
    )

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

    # On again: rendered anew; the Service follows once a router pod is ready again.
    kubectl(
        "patch", "llms", NAME, "-n", namespace, "--type=merge", "-p", '{"spec":{"router":{"enabled":true}}}'
    )
    old = {p["metadata"]["name"] for p in pods}
    pods = wait_for(
        lambda: [p for p in list_items("pods", namespace, selector) if p["metadata"]["name"] not in old],
        CONVERGE_S,
        message="router pods created again",
    )
    assert _service_component(namespace) == "agent"
    _mark_ready(namespace, pods[0]["metadata"]["name"])
    wait_for(
        lambda: _service_component(namespace) == "router",
        CONVERGE_S,
        message=lambda: f"the router back\n{op.log_tail()}",
    )
    forbidden = [line for line in op.log_text().splitlines() if "forbidden" in line.lower()]
    assert not forbidden, "\n".join(forbidden[:5])
    op.assert_alive()


def _host_ip() -> str | None:
    """This machine's first non-loopback IPv4 address (EndpointSlice validation refuses loopback ones)."""
    import ipaddress
    import subprocess

    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.split():
        try:
            ip = ipaddress.ip_address(word)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback and not ip.is_link_local:
            return word
    return None


def _endpoint_slice(name: str, service: str, ip: str, port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_router_discovers_real_agents_through_endpoint_slices_and_follows_changes(
    namespace: str, tmp_path: Any
) -> None:
    """`drift router --discover NS/SVC` as a process with the kubeconfig, in front of two real agents on this
    machine's address: the EndpointSlices (written by the test, as the endpointslice controller would for
    ready pods) decide the backends; taking one agent's endpoint out (not ready) and back is followed live."""
    import httpx

    from tests.router.conftest import spawn, wait_ready
    from tests.tiny_models import tiny_model_dir

    ip = _host_ip()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    args = ["serve", "--model", str(tiny_model_dir("llama")), "--served-model-name", "tiny",
            "--num-kv-blocks", "64", "--num-threads", "1", "--no-access-log"]  # fmt: skip
    agents = [spawn(args, tmp_path / f"agent{i}.log", host=ip) for i in range(2)]
    router = None
    try:
        for a in agents:
            wait_ready(a)
        ports = [int(a.url.rsplit(":", 1)[1]) for a in agents]
        apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "agents", "namespace": namespace},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 8000}]},  # no selector
            }
        )
        apply(
            [_endpoint_slice(f"agents-{i}", "agents", ip, p) for i, p in enumerate(ports)],
            namespace=namespace,
        )
        router = spawn(
            ["router", "--discover", f"{namespace}/agents", "--discover-port", "http", "--policy", "round-robin",
             "--poll-interval-ms", "20"],
            tmp_path / "router.log",
        )  # fmt: skip
        wait_ready(router, timeout=60)

        def backends() -> set[str]:
            data = httpx.get(f"{router.url}/backends", timeout=5).json()["backends"]
            return {b["url"] for b in data if b["routable"]}

        def used(n: int) -> set[str]:
            out = set()
            for _ in range(n):
                r = httpx.post(
                    f"{router.url}/v1/completions",
                    json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                out.add(r.headers["x-drift-backend"])
            return out

        urls = {a.url for a in agents}
        wait_for(
            lambda: backends() == urls,
            30,
            message=lambda: f"both agents discovered\n{router.log.read_text()}",
        )
        assert used(4) == urls
        # The second agent's endpoint turns not ready (a failing probe): the router stops using it.
        apply(_endpoint_slice("agents-1", "agents", ip, ports[1], ready=False), namespace=namespace)
        wait_for(lambda: backends() == {agents[0].url}, 30, message="the unready agent left")
        assert used(4) == {agents[0].url}
        # Ready again, then its slice deleted: followed both ways.
        apply(_endpoint_slice("agents-1", "agents", ip, ports[1]), namespace=namespace)
        wait_for(lambda: backends() == urls, 30, message="the agent came back")
        assert used(4) == urls
        kubectl("delete", "endpointslice", "agents-1", "-n", namespace)
        wait_for(lambda: backends() == {agents[0].url}, 30, message="the deleted slice's agent left")
    finally:
        if router is not None:
            router.stop()
        for a in agents:
            a.stop()
