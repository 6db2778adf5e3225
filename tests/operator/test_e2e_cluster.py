"""Opt-in end-to-end test on a real cluster: install the CRD, run the operator, serve a request.

Skipped unless $KUBECONFIG points at a reachable cluster and kubectl is installed. The agent image must be
pullable by the cluster: set DRIFT_E2E_AGENT_IMAGE (default: the sample's image) for a locally built one
(e.g. `kind load docker-image ...`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = float(os.environ.get("DRIFT_E2E_TIMEOUT", "900"))


def _cluster_reachable() -> bool:
    path = os.environ.get("KUBECONFIG")
    if (
        not path
        or not all(Path(p).is_file() for p in path.split(os.pathsep))
        or shutil.which("kubectl") is None
    ):
        return False
    result = subprocess.run(["kubectl", "version", "--request-timeout=5s", "-o", "json"], capture_output=True)
    return result.returncode == 0 and b"serverVersion" in result.stdout


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(TIMEOUT_S + 120),
    pytest.mark.skipif(not _cluster_reachable(), reason="needs $KUBECONFIG pointing at a reachable cluster"),
]


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"drift-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def running_operator(namespace: str) -> Iterator[None]:
    import kopf

    from drift_operator import handlers  # noqa: F401

    kubectl("apply", "-k", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/llmservices.serving.drift.dev", "--timeout=60s")
    stop = threading.Event()

    def run() -> None:
        asyncio.run(kopf.operator(namespaces=[namespace], standalone=True, stop_flag=stop))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, response.read().decode()


def test_install_and_serve_a_request(namespace: str, running_operator: None) -> None:
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "llmservice-embedded-cpu.yaml").read_text())
    sample["metadata"]["namespace"] = namespace
    if image := os.environ.get("DRIFT_E2E_AGENT_IMAGE"):
        sample["spec"]["image"] = image
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(sample))
    name = sample["metadata"]["name"]

    deadline = time.monotonic() + TIMEOUT_S
    while True:
        status = json.loads(kubectl("get", "llms", name, "-n", namespace, "-o", "json")).get("status", {})
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        if ready and ready[0]["status"] == "True":
            break
        assert time.monotonic() < deadline, f"not Ready in time: {status}"
        time.sleep(5)
    assert status["selector"] and status["readyReplicas"] >= 1

    port = _free_port()
    forward = subprocess.Popen(
        ["kubectl", "port-forward", "-n", namespace, f"svc/{name}", f"{port}:http"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(30):
            try:
                if _http(f"{base}/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(1)
        model = json.loads(_http(f"{base}/v1/models")[1])["data"][0]["id"]
        code, text = _http(f"{base}/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 8})
        assert code == 200 and json.loads(text)["choices"]
        code, metrics = _http(f"{base}/metrics")
        assert code == 200 and "drift_slo_requests_total" in metrics
    finally:
        forward.terminate()
        forward.wait(10)
