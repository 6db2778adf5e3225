"""The documented install on a bare cluster (no Prometheus Operator), the shipped RBAC, and the samples
rendered by the operator running as its own ServiceAccount."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .conftest import Install
from .kube import (
    CRD_NAME,
    LLMS,
    OPERATOR_NAMESPACE,
    OPERATOR_SA,
    SAMPLES,
    OperatorProcess,
    condition,
    get_obj,
    kubectl,
    list_items,
    reconciled,
    wait_for,
)

pytestmark = pytest.mark.e2e

SA_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
DEFAULT_IMAGE = "ghcr.io/drift-serving/drift-agent:0.1.0"
FIRST_RECONCILE_S = 150.0  # generous: includes the operator's start-up (see test_operator_cluster.py)


def test_documented_install_on_a_bare_cluster(installed: Install) -> None:
    # Bare: no Prometheus Operator CRDs, so this is the install a user without monitoring gets.
    assert "monitoring.coreos.com" not in kubectl("api-versions")
    # `kubectl apply -f crds/` applies the CRD alone (crds/Kustomization is not a manifest).
    first = installed.outputs["kubectl apply -f crds/"].strip().splitlines()
    assert len(first) == 1 and re.fullmatch(
        rf"customresourcedefinition.apiextensions.k8s.io/{re.escape(CRD_NAME)} (created|unchanged|configured)",
        first[0],
    ), first
    out = installed.outputs["kubectl apply -k manifests/"]
    for expected in (
        f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}",
        f"namespace/{OPERATOR_NAMESPACE}",
        f"serviceaccount/{OPERATOR_SA}",
        "clusterrole.rbac.authorization.k8s.io/drift-operator ",
        "clusterrole.rbac.authorization.k8s.io/drift-operator-secrets ",
        "clusterrolebinding.rbac.authorization.k8s.io/drift-operator ",
        "rolebinding.rbac.authorization.k8s.io/drift-operator-secrets ",
        "deployment.apps/drift-operator ",
    ):
        assert expected in out, f"{expected!r} missing from `kubectl apply -k manifests/`:\n{out}"

    crd = get_obj("crd", CRD_NAME)
    assert condition(crd, "Established") and condition(crd, "Established")["status"] == "True"
    assert condition(crd, "NamesAccepted")["status"] == "True"

    binding = get_obj("rolebinding", "drift-operator-secrets", "default")
    assert binding is not None, "the RoleBinding for the samples' namespace (default) is missing"
    assert binding["roleRef"]["name"] == "drift-operator-secrets"
    assert {"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE} in binding[
        "subjects"
    ]

    deployment = get_obj("deployment", "drift-operator", OPERATOR_NAMESPACE)
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == OPERATOR_SA
    # The API server admitted the operator's pod under the namespace's `restricted` Pod Security level;
    # without a kubelet or scheduler it stays Pending.
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    pods = wait_for(
        lambda: list_items("pods", OPERATOR_NAMESPACE, selector),
        timeout=60,
        message=lambda: kubectl("describe", "deployment", "drift-operator", "-n", OPERATOR_NAMESPACE),
    )
    assert [p["status"].get("phase") for p in pods] == ["Pending"]

    # Idempotent: applying again changes nothing.
    again = kubectl("apply", "-k", "crds/")
    assert again.strip() == f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} unchanged", again
    again = kubectl("apply", "-k", "manifests/")
    changed = [line for line in again.splitlines() if line.strip() and not line.endswith(" unchanged")]
    assert not changed, f"re-applying manifests/ changed: {changed}"


# (verb, resource, namespace or None, allowed): what docs/operator.md ("Permissions") says the ServiceAccount
# may do, and a few things least privilege rules out. The operator runs as this ServiceAccount in every test.
PERMISSIONS = [
    *((verb, "llmservices.serving.drift.dev", "default", True) for verb in ("get", "list", "watch", "patch")),
    ("list", "llmservices.serving.drift.dev", None, True),
    ("watch", "llmservices.serving.drift.dev", None, True),
    ("get", "llmservices.serving.drift.dev/status", "default", True),
    ("patch", "llmservices.serving.drift.dev/status", "default", True),
    *(
        (verb, kind, "default", True)
        for kind in ("deployments.apps", "services", "configmaps", "secrets")
        for verb in ("get", "create", "patch")
    ),
    ("list", "pods", "default", True),
    ("create", "events", "default", True),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None, True),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, True),
    # The router: its Deployment, identity and grant (deleted when it is switched off), and what its Role
    # grants, which the operator must hold itself to grant it.
    ("delete", "deployments.apps", "default", True),
    *(
        (verb, kind, "default", True)
        for kind in (
            "serviceaccounts",
            "roles.rbac.authorization.k8s.io",
            "rolebindings.rbac.authorization.k8s.io",
        )
        for verb in ("get", "create", "patch", "delete")
    ),
    *((verb, "endpointslices.discovery.k8s.io", "default", True) for verb in ("get", "list", "watch")),
    # Least privilege: no other deletes (the garbage collector deletes children), no Secrets outside bound
    # namespaces, nothing on the LLMService's spec beyond patch, no privilege escalation.
    ("delete", "services", "default", False),
    ("delete", "configmaps", "default", False),
    ("delete", "llmservices.serving.drift.dev", "default", False),
    ("escalate", "roles.rbac.authorization.k8s.io", "default", False),
    ("bind", "roles.rbac.authorization.k8s.io", "default", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, False),
    ("list", "secrets", "default", False),
    ("get", "secrets", "kube-system", False),
    ("get", "secrets", None, False),
    ("create", "pods", "default", False),
]


@pytest.mark.parametrize(("verb", "resource", "namespace", "allowed"), PERMISSIONS)
def test_shipped_rbac(
    installed: Install, verb: str, resource: str, namespace: str | None, allowed: bool
) -> None:
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    result = kubectl("auth", "can-i", verb, resource, *scope, f"--as={SA_USER}", check=False).strip()
    assert result == ("yes" if allowed else "no"), (
        f"can-i {verb} {resource} in {namespace or 'all'}: {result}"
    )


def _columns(table: str) -> tuple[list[str], list[dict[str, str]]]:
    """Parse kubectl's table output by the header's column positions (cells may be empty)."""
    lines = [line for line in table.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return names, rows


def _samples_overlay(tmp_path: Path, namespace: str) -> Path:
    """A kustomization that puts manifests/samples into `namespace` (the samples name `default`, which
    `kubectl apply -k manifests/samples -n NS` refuses)."""
    overlay = tmp_path / "samples-overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [os.path.relpath(SAMPLES, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return overlay


def test_samples_accepted_and_rendered(
    namespace: str, operator: Callable[..., OperatorProcess], tmp_path: Path
) -> None:
    overlay = _samples_overlay(tmp_path, namespace)
    documents = [d for d in yaml.safe_load_all(kubectl("kustomize", str(overlay))) if d]
    names = sorted(d["metadata"]["name"] for d in documents if d["kind"] == "LLMService")
    assert len(names) >= 3, f"expected the CPU, GPU and HPA samples, got {names}"

    # Every sample is accepted by the real API server (structural schema, CEL rules, defaults).
    out = kubectl("apply", "-k", str(overlay))
    for doc in documents:
        assert f"/{doc['metadata']['name']} created" in out, f"{doc['kind']} not created:\n{out}"

    op = operator(namespace)
    for name in names:
        obj, kids = wait_for(
            lambda name=name: reconciled(name, namespace),
            timeout=FIRST_RECONCILE_S,
            message=lambda name=name: f"{name}: children and status\n{op.log_tail()}",
        )
        spec = obj["spec"]
        deployment = kids["deployment"]
        assert deployment["spec"]["replicas"] == spec["replicas"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == spec.get("image", DEFAULT_IMAGE)
        resources = spec.get("resources") or {}
        gpus = resources.get("gpusPerReplica", 0)
        if gpus:
            gpu_name = resources.get("gpuResourceName", "nvidia.com/gpu")
            assert container["resources"]["limits"][gpu_name] in (gpus, str(gpus)), container["resources"]
        ports = {p["name"]: p["port"] for p in kids["service"]["spec"]["ports"]}
        assert ports.get("http") == 8000, ports
        assert "engine.yaml" in kids["configmap"]["data"]
        assert kids["secret"]["data"].get("token"), "the admin token Secret has no token"
        ready = condition(obj, "Ready")
        # No kubelet: the agents stay Pending, so the service is rendered but not Ready.
        assert ready["status"] == "False" and ready["reason"] == "NoReplicasReady", ready
        assert obj["status"].get("selector"), "status.selector (the scale subresource's selector) is empty"
        assert obj["status"].get("model") and obj["status"].get("policy") == spec["policy"]

    # The printer columns, read from the real API server's table output.
    header, rows = _columns(kubectl("get", "llms", "-n", namespace))
    expected = ["NAME", "MODEL", "REPLICAS", "READY-REPLICAS", "TTFT", "TPOT", "POLICY", "READY", "AGE"]
    assert header == expected
    by_name = {row["NAME"]: row for row in rows}
    assert sorted(by_name) == names
    for name in names:
        obj = get_obj(LLMS, name, namespace)
        row = by_name[name]
        assert row["MODEL"] == obj["status"]["model"], row
        assert row["POLICY"] == obj["spec"]["policy"], row
        assert row["REPLICAS"] == str(obj["status"]["replicas"]) and row["READY-REPLICAS"] == "0", row
        assert row["READY"] == "False", row
    wide_header, wide_rows = _columns(kubectl("get", "llms", "-n", namespace, "-o", "wide"))
    assert {"REASON", "PREFILL-SHARE"} <= set(wide_header), wide_header
    assert {row["REASON"] for row in wide_rows} == {"NoReplicasReady"}, wide_rows
    op.assert_alive()
