"""Invalid LLMService specs are refused by the real API server (structural schema, patterns, enums and the
CRD's CEL rules), with the CRD's own messages; nothing is stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .conftest import Install
from .kube import LLMS, get_obj, kubectl, llmservice, run_kubectl

pytestmark = pytest.mark.e2e

# (id, spec merged over the CPU sample, text the API server's answer must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "pvc-without-claim",
        {"model": {"source": "pvc", "path": "llama"}},
        "model.claimName is required when model.source is 'pvc'",
    ),
    (
        "hostpath-without-hostpath",
        {"model": {"source": "hostPath", "path": "llama"}},
        "model.hostPath is required when model.source is 'hostPath'",
    ),
    (
        "image-relative-path",
        {"model": {"source": "image", "path": "models/llama"}},
        "model.path must be an absolute path when model.source is 'image'",
    ),
    (
        "pvc-path-escapes-volume",
        {"model": {"source": "pvc", "claimName": "models", "path": "../etc"}},
        "model.path must be relative to the volume (no leading '/', no '..')",
    ),
    (
        "embedded-with-path",
        {"model": {"source": "embedded", "path": "llama"}},
        "model.path/claimName/hostPath make no sense with model.source 'embedded'",
    ),
    (
        "min-replicas-above-max",
        {"scaling": {"minReplicas": 3, "maxReplicas": 2}},
        "scaling.minReplicas must not exceed scaling.maxReplicas",
    ),
    ("min-replicas-zero", {"scaling": {"minReplicas": 0}}, "spec.scaling.minReplicas"),
    (
        "partition-min-above-max",
        {"partition": {"mode": "static", "minPrefillSmShare": 0.8, "maxPrefillSmShare": 0.2}},
        "partition.minPrefillSmShare must not exceed partition.maxPrefillSmShare",
    ),
    (
        "partition-start-outside-bounds",
        {
            "partition": {
                "mode": "auto",
                "prefillSmShare": 0.95,
                "minPrefillSmShare": 0.1,
                "maxPrefillSmShare": 0.9,
            }
        },
        "partition.prefillSmShare must lie within [minPrefillSmShare, maxPrefillSmShare]",
    ),
    ("bad-window", {"slo": {"window": "5 minutes"}}, "spec.slo.window"),
    ("zero-window", {"slo": {"window": "0s"}}, "spec.slo.window"),
    ("unknown-policy", {"policy": "fastest"}, 'Unsupported value: "fastest"'),
    ("attainment-above-one", {"slo": {"attainmentTarget": 1.5}}, "spec.slo.attainmentTarget"),
    ("negative-replicas", {"replicas": -1}, "spec.replicas"),
    ("unknown-router-policy", {"router": {"policy": "hash"}}, 'Unsupported value: "hash"'),
    ("zero-router-replicas", {"router": {"replicas": 0}}, "spec.router.replicas"),
    ("unknown-preemption-mode", {"engine": {"preemptionMode": "evict"}}, 'Unsupported value: "evict"'),
    ("unknown-fairness", {"engine": {"fairness": "wfq"}}, 'Unsupported value: "wfq"'),
    ("negative-swap-space", {"engine": {"swapSpaceGb": -1}}, "spec.engine.swapSpaceGb"),
    # A typo is not silently pruned: kubectl asks the server for strict field validation.
    ("unknown-field", {"scaling": {"maxReplica": 3}}, 'unknown field "spec.scaling.maxReplica"'),
]


@pytest.fixture(scope="module")
def validation_namespace(installed: Install) -> Iterator[str]:
    """One namespace for the whole table (nothing is stored in it when the tests pass)."""
    name = f"e2e-crd-validation-{uuid.uuid4().hex[:5]}"
    kubectl("create", "namespace", name)
    yield name
    run_kubectl("delete", "namespace", name, "--wait=false")


@pytest.mark.parametrize(("spec", "message"), [(s, m) for _, s, m in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_spec_refused_by_the_api_server(
    validation_namespace: str, spec: dict[str, Any], message: str
) -> None:
    name = "bad"
    obj = llmservice(name, validation_namespace, spec)
    result = run_kubectl("apply", "-f", "-", stdin=yaml.safe_dump(obj))
    stored = get_obj(LLMS, name, validation_namespace)
    if stored is not None:
        run_kubectl("delete", LLMS, name, "-n", validation_namespace, "--wait=false")
    assert result.returncode != 0, f"the API server accepted an invalid spec {spec}:\n{result.stdout}"
    assert message in result.stderr, f"expected {message!r} in kubectl's error:\n{result.stderr}"
    assert stored is None, "a refused LLMService was stored"


def test_valid_minimal_spec_is_defaulted_by_the_api_server(namespace: str) -> None:
    """The counterpart: an empty spec is accepted, and the documented defaults come from the server."""
    result = run_kubectl(
        "apply", "-f", "-", stdin=yaml.safe_dump({
            "apiVersion": "serving.drift.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "minimal", "namespace": namespace}, "spec": {},
        }),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spec = get_obj(LLMS, "minimal", namespace)["spec"]
    assert spec["replicas"] == 1
    assert spec["policy"] == "drift"
    assert spec["model"]["source"] == "embedded"
    assert spec["scaling"]["minReplicas"] == 1 and spec["scaling"]["maxReplicas"] == 4
    assert spec["slo"]["window"] == "5m"
    engine = spec["engine"]
    assert (engine["swapSpaceGb"], engine["preemptionMode"], engine["fairness"]) == (0, "auto", "none")
    # The router: on by default (maxReplicas 4 > 1) through the operator; the server fills policy and replicas.
    assert spec["router"] == {"policy": "prefix-affinity", "replicas": 2}


def test_host_tier_and_fairness_settings_are_accepted(namespace: str) -> None:
    engine = {"swapSpaceGb": 1.5, "preemptionMode": "swap", "fairness": "vtc", "fairnessPreemptGap": 512}
    obj = llmservice("tiered", namespace, {"engine": engine})
    result = run_kubectl("apply", "-f", "-", stdin=yaml.safe_dump(obj))
    assert result.returncode == 0, result.stderr
    stored = get_obj(LLMS, "tiered", namespace)["spec"]["engine"]
    assert {key: stored[key] for key in engine} == engine
