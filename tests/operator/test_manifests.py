"""Every YAML we ship: Kubernetes schemas (offline), the CRD against its own samples, kustomize, monitoring."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .crd_validator import CRValidationError, validate

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"
CUSTOM_KINDS = {"LLMService", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
# crds/ names its kustomization `Kustomization` so that `kubectl apply -f crds/` (which reads only .yaml,
# .yml and .json files) skips it.
KUSTOMIZATION_FILES = ("kustomization.yaml", "Kustomization")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _shipped_yaml() -> list[Path]:
    return sorted(p for d in ("crds", "manifests") for p in (ROOT / d).rglob("*.yaml"))


def _objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _shipped_yaml() if p.name not in KUSTOMIZATION_FILES for d in _docs(p)]


@pytest.mark.parametrize("path", _shipped_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    assert _docs(path), f"{path} is empty"


@pytest.mark.parametrize(
    "path,obj",
    [(p, d) for p, d in _objects() if d["kind"] not in CUSTOM_KINDS],
    ids=lambda v: (
        v["kind"] + "/" + v["metadata"]["name"] if isinstance(v, dict) else str(v.relative_to(ROOT))
    ),
)
def test_builtin_kinds_validate_against_kubernetes_schemas(path: Path, obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_llmservice_samples_validate_against_the_crd(crd: dict[str, Any]) -> None:
    samples = [d for _, d in _objects() if d["kind"] == "LLMService"]
    assert len(samples) >= 3
    for sample in samples:
        validate(crd, sample)


def test_samples_parse_with_the_operator_spec_model(crd: dict[str, Any]) -> None:
    from drift_operator.render import Owner, render_children
    from drift_operator.spec import parse_spec

    for _, sample in _objects():
        if sample["kind"] == "LLMService":
            defaulted = validate(crd, sample)
            spec = parse_spec(defaulted["spec"])
            render_children(Owner(sample["metadata"]["name"], "default", "u"), spec, "operator", True)


def _sample(name: str = "x", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.drift.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ({"policy": "fastest"}, "is not one of"),
        ({"replicas": -1}, "less than the minimum"),
        ({"slo": {"attainmentTarget": 0}}, "less than or equal to the minimum"),
        ({"slo": {"attainmentTarget": 1.5}}, "greater than the maximum"),
        ({"slo": {"window": "5 minutes"}}, "does not match"),
        ({"partition": {"mode": "dynamic"}}, "is not one of"),
        ({"partition": {"foldMaxTokens": -1}}, "less than the minimum"),
        ({"resources": {"gpusPerReplica": "one"}}, "is not of type"),
        ({"scaling": {"minReplicas": 0}}, "less than the minimum"),
        ({"monitoring": {"prometheusUrl": "prometheus:9090"}}, "does not match"),
        ({"engine": {"blockSize": 4096}}, "greater than the maximum"),
        ({"engine": {"preemptionMode": "evict"}}, "is not one of"),
        ({"engine": {"fairness": "wfq"}}, "is not one of"),
        ({"engine": {"swapSpaceGb": -1}}, "less than the minimum"),
        ({"engine": {"fairnessPreemptGap": 0}}, "less than or equal to the minimum"),
        ({"modle": {}}, "unknown field .spec.modle"),
        ({"engine": {"maxBatch": 3}}, "unknown field .spec.engine.maxBatch"),
    ],
)
def test_crd_schema_rejects_bad_specs(crd: dict[str, Any], spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CRValidationError, match=fragment):
        validate(crd, _sample(**spec), with_cel=False)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"scaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must not exceed"),
        ({"partition": {"minPrefillSmShare": 0.8, "maxPrefillSmShare": 0.2}}, "minPrefillSmShare must not"),
        ({"partition": {"prefillSmShare": 0.95}}, "prefillSmShare must lie within"),
        ({"model": {"source": "pvc"}}, "claimName is required"),
        ({"model": {"source": "hostPath"}}, "hostPath is required"),
        ({"model": {"source": "image", "path": "relative/dir"}}, "absolute path"),
        ({"model": {"source": "pvc", "claimName": "m", "path": "../etc"}}, "relative to the volume"),
        ({"model": {"source": "embedded", "claimName": "m"}}, "make no sense"),
    ],
)
def test_crd_cel_rules_reject_inconsistent_specs(
    crd: dict[str, Any], spec: dict[str, Any], message: str
) -> None:
    pytest.importorskip("cel", reason="CEL rules need the common-expression-language package")
    with pytest.raises(CRValidationError, match=message):
        validate(crd, _sample(**spec))
    # The operator's own model reaches the same verdict (for API servers that skip CEL).
    from drift_operator.spec import SpecError, parse_spec

    with pytest.raises(SpecError):
        parse_spec(spec)


def test_crd_cel_rules_accept_consistent_specs(crd: dict[str, Any]) -> None:
    pytest.importorskip("cel")
    validate(crd, _sample(partition={"mode": "static", "prefillSmShare": 0.95}))  # bounds are for auto mode
    validate(crd, _sample(model={"source": "image", "path": "/opt/models/llama"}))
    validate(crd, _sample(model={"source": "hostPath", "hostPath": "/data/models", "path": "llama"}))


def test_crd_defaults_fill_an_empty_spec(crd: dict[str, Any]) -> None:
    defaulted = validate(crd, _sample())
    spec = defaulted["spec"]
    assert spec["replicas"] == 1 and spec["policy"] == "drift"
    assert spec["slo"] == {"ttftMs": 1000, "tpotMs": 100, "attainmentTarget": 0.9, "window": "5m"}
    assert spec["partition"]["mode"] == "auto" and spec["scaling"]["replicasOwner"] == "operator"
    assert spec["model"] == {"source": "embedded"}
    engine = spec["engine"]
    assert (engine["swapSpaceGb"], engine["preemptionMode"]) == (0, "auto")
    assert (engine["fairness"], engine["fairnessPreemptGap"]) == ("none", 4096)


def test_crd_has_scale_status_and_printer_columns(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["llms"] and crd["spec"]["scope"] == "Namespaced"
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string"  # HPA and KEDA need a string selector
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["TTFT"] == ".status.attainment.ttft" and columns["TPOT"] == ".status.attainment.tpot"
    assert columns["Ready"] == ".status.conditions[?(@.type=='Ready')].status"
    assert {"Model", "Replicas", "Ready-Replicas", "Policy", "Age"} <= set(columns)


def test_crd_validates_against_kubernetes_schema(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def _kustomize_files(directory: Path, seen: set[Path] | None = None) -> list[Path]:
    """Resolve a kustomization's resources (recursively) and generator inputs: the fallback for machines
    without kubectl/kustomize. Every entry must exist and parse."""
    seen = seen if seen is not None else set()
    directory = directory.resolve()
    assert directory not in seen, f"kustomization cycle at {directory}"
    seen.add(directory)
    path = next(directory / n for n in KUSTOMIZATION_FILES if (directory / n).exists())
    kustomization = yaml.safe_load(path.read_text())
    files: list[Path] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}: resource {entry} does not exist"
        if target.is_dir():
            files += _kustomize_files(target, seen)
        else:
            assert _docs(target), f"{target} has no objects"
            files.append(target)
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            source = directory / entry.split("=", 1)[-1]
            assert source.exists(), f"{directory}: generator file {entry} does not exist"
            if source.suffix == ".json":
                json.loads(source.read_text())
            files.append(source)
    return files


def test_kustomizations_resolve_to_existing_parseable_files() -> None:
    files = _kustomize_files(ROOT / "manifests")
    names = {f.name for f in files}
    assert {"serving.drift.dev_llmservices.yaml", "rbac.yaml", "deployment.yaml"} <= names
    # Monitoring needs the Prometheus Operator's CRDs: it is opt-in, never part of the default install.
    assert not names & {"servicemonitor.yaml", "prometheusrule.yaml", "drift-slo.json"}
    assert "drift-slo.json" in {f.name for f in _kustomize_files(ROOT / "manifests" / "monitoring")}
    assert _kustomize_files(ROOT / "manifests" / "samples")
    assert _kustomize_files(ROOT / "crds")


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize_command() is None, reason="no kubectl or kustomize binary on PATH")
def test_kustomize_build_succeeds(crd: dict[str, Any]) -> None:
    command = _kustomize_command()
    assert command is not None
    result = subprocess.run([*command, str(ROOT / "manifests")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in objects}
    assert ("CustomResourceDefinition", "llmservices.serving.drift.dev") in kinds
    assert ("Deployment", "drift-operator") in kinds
    assert not {kind for kind, _ in kinds} & CUSTOM_KINDS  # a bare cluster serves every kind installed
    monitoring = subprocess.run(
        [*command, str(ROOT / "manifests" / "monitoring")], capture_output=True, text=True, timeout=60
    )
    assert monitoring.returncode == 0, monitoring.stderr
    monitoring_objects = [d for d in yaml.safe_load_all(monitoring.stdout) if d]
    dashboard = next(d for d in monitoring_objects if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(dashboard["data"]["drift-slo.json"])
    for obj in objects + monitoring_objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] == "RoleBinding":
            assert obj["metadata"]["namespace"] == "default"  # the Secrets grant, in a managed namespace
        elif obj["kind"] not in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ):
            assert obj["metadata"]["namespace"] == "drift-system"


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_operator_rbac_covers_what_the_operator_does_and_no_more() -> None:
    rbac = _docs(ROOT / "manifests" / "operator" / "rbac.yaml")
    roles = {d["metadata"]["name"]: d for d in rbac if d["kind"] == "ClusterRole"}
    granted = _granted(roles["drift-operator"])
    needed = {
        ("serving.drift.dev", "llmservices", "watch"),
        ("serving.drift.dev", "llmservices", "patch"),
        ("serving.drift.dev", "llmservices/status", "patch"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("", "pods", "list"),
        ("", "events", "create"),
        ("monitoring.coreos.com", "podmonitors", "create"),
        # The router's objects, deleted when the router is switched off.
        ("apps", "deployments", "delete"),
        ("", "serviceaccounts", "create"),
        ("", "serviceaccounts", "delete"),
        ("rbac.authorization.k8s.io", "roles", "create"),
        ("rbac.authorization.k8s.io", "rolebindings", "create"),
        ("rbac.authorization.k8s.io", "rolebindings", "delete"),
    }
    assert needed <= granted
    assert not any(v in ("*", "escalate", "bind", "impersonate") for _, _, v in granted)
    assert not any(r == "*" or g == "*" for g, r, _ in granted)
    assert not any(r == "secrets" for _, r, _ in granted)  # never cluster-wide
    assert not any(r in ("clusterroles", "clusterrolebindings") for _, r, _ in granted)
    # Secrets: get/create/patch only, granted per managed namespace through a RoleBinding.
    assert _granted(roles["drift-operator-secrets"]) == {
        ("", "secrets", v) for v in ("get", "create", "patch")
    }
    binding = _docs(ROOT / "manifests" / "base" / "secrets-rolebinding.yaml")[0]
    assert binding["kind"] == "RoleBinding" and binding["roleRef"]["name"] == "drift-operator-secrets"
    assert binding["subjects"][0] == {
        "kind": "ServiceAccount",
        "name": "drift-operator",
        "namespace": "drift-system",
    }


def test_monitoring_objects_are_well_formed() -> None:
    rule = _docs(ROOT / "manifests" / "monitoring" / "prometheusrule.yaml")[0]
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert {"DriftSLOAttainmentBelowTarget", "DriftMetricsUnavailable", "DriftOperatorDown"} <= {
        a["alert"] for a in alerts
    }
    for alert in alerts:
        assert alert["expr"].strip() and alert["labels"]["severity"] in ("warning", "critical")
        assert alert["expr"].count("(") == alert["expr"].count(")")
    monitor = _docs(ROOT / "manifests" / "monitoring" / "servicemonitor.yaml")[0]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = _docs(ROOT / "manifests" / "operator" / "service.yaml")[0]
    assert service["spec"]["ports"][0]["name"] == "metrics"


def test_dashboard_covers_the_slo_story() -> None:
    dashboard = json.loads((ROOT / "manifests" / "monitoring" / "dashboards" / "drift-slo.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "drift_operator_slo_attainment",
        "drift_operator_slo_attainment_target",
        "drift_operator_desired_replicas",
        "drift_partition_sm_share",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
    ):
        assert metric in exprs, metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace", "llmservice"}


def test_unknown_status_fields_would_be_pruned(crd: dict[str, Any]) -> None:
    """The validator's pruning check is what guards the operator's status writes (see test_status_schema)."""
    obj = copy.deepcopy(_sample())
    obj["status"] = {"replicas": 1, "notInSchema": True}
    with pytest.raises(CRValidationError, match="unknown field .status.notInSchema"):
        validate(crd, obj, with_cel=False)


def test_operator_holds_every_permission_it_grants_the_router() -> None:
    """The API server refuses a Role (or its binding) granting more than its creator holds, unless the
    creator may `escalate`/`bind`, which the operator must not: its ClusterRole covers the router's Role."""
    from drift_operator.render import Owner, render_children
    from drift_operator.spec import parse_spec

    rbac = _docs(ROOT / "manifests" / "operator" / "rbac.yaml")
    operator_role = next(
        d for d in rbac if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "drift-operator"
    )
    router = render_children(Owner("chat", "team-a", "u"), parse_spec({}), "operator", False).router
    assert router is not None
    assert _granted(router.role) <= _granted(operator_role)


def test_dashboard_has_a_router_row() -> None:
    dashboard = json.loads((ROOT / "manifests" / "monitoring" / "dashboards" / "drift-slo.json").read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Router" in rows
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "drift_router_requests_total",
        "drift_router_retries_total",
        "drift_router_decisions_total",
        "drift_router_upstream_ttft_seconds_bucket",
        "drift_router_backends{",
        "drift_router_ejections_total",
    ):
        assert metric in exprs, metric
