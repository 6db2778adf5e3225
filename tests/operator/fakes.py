"""Test doubles: a thin helper over kmock's Kubernetes emulator, and fake agents with scripted metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import kmock
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

LLMS = "serving.drift.dev/v1alpha1/llmservices"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
SECRETS = "v1/secrets"
PODS = "v1/pods"
EVENTS = "v1/events"
PODMONITORS = "monitoring.coreos.com/v1/podmonitors"
SERVICEACCOUNTS = "v1/serviceaccounts"
ROLES = "rbac.authorization.k8s.io/v1/roles"
ROLEBINDINGS = "rbac.authorization.k8s.io/v1/rolebindings"


class GenerateNameEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus `metadata.generateName`, which kopf uses for every Event it posts."""

    _generated = 0

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                GenerateNameEmulator._generated += 1
                meta["name"] = f"{meta['generateName']}{GenerateNameEmulator._generated:05d}"
        return await super()._handle(request)


class Cluster:
    NAMESPACE = "ns1"

    def __init__(self, emulator: Any) -> None:
        self.k = emulator
        emulator.resources.load_bundled()
        emulator.resources[LLMS] = kmock.ResourceInfo(
            kind="LLMService",
            singular="llmservice",
            namespaced=True,
            shortnames={"llms"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            subresources={"status", "scale"},
        )
        self._uids = 0

    def enable_monitoring_crds(self) -> None:
        self.k.resources[PODMONITORS] = kmock.ResourceInfo(
            kind="PodMonitor", namespaced=True, verbs={"get", "list", "create", "patch", "delete"}
        )

    def add_llmservice(
        self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None, generation: int = 1
    ) -> None:
        self.k.objects[LLMS, self.NAMESPACE, name] = {
            "apiVersion": "serving.drift.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {
                "name": name,
                "namespace": self.NAMESPACE,
                "uid": f"uid-{name}",
                "resourceVersion": "1",
                "generation": generation,
                "annotations": annotations or {},
            },
            "spec": spec,
        }

    def path(self, resource: str, name: str | None = None, subresource: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
        out = f"{base}/namespaces/{self.NAMESPACE}/{plural}"
        return out + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.k.objects[resource, self.NAMESPACE, name]
        except KeyError:
            return None
        return None if obj.deleted else json.loads(json.dumps(obj.raw))

    def exists(self, resource: str, name: str) -> bool:
        return self.get(resource, name) is not None

    def set_object(self, resource: str, name: str, body: dict[str, Any]) -> None:
        """Overwrite an object's state behind the API (as a controller or a hand edit would)."""
        self.k.objects[resource, self.NAMESPACE, name] = body

    def mark_deployment_ready(self, name: str, replicas: int) -> None:
        deployment = self.get(DEPLOYMENTS, name)
        assert deployment is not None
        deployment["status"] = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": replicas,
            "readyReplicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": replicas,
        }
        self.set_object(DEPLOYMENTS, name, deployment)

    def add_agent_pod(self, service: str, agent: FakeAgent, ready: bool = True) -> str:
        self._uids += 1
        name = f"{service}-abc-{self._uids}"
        self.k.objects[PODS, self.NAMESPACE, name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.NAMESPACE,
                "uid": f"pod-uid-{self._uids}",
                "labels": {"serving.drift.dev/llmservice": service, "app.kubernetes.io/component": "agent"},
            },
            "spec": {
                "containers": [{"name": "agent", "ports": [{"name": "http", "containerPort": agent.port}]}]
            },
            "status": {
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [{"name": "agent", "restartCount": 0}],
            },
        }
        return name

    async def patch_llmservice(self, name: str, patch: dict[str, Any]) -> None:
        """Through the API, so the operator's watch sees the change."""
        async with self.k.patch(self.path(LLMS, name), json=patch) as response:
            assert response.status == 200, await response.text()

    async def delete_llmservice(self, name: str) -> None:
        async with self.k.delete(self.path(LLMS, name)) as response:
            assert response.status == 200, await response.text()

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        out = []
        for (resource, _, _), obj in self.k.objects.items():
            if resource == EVENTS and not obj.deleted:
                raw = dict(obj.raw)
                if reason is None or raw.get("reason") == reason:
                    out.append(raw)
        return out

    def requests(self, method: str, resource: str, name: str | None = None) -> list[Any]:
        out = []
        for request in self.k[kmock.resource(resource)]:
            if request.method.upper() == method.upper() and (name is None or request.name == name):
                out.append(request)
        return out


