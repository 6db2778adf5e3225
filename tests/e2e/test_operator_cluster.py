"""The operator (`drift operator --standalone -n NS`, as the drift-operator ServiceAccount with the shipped
RBAC) against a real API server and controller manager: scaling through the scale subresource, specs only
the operator can refuse, RBAC gaps, garbage collection, and that an idle service is not written to.

No kubelet: agent pods stay Pending, so every LLMService here is rendered but never Ready and has no
metrics; the feedback loop holds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from .conftest import Install
from .kube import (
    LLMS,
    TICK,
    HistoryExpired,
    OperatorProcess,
    apply,
    child_names,
    collection_path,
    condition,
    describe_events,
    event_keys,
    events,
    get_obj,
    kubectl,
    list_items,
    llmservice,
    reconciled,
    run_kubectl,
    wait_for,
    writes_since,
)

pytestmark = pytest.mark.e2e

# The first reconciliation includes the operator's start-up; polling timeouts are generous, success
# paths return as soon as the state is reached.
FIRST_RECONCILE_S = 150.0
CONVERGE_S = 30.0  # after the operator is up it reacts within a tick or two (1 s each)
STEADY_TICKS = 10  # the idle-write measurement window, in loop ticks (1 s each)
RESTART_TICKS = 5
NAME = "chat"

CHILD_COLLECTIONS = {
    "llmservice": ("serving.drift.dev/v1alpha1", "llmservices"),
    "deployment": ("apps/v1", "deployments"),
    "service": ("v1", "services"),
    "configmap": ("v1", "configmaps"),
    "secret": ("v1", "secrets"),
}


def _start_and_reconcile(
    operator: Callable[..., OperatorProcess], namespace: str, spec: dict[str, Any] | None = None
) -> tuple[OperatorProcess, dict[str, Any], dict[str, dict[str, Any]]]:
    apply(llmservice(NAME, namespace, spec))
    op = operator(namespace)
    obj, kids = wait_for(
        lambda: reconciled(NAME, namespace),
        FIRST_RECONCILE_S,
        message=lambda: f"{NAME} reconciled\n{op.log_tail()}",
    )
    return op, obj, kids


def _deployment_replicas(namespace: str, name: str = NAME) -> int | None:
    deployment = get_obj("deployment", name, namespace)
    return None if deployment is None else deployment["spec"]["replicas"]


def _ready_reason(namespace: str, name: str = NAME) -> str | None:
    return (condition(get_obj(LLMS, name, namespace), "Ready") or {}).get("reason")


def _spec_replicas(namespace: str, name: str = NAME) -> int:
    return get_obj(LLMS, name, namespace)["spec"]["replicas"]


def _replica_set_scalings(namespace: str) -> list[int]:
    """Every replica count the Deployment controller scaled a ReplicaSet to (from its Events)."""
    return [
        int(m.group(1))
        for e in events(namespace)
        if e.get("reason") == "ScalingReplicaSet"
        for m in [re.search(r" to (\d+)", e.get("message") or "")]
        if m
    ]


def _settled(op: OperatorProcess, namespace: str) -> None:
    """Wait until the loop has run on the current state: the status mirrors the Deployment (whose
    controller has created the Pending pods) and the metrics condition is set, then two more ticks for
    any write that legitimately follows a change."""

    def mirrored() -> bool:
        obj = get_obj(LLMS, NAME, namespace)
        deployment = get_obj("deployment", NAME, namespace)
        status = (obj or {}).get("status") or {}
        dstatus = (deployment or {}).get("status") or {}
        if obj is None or deployment is None:
            return False
        return bool(
            condition(obj, "MetricsAvailable")
            and dstatus.get("observedGeneration") == deployment["metadata"]["generation"]
            and dstatus.get("replicas") == deployment["spec"]["replicas"]
            and status.get("replicas") == dstatus.get("replicas")
        )

    wait_for(mirrored, CONVERGE_S, message=lambda: f"status mirrors the Deployment\n{op.log_tail()}")
    op.wait_for_log(TICK, count=op.ticks() + 2, timeout=CONVERGE_S)


def _versions(namespace: str) -> dict[str, str]:
    out = {}
    for kind, name in {"llmservice": NAME, **child_names(NAME)}.items():
        resource = LLMS if kind == "llmservice" else kind
        obj = get_obj(resource, name, namespace)
        assert obj is not None, f"{kind}/{name} is missing"
        out[kind] = obj["metadata"]["resourceVersion"]
    return out


def _writes(namespace: str, versions: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per object, every write since its recorded resourceVersion (none when the version is unchanged)."""
    names = {"llmservice": NAME, **child_names(NAME)}

    def since(kind: str, rv: str) -> list[dict[str, Any]]:
        resource = LLMS if kind == "llmservice" else kind
        current = get_obj(resource, names[kind], namespace)
        now = None if current is None else current["metadata"]["resourceVersion"]
        if now == rv:
            return []
        try:
            return writes_since(collection_path(*CHILD_COLLECTIONS[kind], namespace), names[kind], rv)
        except HistoryExpired:
            return [{"type": "MODIFIED" if now else "DELETED", "resourceVersion": now, "manager": "?"}]

    # Each watch is closed by the server after a second: read them side by side.
    with ThreadPoolExecutor(len(versions)) as pool:
        futures = {kind: pool.submit(since, kind, rv) for kind, rv in versions.items()}
        return {kind: future.result() for kind, future in futures.items()}


