"""Apply planning: API-server defaults and normalisation are not differences; removed fields are removed."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from drift_operator.diff import is_subset, last_applied, parse_quantity, plan_apply, plan_secret, removals
from drift_operator.render import Owner, render_children, render_secret
from drift_operator.spec import parse_spec

OWNER = Owner("chat", "ns", "uid-1")


def _deployment(raw: dict[str, Any]) -> dict[str, Any]:
    return render_children(OWNER, parse_spec(raw), "operator", False).deployment


def _as_served(desired: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns after a create: our fields plus its defaults and normalisation."""
    live = copy.deepcopy(desired)
    live["metadata"].update(
        uid="d-1", resourceVersion="42", generation=1, creationTimestamp="2026-01-01T00:00:00Z"
    )
    pod = live["spec"]["template"]["spec"]
    pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
    container = pod["containers"][0]
    container.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
    container["readinessProbe"]["successThreshold"] = 1
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        limits["cpu"] = "500m"  # the API server normalises "0.5"
    live["spec"]["revisionHistoryLimit"] = 10
    live["status"] = {"replicas": 1}
    return live


@pytest.mark.parametrize(
    "text,value",
    [("500m", "0.5"), ("0.5", "0.5"), ("2Gi", str(2 * 1024**3)), ("1k", "1000"), (3, "3"), ("1e3", "1000")],
)
def test_parse_quantity(text: Any, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


def test_parse_quantity_rejects_non_quantities() -> None:
    assert parse_quantity("http") is None and parse_quantity(True) is None and parse_quantity("1Xi") is None


def test_api_defaults_and_normalised_quantities_are_in_sync() -> None:
    desired = _deployment({"resources": {"limits": {"cpu": "0.5"}}})
    first = plan_apply(desired, None)
    assert first.action == "create"
    assert plan_apply(desired, _as_served(first.body)).action == "noop"


def test_a_hand_edit_is_put_back() -> None:
    desired = _deployment({})
    live = _as_served(plan_apply(desired, None).body)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    live["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "EXTRA", "value": "1"})
    plan = plan_apply(desired, live)
    assert plan.action == "patch"
    container = plan.body["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == desired["spec"]["template"]["spec"]["containers"][0]["image"]
    assert all(e["name"] != "EXTRA" for e in container["env"])  # merge patches replace lists whole


def test_fields_no_longer_rendered_are_removed() -> None:
    before = _deployment({"resources": {"nodeSelector": {"gpu": "h100"}}})
    live = _as_served(plan_apply(before, None).body)
    after = _deployment({})
    plan = plan_apply(after, live)
    assert plan.action == "patch"
    assert plan.body["spec"]["template"]["spec"]["nodeSelector"] is None  # JSON merge patch: delete


def test_removals_recurse_into_dicts() -> None:
    assert removals({"a": 1, "b": {"c": 1, "d": 2}}, {"b": {"c": 1}}) == {"a": None, "b": {"d": None}}
    assert removals({"a": [1]}, {"a": []}) == {}


def test_subset_semantics() -> None:
    assert is_subset({"a": 1}, {"a": 1, "b": 2})
    assert not is_subset({"a": [1, 2]}, {"a": [1]})
    assert is_subset({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]})
    assert not is_subset({"a": True}, {"a": 1})
    assert is_subset({"memory": "1Gi"}, {"memory": "1024Mi"})


def test_last_applied_annotation_round_trips() -> None:
    desired = _deployment({})
    body = plan_apply(desired, None).body
    recorded = last_applied(body)
    assert recorded is not None and recorded["spec"]["replicas"] == 1
    assert (
        last_applied({"metadata": {"annotations": {"serving.drift.dev/last-applied": "{not json"}}}) is None
    )


def test_secrets_are_never_rewritten() -> None:
    desired = render_secret(OWNER, "new-token")
    live = copy.deepcopy(render_secret(OWNER, "old-token"))
    assert plan_secret(desired, live).action == "noop"
    live["metadata"]["ownerReferences"] = []
    plan = plan_secret(desired, live)
    assert plan.action == "patch" and "data" not in plan.body


def test_foreign_objects_are_never_taken_over() -> None:
    from drift_operator.diff import foreign_owner

    ours = {"metadata": {"ownerReferences": [{"uid": "uid-1", "controller": True}]}}
    theirs = {
        "metadata": {"ownerReferences": [{"uid": "x", "kind": "Helm", "name": "r", "controller": True}]}
    }
    assert foreign_owner(None, "uid-1") is None and foreign_owner(ours, "uid-1") is None
    assert "Helm/r" in (foreign_owner(theirs, "uid-1") or "")
    assert "not created by this LLMService" in (foreign_owner({"metadata": {}}, "uid-1") or "")
