"""The SLO loop closed end to end: a real control plane, the operator as its ServiceAccount, and a real
`drift serve` on loopback standing in for the agent pod (tiny model, the pod's own command, engine.yaml from
the rendered ConfigMap and admin token from the rendered Secret). The test marks the Pod Ready with the
agent's address (there is no kubelet), drives requests, and checks that

- the status shows measured attainment and the loop's decisions;
- under an SLO the agent cannot meet on TTFT, the loop lowers drift's TPOT margin, and the agent runs the new
  margin: one PUT per decision, nothing pushed in between;
- once the SLO is easy, attainment is met and the agent's settings stop changing.

Once with the operator scraping the agent, once reading a real Prometheus (Debian's `prometheus`) that
scrapes it. Each prints its timeline (decision -> agent change -> attainment met).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.tiny_models import tiny_model_dir

from .kube import LLMS, apply, condition, get_obj, kubectl, list_items, wait_for

pytestmark = pytest.mark.timeout(600)

MODEL = "loop-model"
SPEC: dict[str, Any] = {
    "replicas": 1,
    "policy": "drift",
    "model": {"source": "embedded", "servedModelName": MODEL},
    "engine": {"device": "cpu", "dtype": "float32", "numKvBlocks": 256, "maxNumSeqs": 8, "numThreads": 1},
    # TTFT of 1 µs: no request meets it; TPOT is easy. The loop must lower drift's TPOT margin.
    "slo": {"ttftMs": 0.001, "tpotMs": 60000, "attainmentTarget": 0.9, "window": "60s"},
    "scaling": {"minReplicas": 1, "maxReplicas": 1, "minRequests": 4},
    "partition": {"mode": "auto", "cooldownSeconds": 0, "marginStep": 0.1, "minTpotMargin": -0.2},
    "monitoring": {"enabled": False, "staleAfterSeconds": 30},
    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
}
_ADDRESSES = itertools.count(61)


def next_address() -> str:
    """A loopback address of the agent's own (the port is the pod's, so each agent needs its own address; the
    second octet keeps two test sessions on one machine apart)."""
    return f"127.{100 + os.getpid() % 100}.0.{next(_ADDRESSES)}"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Agent:
    """`drift serve` as the pod would run it, on its own loopback address and the pod's port."""

    def __init__(self, namespace: str, name: str, workdir: Path, host: str) -> None:
        self.host = host
        self.log_path = workdir / "agent.log"
        deployment = get_obj("deployment", name, namespace)
        assert deployment is not None
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: int(p["containerPort"]) for p in container["ports"]}
        self.port, self.admin_port = ports["http"], ports["admin"]  # the operator pushes to the admin port
        configmap = get_obj("configmap", f"{name}-engine", namespace)
        secret = get_obj("secret", f"{name}-admin-token", namespace)
        assert configmap is not None and secret is not None
        config = workdir / "engine.yaml"
        config.write_text(configmap["data"]["engine.yaml"])
        self.token = base64.b64decode(secret["data"]["token"]).decode()
        command = list(container["command"])
        command[command.index("--host") + 1] = self.host
        command[command.index("--config") + 1] = str(config)
        command[0] = shutil.which("drift") or "drift"
        command += ["--model", str(tiny_model_dir("llama")), "--served-model-name", MODEL]
        self.command = command
        self._log = self.log_path.open("w")
        env = {**os.environ, "DRIFT_ADMIN_TOKEN": self.token}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://{self.host}:{self.port}"
        wait_for(self._ready, timeout=120, message=lambda: self.log_path.read_text()[-2000:])

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-2000:]
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def policy(self) -> dict[str, Any]:
        return httpx.get(f"http://{self.host}:{self.admin_port}/admin/policy", timeout=5).json()

    def admin_puts(self) -> int:
        return self.log_path.read_text().count('"PUT /admin/policy HTTP/1.1" 200')

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class Load:
    """Short completions back to back from one thread until stopped (bounded by the test's own time)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and self.sent < 5000:
                body = {"model": MODEL, "prompt": f"request {self.sent}", "max_tokens": 4, "temperature": 0}
                response = client.post(f"{self.url}/v1/completions", json=body)
                if response.status_code != 200:
                    self.errors.append(response.text[:200])
                self.sent += 1
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=40)


def _mark_pod_ready(namespace: str, name: str, ip: str) -> str:
    """What the kubelet would do once the agent answers /ready: Running, Ready, with the pod's IP."""
    pods = wait_for(lambda: list_items("pod", namespace, f"serving.drift.dev/llmservice={name}"), timeout=60)
    pod = pods[0]["metadata"]["name"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ],
        "containerStatuses": [
            {
                "name": "agent",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "image": "drift-agent",
                "imageID": "",
                "state": {"running": {"startedAt": now}},
            }
        ],
    }
    kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))  # fmt: skip
    return pod