class FakeAgent:
    """An agent double on its own port: cumulative SLO counters that grow on every scrape (simulated
    traffic), partition/policy gauges, and a recording PUT /admin/policy."""

    def __init__(
        self,
        *,
        requests_per_scrape: int = 20,
        ttft_met_fraction: float = 1.0,
        tpot_met_fraction: float = 1.0,
        share: float = 0.5,
        policy: str = "drift",
        with_counters: bool = True,
    ) -> None:
        self.requests_per_scrape = requests_per_scrape
        self.ttft_met_fraction = ttft_met_fraction
        self.tpot_met_fraction = tpot_met_fraction
        self.share = share
        self.policy = policy
        self.with_counters = with_counters
        self.totals: dict[tuple[str, str], float] = {}
        self.policy_puts: list[dict[str, Any]] = []
        self.reject_with: int | None = None  # answer PUT /admin/policy with this status instead
        # What the agent reports as configured (drift_partition_config), as a real agent does after a PUT.
        self.configured: dict[str, float] = {"prefill_sm_share": share, "tpot_margin": 0.0}
        self.handler = kmock.RawHandler()
        self.server = kmock.Server(self.handler)
        self.handler["get /metrics"] << self._metrics
        self.handler["put /admin/policy"] << self._put_policy

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await self.handler.__aenter__()
        await self.server.__aenter__()

    async def stop(self) -> None:
        await self.server.__aexit__(None, None, None)
        await self.handler.__aexit__(None, None, None)

    def _metrics(self) -> bytes:
        n = self.requests_per_scrape
        ttft_met = round(n * self.ttft_met_fraction)
        tpot_met = round(n * self.tpot_met_fraction)
        both_met = min(ttft_met, tpot_met)
        for key, value in {
            ("ttft", "met"): ttft_met,
            ("ttft", "missed"): n - ttft_met,
            ("tpot", "met"): tpot_met,
            ("tpot", "missed"): n - tpot_met,
            ("both", "met"): both_met,
            ("both", "missed"): n - both_met,
        }.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        registry = CollectorRegistry()
        if self.with_counters:
            counter = Counter(
                "drift_slo_requests",
                "requests by SLO outcome",
                ["phase", "outcome", "model_name"],
                registry=registry,
            )
            for (phase, outcome), value in self.totals.items():
                counter.labels(phase, outcome, "m").inc(value)
        share = Gauge("drift_partition_sm_share", "SM share", ["phase"], registry=registry)
        share.labels("prefill").set(self.share)
        share.labels("decode").set(1.0 - self.share)
        config = Gauge("drift_partition_config", "configured settings", ["setting"], registry=registry)
        for setting, value in self.configured.items():
            config.labels(setting).set(value)
        info = Gauge("drift_policy_info", "policy", ["policy"], registry=registry)
        info.labels(self.policy).set(1)
        Gauge("vllm:num_requests_waiting", "queue", ["model_name"], registry=registry).labels("m").set(0)
        Gauge("vllm:kv_cache_usage_perc", "kv", ["model_name"], registry=registry).labels("m").set(0.25)
        return generate_latest(registry)

    def _put_policy(self, request: Any) -> Any:
        body = dict(request.data)
        self.policy_puts.append({"body": body, "authorization": request.headers.get("Authorization")})
        if self.reject_with:
            return kmock.Response(status=self.reject_with, payload={"error": {"message": "refused"}})
        partition = body.get("partition") or {}
        for setting in ("prefill_sm_share", "tpot_margin", "fold_max_tokens"):
            if setting in partition:
                self.configured[setting] = float(partition[setting])
        if "policy" in body:
            self.policy = body["policy"]
        return {"policy": self.policy, "partition": {"mode": "auto", **self.configured}}


async def eventually(check: Callable[[], Any], timeout: float = 8.0, interval: float = 0.05) -> Any:
    """Poll until `check` returns without raising AssertionError/KeyError/TypeError; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, KeyError, TypeError, IndexError):
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)
