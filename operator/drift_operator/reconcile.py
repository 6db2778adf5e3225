"""Converge an LLMService's children onto their rendered form (the I/O half of rendering)."""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import constants as c
from .diff import Plan, foreign_owner, plan_apply, plan_secret
from .kube import KubeApiError, KubeClient, object_path
from .render import Owner, render_children, render_secret, render_service
from .spec import LLMServiceSpec
from .status import DeploymentState

_KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Secret": ("v1", "secrets"),
    "Service": ("v1", "services"),
    "Deployment": ("apps/v1", "deployments"),
    "PodMonitor": (f"{c.MONITORING_GROUP}/{c.MONITORING_VERSION}", "podmonitors"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
}
# Deleted when the router is switched off: the pods first, their identity and grant last.
_ROUTER_KINDS = ("Deployment", "RoleBinding", "Role", "ServiceAccount")


class ChildConflict(KubeApiError):
    """A child's name is taken by an object this LLMService does not own."""

    def __init__(self, kind: str, name: str, why: str) -> None:
        super().__init__(409, "ChildConflict", f"{kind}/{name}: {why}; rename the LLMService or remove it")


def _check_owner(kind: str, name: str, live: dict[str, Any] | None, uid: str) -> None:
    why = foreign_owner(live, uid)
    if why is not None:
        raise ChildConflict(kind, name, why)


@dataclass
class ApplyResult:
    deployment: dict[str, Any] | None = None
    router_deployment: dict[str, Any] | None = None  # live; None when the router is off
    token: str | None = None
    actions: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(action != "noop" for action in self.actions.values())


def _paths(kind: str, namespace: str, name: str) -> tuple[str, str]:
    api_version, plural = _KINDS[kind]
    return object_path(api_version, plural, namespace), object_path(api_version, plural, namespace, name)


async def _execute(kube: KubeClient, kind: str, namespace: str, name: str, plan: Plan, live: Any) -> Any:
    collection, item = _paths(kind, namespace, name)
    if plan.action == "create":
        assert plan.body is not None
        try:
            return await kube.create(collection, plan.body)
        except KubeApiError as exc:
            if exc.status != 409:  # 409: created concurrently (e.g. by a previous, interrupted run)
                raise
            _check_owner(kind, name, await kube.get(item), plan.body["metadata"]["ownerReferences"][0]["uid"])
            return await kube.patch(
                item, {k: v for k, v in plan.body.items() if k not in ("apiVersion", "kind")}
            )
    if plan.action == "patch":
        assert plan.body is not None
        return await kube.patch(item, plan.body)
    return live


async def apply_one(
    kube: KubeClient, desired: dict[str, Any], actions: dict[str, str]
) -> dict[str, Any] | None:
    kind, meta = desired["kind"], desired["metadata"]
    _, item = _paths(kind, meta["namespace"], meta["name"])
    live = await kube.get(item)
    _check_owner(kind, meta["name"], live, meta["ownerReferences"][0]["uid"])
    plan = plan_apply(desired, live)
    actions[f"{kind}/{meta['name']}"] = plan.action
    return await _execute(kube, kind, meta["namespace"], meta["name"], plan, live)


def _decode_token(secret: dict[str, Any] | None) -> str | None:
    raw = ((secret or {}).get("data") or {}).get(c.ADMIN_TOKEN_KEY)
    if not raw:
        return None
    try:
        return base64.b64decode(raw).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


async def delete_owned(kube: KubeClient, kind: str, namespace: str, name: str, uid: str) -> bool:
    """Delete a child only if it is there and ours (controller reference to `uid`); True when deleted."""
    _, item = _paths(kind, namespace, name)
    live = await kube.get(item)
    refs = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
    if not any(ref.get("uid") == uid and ref.get("controller") for ref in refs):
        return False
    try:
        await kube.request("DELETE", item)
    except KubeApiError as exc:
        if exc.status != 404:  # gone meanwhile (e.g. the garbage collector)
            raise
    return True


async def monitoring_available(kube: KubeClient) -> bool:
    """Whether the Prometheus Operator's CRDs are installed (PodMonitors are then worth creating)."""
    served = await kube.served_resources(f"{c.MONITORING_GROUP}/{c.MONITORING_VERSION}")
    return "podmonitors" in served


async def reconcile_children(
    kube: KubeClient,
    owner: Owner,
    spec: LLMServiceSpec,
    *,
    owner_of_replicas: str,
    with_monitoring: bool,
    token_factory: Callable[[], str] = lambda: secrets.token_urlsafe(32),
) -> ApplyResult:
    """Create or fix every child; raises SpecError (renders nothing) or KubeApiError (stops midway)."""
    children = render_children(owner, spec, owner_of_replicas, with_monitoring)
    result = ApplyResult()

    # The Secret first: the Deployment's pods reference it and would not start without it.
    _, secret_item = _paths("Secret", owner.namespace, c.secret_name(owner.name))
    live_secret = await kube.get(secret_item)
    _check_owner("Secret", c.secret_name(owner.name), live_secret, owner.uid)
    token = _decode_token(live_secret)
    if live_secret is None or token is None:
        token = token_factory()
    desired_secret = render_secret(owner, token)
    if live_secret is not None and _decode_token(live_secret) is None:
        plan = Plan("patch", {"data": desired_secret["data"]})  # repair a token someone removed
    else:
        plan = plan_secret(desired_secret, live_secret)
    result.actions[f"Secret/{c.secret_name(owner.name)}"] = plan.action
    await _execute(kube, "Secret", owner.namespace, c.secret_name(owner.name), plan, live_secret)
    result.token = token

    await apply_one(kube, children.configmap, result.actions)
    if children.agents_service is not None:
        await apply_one(kube, children.agents_service, result.actions)
    result.deployment = await apply_one(kube, children.deployment, result.actions)
    # Router on: its objects exist first, and the client Service turns to its pods only once one of them is
    # ready (until then, and whenever none is, it keeps selecting the agents: clients never face a Service
    # without endpoints). Router off: the client Service turns back to the agents before the router goes.
    service = children.service
    if children.router is not None:
        for obj in children.router.objects():
            live = await apply_one(kube, obj, result.actions)
        result.router_deployment = live
        if DeploymentState.from_live(live).ready < 1:
            service = render_service(owner, router=False)
    await apply_one(kube, service, result.actions)
    if children.router is None:
        for kind in _ROUTER_KINDS:
            name = c.router_name(owner.name)
            if await delete_owned(kube, kind, owner.namespace, name, owner.uid):
                result.actions[f"{kind}/{name}"] = "delete"

    if children.podmonitor is not None:
        await apply_one(kube, children.podmonitor, result.actions)
    elif (
        with_monitoring
        and not spec.monitoring.enabled
        # Monitoring switched off: remove the PodMonitor we made (and only ours).
        and await delete_owned(kube, "PodMonitor", owner.namespace, owner.name, owner.uid)
    ):
        result.actions[f"PodMonitor/{owner.name}"] = "delete"
    return result