def _status(namespace: str, name: str) -> dict[str, Any]:
    obj = get_obj(LLMS, name, namespace)
    return (obj or {}).get("status") or {}


def _steering_decisions(namespace: str, name: str) -> list[dict[str, Any]]:
    return [d for d in _status(namespace, name).get("lastDecisions") or [] if d["type"] == "Partition"]


@pytest.fixture
def service(namespace: str, operator: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """start(spec_overrides) -> (name, agent, operator process): the LLMService, its operator and its agent."""
    made: list[Agent] = []

    def start(extra: dict[str, Any] | None = None, host: str | None = None) -> tuple[str, Agent, Any]:
        name = "loop"
        spec = {**SPEC, **(extra or {})}
        apply({"apiVersion": "serving.drift.dev/v1alpha1", "kind": "LLMService",
               "metadata": {"name": name, "namespace": namespace}, "spec": spec})  # fmt: skip
        process = operator(namespace, interval=1.0)
        wait_for(lambda: get_obj("deployment", name, namespace), timeout=60, message=process.log_tail)
        agent = Agent(namespace, name, tmp_path, host or next_address())
        made.append(agent)
        _mark_pod_ready(namespace, name, agent.host)
        return name, agent, process

    yield start
    for agent in made:
        agent.stop()


def _run_loop(namespace: str, name: str, agent: Agent, process: Any) -> dict[str, float]:
    """Drive the loop through one TTFT violation and back to a met SLO; return the timeline (seconds)."""
    t0 = time.monotonic()
    # The operator configures the agent once it is Ready (one push), then leaves it alone.
    wait_for(lambda: agent.admin_puts() == 1, timeout=60, message=process.log_tail)
    assert agent.policy()["slo"]["ttft_ms"] == 0.001 and agent.policy()["partition"]["tpot_margin"] == 0
    time.sleep(3)
    pushes_at_start = agent.admin_puts()
    assert pushes_at_start == 1, agent.log_path.read_text()[-3000:]
    load = Load(agent.url)
    try:
        # The status reports what was measured, then the loop decides: TTFT lags, so the margin goes down.
        attained = wait_for(lambda: (_status(namespace, name).get("attainment") or {}).get("requests"),
                            timeout=90, message=process.log_tail)  # fmt: skip
        assert attained >= 1
        decision = wait_for(
            lambda: _steering_decisions(namespace, name), timeout=120, message=process.log_tail
        )[0]
        t_decision = time.monotonic()
        assert (decision["from"], decision["to"], decision["reason"]) == ("0.00", "-0.10", "TTFTViolated")
        assert _status(namespace, name)["attainment"]["ttft"] == 0
        wait_for(
            lambda: agent.policy()["partition"]["tpot_margin"] == -0.1, timeout=30, message=process.log_tail
        )
        t_agent = time.monotonic()

        # An easy SLO: the operator pushes the new targets once; attainment recovers and nothing else moves.
        kubectl("patch", LLMS, name, "-n", namespace, "--type=merge",
                "-p", json.dumps({"spec": {"slo": {"ttftMs": 60000, "tpotMs": 60000}}}))  # fmt: skip
        wait_for(lambda: agent.policy()["slo"]["ttft_ms"] == 60000, timeout=30, message=process.log_tail)
        met = wait_for(
            lambda: (condition(get_obj(LLMS, name, namespace), "SLOMet") or {}).get("status") == "True",
            timeout=150,
            message=process.log_tail,
        )
        assert met
        t_met = time.monotonic()
        settled_policy, settled_puts = agent.policy(), agent.admin_puts()
        settled_decisions = len(_status(namespace, name).get("lastDecisions") or [])
        time.sleep(6)  # six more ticks under load with the SLO met
    finally:
        load.stop()
    assert agent.policy() == settled_policy
    assert agent.admin_puts() == settled_puts
    assert len(_status(namespace, name).get("lastDecisions") or []) == settled_decisions
    # At most one push per change of desired state (the start, each steering decision, the new SLO targets;
    # a decision and the SLO edit landing in one tick share a push), never a repeat of the same state.
    changes = len(_steering_decisions(namespace, name)) + 1
    assert pushes_at_start + 1 <= settled_puts <= pushes_at_start + changes
    assert not load.errors, load.errors[:3]
    margin = _status(namespace, name)["partition"]["tpotMargin"]
    assert margin == settled_policy["partition"]["tpot_margin"] <= -0.1
    # Decisions are logged (not only posted as Events), and every operator log line is printed once.
    assert "PartitionShifted" in process.log_text()
    lines = [line for line in process.log_text().splitlines() if line.strip()]
    assert all(a != b for a, b in itertools.pairwise(lines)), "a log line was printed twice"
    timeline = {
        "decision_s": t_decision - t0,
        "agent_changed_s": t_agent - t0,
        "attainment_met_s": t_met - t0,
        "requests": float(load.sent),
    }
    print(f"closed-loop timeline ({namespace}): {json.dumps({k: round(v, 1) for k, v in timeline.items()})}")
    return timeline


def test_closed_loop_scraping_the_agent(service: Callable[..., Any], namespace: str) -> None:
    name, agent, process = service()
    timeline = _run_loop(namespace, name, agent, process)
    assert timeline["decision_s"] < timeline["agent_changed_s"] < timeline["attainment_met_s"]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str, str, str], str]]:
    """start(target, namespace, name) -> base URL of a real Prometheus scraping `target` every second,
    labelling its series as the operator's PodMonitor would (namespace, llmservice)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs Debian's prometheus binary (apt-get install prometheus; .ci/run installs it)")
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str, namespace: str, name: str) -> str:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "drift-agent",
                    "static_configs": [
                        {"targets": [target], "labels": {"namespace": namespace, "llmservice": name}}
                    ],
                }
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = _free_port("127.0.0.1")
        log = (tmp_path / "prometheus.log").open("w")
        process = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(process)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, message=lambda: (tmp_path / "prometheus.log").read_text()[-2000:])
        return url

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_closed_loop_reading_prometheus(
    service: Callable[..., Any], namespace: str, prometheus: Callable[[str, str, str], str]
) -> None:
    # Prometheus is up, scraping the agent's address, before the LLMService names it.
    host = next_address()
    url = prometheus(f"{host}:8000", namespace, "loop")
    monitoring = {"enabled": False, "prometheusUrl": url, "staleAfterSeconds": 30}
    name, agent, process = service({"monitoring": monitoring}, host=host)
    timeline = _run_loop(namespace, name, agent, process)
    assert timeline["decision_s"] < timeline["agent_changed_s"] < timeline["attainment_met_s"]
    # The attainment came from Prometheus: the operator's queries name the service.
    queries = httpx.get(
        f"{url}/api/v1/query", params={"query": 'drift_slo_requests_total{llmservice="loop"}'}
    )
    assert queries.json()["data"]["result"], "Prometheus has no series for the service"
