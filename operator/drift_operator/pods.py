"""Agent pods as the loop sees them, and which of them need the runtime policy pushed (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .constants import AGENT_ADMIN_PORT_NAME, AGENT_CONTAINER, AGENT_PORT, AGENT_PORT_NAME
from .metrics import PodSample

# Configured values the agent reports further than this from what we pushed mean it lost our setting.
_CONFIG_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    ip: str | None
    port: int
    ready: bool
    restarts: int
    admin_port: int | None = None  # the admin API's own port, when the pod declares one

    @property
    def base_url(self) -> str:
        return self._url(self.port)

    @property
    def admin_url(self) -> str:
        return self._url(self.admin_port or self.port)

    def _url(self, port: int) -> str:
        host = f"[{self.ip}]" if self.ip and ":" in self.ip else self.ip  # IPv6 literals are bracketed
        return f"http://{host}:{port}"

    @property
    def push_key(self) -> str:
        # A container restart keeps the pod uid but loses the pushed runtime state, so it is part of the key.
        return f"{self.uid}/{self.restarts}"


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """None for pods on their way out (they are no longer part of the service)."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    status = pod.get("status") or {}
    ready = any(
        cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in status.get("conditions") or []
    )
    port, admin_port = AGENT_PORT, None
    restarts = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == AGENT_CONTAINER:
            for p in container.get("ports") or []:
                if p.get("name") == AGENT_PORT_NAME and p.get("containerPort"):
                    port = int(p["containerPort"])
                elif p.get("name") == AGENT_ADMIN_PORT_NAME and p.get("containerPort"):
                    admin_port = int(p["containerPort"])
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == AGENT_CONTAINER:
            restarts = int(cs.get("restartCount") or 0)
    return PodView(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", meta.get("name", ""))),
        ip=status.get("podIP"),
        port=port,
        ready=ready and bool(status.get("podIP")),
        restarts=restarts,
        admin_port=admin_port,
    )


def _reports_other_state(desired: Mapping[str, Any], sample: PodSample) -> bool:
    """Whether the agent's own metrics show configured settings other than `desired` (it restarted, or
    someone else changed them). The per-step split the dispatcher picks is not a configured setting."""
    if sample.policy is not None and sample.policy != desired["policy"]:
        return True
    for key, value in desired["partition"].items():
        reported = sample.configured.get(key)
        if (
            isinstance(value, int | float)
            and reported is not None
            and abs(reported - value) > _CONFIG_TOLERANCE
        ):
            return True
    return False


def pods_to_push(
    desired: Mapping[str, Any],
    pods: Sequence[PodView],
    pushed: Mapping[str, Mapping[str, Any]],
    rejected: Mapping[str, Mapping[str, Any]],
    samples: Mapping[str, PodSample],
) -> list[PodView]:
    """Ready pods whose runtime state is not known to match `desired`.

    `pushed` maps a pod's push key to the state it last accepted, `rejected` to a state it refused (not sent
    again: the same body cannot succeed; a new desired state or a restarted pod is tried afresh); `samples`
    (by uid) lets a pod's own metrics reveal that it no longer runs what it accepted.
    """
    out = []
    for pod in pods:
        if not pod.ready or rejected.get(pod.push_key) == desired:
            continue
        if pushed.get(pod.push_key) != desired:
            out.append(pod)
            continue
        sample = samples.get(pod.uid)
        if sample is not None and _reports_other_state(desired, sample):
            out.append(pod)
    return out