def _new_events(namespace: str, before: dict[str, str]) -> list[dict[str, Any]]:
    return [
        e for e in events(namespace) if before.get(e["metadata"]["name"]) != e["metadata"]["resourceVersion"]
    ]


# --- scaling ------------------------------------------------------------------------------------------------


def test_scale_subresource_drives_the_deployment_within_bounds(
    namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    op, _, kids = _start_and_reconcile(operator, namespace, {"scaling": {"minReplicas": 1, "maxReplicas": 4}})
    assert kids["deployment"]["spec"]["replicas"] == 1

    # `kubectl scale` writes spec.replicas through the scale subresource; the Deployment follows and the
    # status (the subresource's statusReplicasPath) reports it back.
    kubectl("scale", "llms", NAME, "-n", namespace, "--replicas=3")
    wait_for(lambda: _deployment_replicas(namespace) == 3, CONVERGE_S, message=op.log_tail)
    wait_for(
        lambda: (get_obj(LLMS, NAME, namespace).get("status") or {}).get("replicas") == 3,
        CONVERGE_S,
        message=lambda: f"status.replicas == 3\n{op.log_tail()}",
    )
    scale = kubectl(
        "get", "--raw", f"/apis/serving.drift.dev/v1alpha1/namespaces/{namespace}/llmservices/{NAME}/scale"
    )
    assert '"replicas":3' in scale.replace(" ", ""), scale
    # A value within bounds is the user's decision: the loop keeps it (three ticks later, still 3).
    op.wait_for_log(TICK, count=op.ticks() + 3, timeout=CONVERGE_S)
    assert _spec_replicas(namespace) == 3 and _deployment_replicas(namespace) == 3

    # Beyond maxReplicas: the operator clamps spec.replicas to the bound, and the Deployment never
    # sees the out-of-bounds value.
    kubectl("scale", "llms", NAME, "-n", namespace, "--replicas=9")
    wait_for(
        lambda: _spec_replicas(namespace) == 4 and _deployment_replicas(namespace) == 4,
        CONVERGE_S,
        message=lambda: f"spec.replicas and the Deployment clamped to 4\n{op.log_tail()}",
    )

    def decisions() -> list[dict[str, Any]]:
        return (get_obj(LLMS, NAME, namespace).get("status") or {}).get("lastDecisions") or []

    # ... and records the decision (the status patch follows the spec.replicas write).
    wait_for(
        lambda: any(
            d.get("type") == "Scale" and (d.get("from"), d.get("to")) == ("9", "4") for d in decisions()
        ),
        CONVERGE_S,
        message=lambda: f"a Scale decision 9 -> 4 in status.lastDecisions: {decisions()}\n{op.log_tail()}",
    )

    scalings = _replica_set_scalings(namespace)
    assert scalings and max(scalings) <= 4, (
        f"the Deployment went above maxReplicas 4: ReplicaSet scaled to {scalings}"
    )
    op.assert_alive()


def test_scale_below_min_replicas_returns_to_the_minimum(
    namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    """Out of bounds below: brought back to minReplicas, also right after the operator's own scaling
    (which once made it hold, WaitingForEffect, before checking the bounds: forever, without metrics)."""
    op, _, _ = _start_and_reconcile(
        operator, namespace, {"replicas": 2, "scaling": {"minReplicas": 2, "maxReplicas": 4}}
    )
    # First an out-of-bounds value the operator corrects itself (so it has just scaled) ...
    kubectl("scale", "llms", NAME, "-n", namespace, "--replicas=9")
    wait_for(
        lambda: _spec_replicas(namespace) == 4 and _deployment_replicas(namespace) == 4,
        CONVERGE_S,
        message=lambda: f"spec.replicas and the Deployment clamped to 4\n{op.log_tail()}",
    )
    # ... then zero. The operator owns replicas and never scales to zero: it brings spec.replicas back to
    # minReplicas, and the Deployment never leaves [minReplicas, maxReplicas].
    kubectl("scale", "llms", NAME, "-n", namespace, "--replicas=0")
    wait_for(
        lambda: _spec_replicas(namespace) == 2 and _deployment_replicas(namespace) == 2,
        CONVERGE_S,
        message=lambda: f"spec.replicas and the Deployment at minReplicas 2\n{op.log_tail()}",
    )
    op.wait_for_log(TICK, count=op.ticks() + 3, timeout=CONVERGE_S)
    obj = get_obj(LLMS, NAME, namespace)
    assert obj["spec"]["replicas"] == 2, obj["spec"]
    assert _ready_reason(namespace) != "ScaledToZero", condition(obj, "Ready")
    scalings = _replica_set_scalings(namespace)
    assert scalings and min(scalings) >= 2 and max(scalings) <= 4, (
        f"the Deployment left [minReplicas, maxReplicas] = [2, 4]: ReplicaSet scaled to {scalings}"
    )


# --- specs the API server accepts but the operator cannot serve ---------------------------------------------

# The CRD validates each engine field alone; the agent's EngineConfig also rejects this combination
# (a step budget smaller than one KV block), which only the operator can report.
UNSERVABLE_ENGINE = {"maxModelLen": 64, "blockSize": 64, "maxNumBatchedTokens": 32}


def test_unservable_spec_is_reported_invalid_and_nothing_is_rolled_out(
    namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    result = run_kubectl(
        "apply", "-f", "-", stdin=yaml.safe_dump(llmservice(NAME, namespace, {"engine": UNSERVABLE_ENGINE}))
    )
    assert result.returncode == 0, (
        f"the API server now refuses this spec itself; pick another:\n{result.stderr}"
    )
    op = operator(namespace)

    def invalid() -> dict[str, Any] | None:
        ready = condition(get_obj(LLMS, NAME, namespace), "Ready")
        return ready if ready and ready.get("reason") == "InvalidSpec" else None

    ready = wait_for(invalid, FIRST_RECONCILE_S, message=lambda: f"Ready=False InvalidSpec\n{op.log_tail()}")
    assert ready["status"] == "False"
    assert "batched" in ready["message"].lower(), f"the message does not say what is wrong: {ready}"
    obj = get_obj(LLMS, NAME, namespace)
    progressing = condition(obj, "Progressing")
    assert progressing and progressing["reason"] == "InvalidSpec", progressing
    warnings = [
        e for e in events(namespace) if e.get("reason") == "InvalidSpec" and e.get("type") == "Warning"
    ]
    assert warnings, describe_events(events(namespace))
    assert get_obj("deployment", NAME, namespace) is None, "a Deployment was rolled out for an invalid spec"
    assert get_obj("configmap", f"{NAME}-engine", namespace) is None, (
        "engine.yaml was written for an invalid spec"
    )

    # Fixing the spec recovers without a restart.
    kubectl(
        "patch",
        "llms",
        NAME,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"engine":{"maxNumBatchedTokens":2048}}}',
    )
    wait_for(
        lambda: _ready_reason(namespace) == "NoReplicasReady" and reconciled(NAME, namespace),
        CONVERGE_S,
        message=lambda: f"recovered once the spec is fixed\n{op.log_tail()}",
    )
    op.assert_alive()


# --- RBAC ---------------------------------------------------------------------------------------------------


def test_namespace_without_secrets_rolebinding_is_reported_not_fatal(
    namespace_factory: Callable[..., str], operator: Callable[..., OperatorProcess]
) -> None:
    """docs: each managed namespace needs the drift-operator-secrets RoleBinding. Without it the
    LLMService must say so in its Ready condition, and the operator must keep running (and recover
    once the binding exists)."""
    namespace = namespace_factory(secrets_rolebinding=False)
    apply(llmservice(NAME, namespace))
    op = operator(namespace)

    def reported() -> dict[str, Any] | None:
        ready = condition(get_obj(LLMS, NAME, namespace), "Ready")
        return (
            ready
            if ready and ready.get("status") == "False" and "secret" in ready["message"].lower()
            else None
        )

    ready = wait_for(
        reported, FIRST_RECONCILE_S, message=lambda: f"Ready=False about Secrets\n{op.log_tail()}"
    )
    message = ready["message"].lower()
    assert "forbidden" in message or "permission" in message, f"the missing permission is not named: {ready}"
    # docs/operator.md, "Namespaces": ReconcileFailed, with the command that fixes it in the message.
    assert ready["reason"] == "ReconcileFailed", ready
    fix = f"kubectl create rolebinding drift-operator-secrets -n {namespace}"
    assert fix in ready["message"], f"the message does not give the fix ({fix!r}): {ready['message']}"
    warnings = [
        e for e in events(namespace) if e.get("reason") == "ReconcileFailed" and e.get("type") == "Warning"
    ]
    assert warnings, describe_events(events(namespace))
    assert get_obj("deployment", NAME, namespace) is None
    op.wait_for_log(TICK, count=op.ticks() + 2, timeout=CONVERGE_S)
    op.assert_alive()

    kubectl(
        "create", "rolebinding", "drift-operator-secrets", "-n", namespace,
        "--clusterrole=drift-operator-secrets", "--serviceaccount=drift-system:drift-operator",
    )  # fmt: skip
    wait_for(
        lambda: _ready_reason(namespace) == "NoReplicasReady" and reconciled(NAME, namespace),
        CONVERGE_S,
        message=lambda: f"recovered once the RoleBinding exists\n{op.log_tail()}",
    )


def test_operator_starts_promptly_with_the_shipped_rbac(
    namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    """`drift operator -n NS` as the ServiceAccount: no 403 anywhere, first reconciliation in seconds. (kopf
    lists and watches namespaces unless scanning is disabled; the shipped RBAC grants neither, and kopf
    retried the 403 for ~54 s before falling back.)"""
    apply(llmservice(NAME, namespace))
    started = time.monotonic()
    op = operator(namespace)
    wait_for(lambda: reconciled(NAME, namespace), FIRST_RECONCILE_S, message=op.log_tail)
    elapsed = time.monotonic() - started
    forbidden = [line for line in op.log_text().splitlines() if "forbidden" in line.lower() or " 403" in line]
    print(
        f"operator as the ServiceAccount: first reconciliation after {elapsed:.1f}s, {len(forbidden)} 403 lines"
    )
    assert not forbidden, (
        f"the shipped RBAC lacks something the operator does ({elapsed:.1f}s):\n" + "\n".join(forbidden[:5])
    )
    assert elapsed < 30, f"first reconciliation took {elapsed:.1f}s"


# --- no writes when nothing changes -------------------------------------------------------------------------


def test_idle_service_is_not_written_to(namespace: str, operator: Callable[..., OperatorProcess]) -> None:
    """The operator writes status on change only (plus a heartbeat of several minutes): over 10 loop ticks
    of an idle, steady service (pods Pending, no metrics) nothing changes, so nothing is written."""
    op, _, _ = _start_and_reconcile(operator, namespace)
    _settled(op, namespace)
    versions = _versions(namespace)
    before_events = event_keys(namespace)
    ticks = op.ticks()
    op.wait_for_log(TICK, count=ticks + STEADY_TICKS, timeout=CONVERGE_S)
    window = op.ticks() - ticks
    writes = _writes(namespace, versions)
    new_events = _new_events(namespace, before_events)
    counts = {kind: len(found) for kind, found in writes.items()}
    summary = f"over {window} loop ticks: writes {counts}, new events {len(new_events)}"
    print(f"idle LLMService, {summary}")
    # At most one write: a heartbeat of several minutes may fall into the window, a per-tick write may not.
    assert counts["llmservice"] <= 1, f"{summary}; LLMService writes: {writes['llmservice']}"
    assert all(counts[kind] == 0 for kind in counts if kind != "llmservice"), f"{summary}: {writes}"
    assert not new_events, f"{summary}: {describe_events(new_events)}"


def test_restart_writes_nothing(namespace: str, operator: Callable[..., OperatorProcess]) -> None:
    """Stopping and starting the operator over a reconciled, steady service writes nothing: no status,
    no children, no Events, across the resume and the first ticks of the new process."""
    op, _, _ = _start_and_reconcile(operator, namespace)
    _settled(op, namespace)
    code = op.stop()
    assert code is not None and code >= 0, f"the operator did not stop on SIGINT within 5 s (exit {code})"
    versions = _versions(namespace)
    before_events = event_keys(namespace)

    op.start()
    op.wait_for_log(TICK, count=RESTART_TICKS, timeout=FIRST_RECONCILE_S)
    writes = _writes(namespace, versions)
    new_events = _new_events(namespace, before_events)
    counts = {kind: len(found) for kind, found in writes.items()}
    summary = f"restart + {op.ticks()} loop ticks: writes {counts}, new events {len(new_events)}"
    print(f"operator restart, {summary}")
    assert not any(counts.values()), f"{summary}: {writes}"
    assert not new_events, f"{summary}: {describe_events(new_events)}"
    op.assert_alive()


# --- deletion (last: the garbage collector knows the CRD's kind only ~30 s after it was created) --------------


def test_deleting_the_llmservice_collects_its_children(
    installed: Install, namespace: str, operator: Callable[..., OperatorProcess]
) -> None:
    op, obj, kids = _start_and_reconcile(operator, namespace)
    uid = obj["metadata"]["uid"]
    selector = obj["status"]["selector"]
    wait_for(lambda: list_items("pods", namespace, selector), CONVERGE_S, message="agent pods created")

    kubectl("delete", "llms", NAME, "-n", namespace, "--wait=false")
    wait_for(
        lambda: get_obj(LLMS, NAME, namespace) is None,
        CONVERGE_S,
        message=lambda: f"the LLMService (its finalizer) is gone\n{op.log_tail()}",
    )

    def remaining() -> list[str]:
        left = [
            f"{kind}/{name}" for kind, name in child_names(NAME).items() if get_obj(kind, name, namespace)
        ]
        left += [
            f"replicaset/{r['metadata']['name']}" for r in list_items("replicasets", namespace, selector)
        ]
        left += [f"pod/{p['metadata']['name']}" for p in list_items("pods", namespace, selector)]
        return left

    # The garbage collector rescans resource types every ~30 s; allow for a young CRD on top of 90 s.
    timeout = 90.0 + max(0.0, 35.0 - installed.crd_age())
    wait_for(lambda: not remaining(), timeout, message=lambda: f"children of {uid} left: {remaining()}")
    op.assert_alive()
