"""Router discovery: `ready_urls` on EndpointSlice JSON, the watch loop's recovery with a scripted API, and
the real thing against a control plane (e2e: a Service, pods marked Ready by the test, the endpointslice
controller in between)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from drift_agent.router import discovery
from drift_agent.router.discovery import ready_urls, watch_endpoints


def _slice(
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
    name: str = "s",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


def _ep(*addresses: str, **conditions: Any) -> dict[str, Any]:
    return {"addresses": list(addresses), "conditions": conditions}


def test_ready_urls_keeps_ready_and_drops_not_ready_and_terminating() -> None:
    slices = [
        _slice(
            [
                _ep("10.0.0.2", ready=True),
                _ep("10.0.0.1"),  # ready unset: ready
                _ep("10.0.0.3", ready=False),
                _ep("10.0.0.4", ready=True, terminating=True),
                _ep("10.0.0.5", ready=None, serving=True),
            ]
        ),
        _slice([_ep("10.0.1.1", ready=True)], name="s2"),
    ]
    assert ready_urls(slices, "http") == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://10.0.0.5:8000",
        "http://10.0.1.1:8000",
    ]


def test_ready_urls_resolves_the_port_by_name_or_number() -> None:
    ports = [{"name": "admin", "port": 8001}, {"name": "http", "port": 9000}]
    slices = [_slice([_ep("10.0.0.1")], ports=ports)]
    assert ready_urls(slices, "http") == ["http://10.0.0.1:9000"]
    assert ready_urls(slices, "admin") == ["http://10.0.0.1:8001"]
    assert ready_urls(slices, 8001) == ready_urls(slices, "8001") == ["http://10.0.0.1:8001"]
    assert ready_urls(slices, "metrics") == [] and ready_urls(slices, 7000) == []
    # A slice listing no ports (all ports): a number stands as given, a name cannot be resolved.
    bare = [_slice([_ep("10.0.0.1")], ports=[])]
    assert ready_urls(bare, 8000) == ["http://10.0.0.1:8000"] and ready_urls(bare, "http") == []


def test_ready_urls_brackets_ipv6_and_deduplicates() -> None:
    slices = [
        _slice([_ep("fd00::1"), _ep("fd00::2", ready=False)], address_type="IPv6", name="v6"),
        _slice([_ep("10.0.0.1")], name="a"),
        _slice([_ep("10.0.0.1")], name="b"),  # the same pod in two slices (during a slice rebalance)
        _slice([{"addresses": ["10.0.0.9"]}], name="c"),  # no conditions at all: ready
        {"metadata": {"name": "empty"}, "addressType": "IPv4", "ports": None, "endpoints": None},
    ]
    assert ready_urls(slices, "http") == [
        "http://10.0.0.1:8000",
        "http://10.0.0.9:8000",
        "http://[fd00::1]:8000",
    ]


class _Listed:
    def __init__(self, items: list[dict[str, Any]], version: str) -> None:
        self.data = json.dumps({"metadata": {"resourceVersion": version}, "items": items}).encode()


class _ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"{status}")
        self.status = status
        self.reason = "scripted"


def test_watch_loop_recovers_from_errors_and_expiry_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    """List fails (reconnect with backoff), a watch expires (re-list), then a watch event: every distinct
    backend list reaches the callback once, and `stop` ends the loop."""
    monkeypatch.setattr(discovery, "_BACKOFF_MIN_S", 0.01)
    lists: list[Any] = [
        _ApiError(500),
        _Listed([_slice([_ep("10.0.0.1")], name="a")], "5"),
        _Listed([_slice([_ep("10.0.0.1"), _ep("10.0.0.2")], name="a")], "9"),
    ]

    class Api:
        calls = 0

        def list_namespaced_endpoint_slice(self, namespace: str, **kwargs: Any) -> Any:
            assert namespace == "ns" and kwargs["label_selector"] == "kubernetes.io/service-name=agents"
            Api.calls += 1
            item = lists.pop(0) if lists else lists_exhausted()
            if isinstance(item, Exception):
                raise item
            return item

    def lists_exhausted() -> Any:
        raise AssertionError("listed more often than scripted")

    stop = threading.Event()
    watches: list[str | None] = []

    def fake_watch_once(api: Any, namespace: str, selector: str, version: str | None, slices: Any,
                        publish: Any, stop_: threading.Event) -> str | None:  # fmt: skip
        watches.append(version)
        if len(watches) == 1:
            raise discovery._Expired
        if len(watches) == 2:
            raise _ApiError(503)  # a dropped watch: reconnect (re-list) after a backoff
        slices.pop("a", None)  # a DELETED event
        publish()
        stop_.set()
        return version

    monkeypatch.setattr(discovery, "_watch_once", fake_watch_once)
    lists.append(_Listed([_slice([_ep("10.0.0.1"), _ep("10.0.0.2")], name="a")], "12"))
    seen: list[list[str]] = []
    watch_endpoints("ns", "agents", "http", seen.append, stop, api=Api())
    assert watches == ["5", "9", "12"]
    assert seen == [
        ["http://10.0.0.1:8000"],
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],  # the re-list after expiry found a new pod
        [],  # the unchanged re-list after the dropped watch was not repeated
    ]


def test_a_failing_callback_does_not_end_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()

    class Api:
        def list_namespaced_endpoint_slice(self, namespace: str, **kwargs: Any) -> Any:
            return _Listed([_slice([_ep("10.0.0.1")])], "1")

    def fake_watch_once(*args: Any) -> str | None:
        args[-1].set()
        return None

    monkeypatch.setattr(discovery, "_watch_once", fake_watch_once)

    def broken(urls: list[str]) -> None:
        raise ValueError("consumer bug")

    watch_endpoints("ns", "agents", 8000, broken, stop, api=Api())  # returns, does not raise


# --- against a real control plane ---------------------------------------------------------------------------


def _cluster_skip_reason() -> str | None:
    from tests.e2e.kube import cluster_skip_reason

    return cluster_skip_reason()


@pytest.fixture
def k8s_namespace() -> Iterator[str]:
    reason = _cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    from tests.e2e.kube import kubectl, run_kubectl

    name = f"e2e-discovery-{uuid.uuid4().hex[:5]}"
    kubectl("create", "namespace", name)
    # The endpointslice controller skips a pod whose node does not exist: a Node object stands in (no kubelet).
    kubectl(
        "create",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
    )
    yield name
    run_kubectl("delete", "namespace", name, "--wait=false")
    run_kubectl("delete", "node", name, "--wait=false")


def _pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "discovery-agent"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "agent", "image": "drift-agent", "ports": [{"name": "http", "containerPort": 8000}]}
            ],
        },
    }


def _set_ready(namespace: str, pod: str, ip: str, ready: bool = True) -> None:
    """What the kubelet would write (there is none): Running, with an IP, Ready or not."""
    from tests.e2e.kube import kubectl

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    flag = "True" if ready else "False"
    status = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ],
    }
    kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))  # fmt: skip


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_watch_follows_scale_out_readiness_scale_in_and_restarts_on_a_real_cluster(
    k8s_namespace: str,
) -> None:
    from tests.e2e.kube import apply, kubectl, wait_for

    ns = k8s_namespace
    apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "agents", "namespace": ns},
            "spec": {
                "clusterIP": "None",
                "selector": {"app": "discovery-agent"},
                "ports": [{"name": "http", "port": 8000, "targetPort": "http"}],
            },
        }
    )
    seen: list[list[str]] = []
    lock = threading.Lock()

    def on_change(urls: list[str]) -> None:
        with lock:
            seen.append(urls)

    def latest() -> list[str] | None:
        with lock:
            return seen[-1] if seen else None

    def expect(urls: list[str], what: str) -> None:
        wait_for(
            lambda: latest() == urls, 30, message=lambda: f"{what}: expected {urls}, calls so far {seen}"
        )

    stop = threading.Event()
    thread = threading.Thread(
        target=watch_endpoints, args=(ns, "agents", "http", on_change, stop), daemon=True
    )
    thread.start()
    try:
        expect([], "no pods yet: an empty list right after the first list")

        apply([_pod("a-1", ns), _pod("a-2", ns)], namespace=ns)
        _set_ready(ns, "a-1", "10.244.0.11")
        expect(["http://10.244.0.11:8000"], "one ready pod")
        _set_ready(ns, "a-2", "10.244.0.12")
        expect(["http://10.244.0.11:8000", "http://10.244.0.12:8000"], "scale-out to two")

        apply(_pod("a-3", ns), namespace=ns)
        _set_ready(ns, "a-3", "10.244.0.13", ready=False)  # started, not ready yet: not a backend
        time.sleep(2)
        assert latest() == ["http://10.244.0.11:8000", "http://10.244.0.12:8000"], seen
        _set_ready(ns, "a-3", "10.244.0.13")
        expect(
            ["http://10.244.0.11:8000", "http://10.244.0.12:8000", "http://10.244.0.13:8000"],
            "scale-out to three",
        )

        _set_ready(ns, "a-2", "10.244.0.12", ready=False)  # a failing readiness probe
        expect(["http://10.244.0.11:8000", "http://10.244.0.13:8000"], "an unready pod leaves")

        # Scale-in: a graceful delete leaves the pod terminating (no kubelet confirms it): out at once.
        kubectl("delete", "pod", "a-1", "-n", ns, "--wait=false")
        expect(["http://10.244.0.13:8000"], "a terminating pod leaves")

        # A restart: the pod comes back under a new IP.
        kubectl("delete", "pod", "a-3", "-n", ns, "--grace-period=0", "--force")
        apply(_pod("a-3", ns), namespace=ns)
        _set_ready(ns, "a-3", "10.244.0.23")
        expect(["http://10.244.0.23:8000"], "the restarted pod under its new IP")
        assert all(a != b for a, b in zip(seen, seen[1:], strict=False)), f"a list was repeated: {seen}"
    finally:
        stop.set()
        thread.join(discovery.WATCH_TIMEOUT_S + 20)
    assert not thread.is_alive(), "watch_endpoints did not return after stop"
