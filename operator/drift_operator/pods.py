"""Agent pods as the loop sees them, and which of them need the runtime policy pushed (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .constants import AGENT_CONTAINER, AGENT_PORT, AGENT_PORT_NAME
from .metrics import PodSample
from .spec import LLMServiceSpec

# A reported split this far from the pushed one means the agent lost our setting (e.g. it restarted).
_SHARE_MISMATCH = 0.1


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    ip: str | None
    port: int
    ready: bool
    restarts: int

    @property
    def base_url(self) -> str:
        return f"http://{self.ip}:{self.port}"

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
    port = AGENT_PORT
    restarts = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == AGENT_CONTAINER:
            for p in container.get("ports") or []:
                if p.get("name") == AGENT_PORT_NAME and p.get("containerPort"):
                    port = int(p["containerPort"])
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
    )


def runtime_state(spec: LLMServiceSpec, prefill_share: float) -> dict[str, Any]:
    """The body of PUT /admin/policy: everything the agent can change without a restart."""
    return {
        "policy": spec.policy,
        "partition": {
            "mode": spec.partition.mode,
            "prefill_sm_share": round(prefill_share, 4),
            "fold_max_tokens": spec.partition.fold_max_tokens,
        },
        "slo": {"ttft_ms": spec.slo.ttft_ms, "tpot_ms": spec.slo.tpot_ms},
    }


def pods_to_push(
    desired: Mapping[str, Any],
    pods: Sequence[PodView],
    pushed: Mapping[str, Mapping[str, Any]],
    samples: Mapping[str, PodSample],
) -> list[PodView]:
    """Ready pods whose runtime state is not known to match `desired`.

    `pushed` maps a pod's push key to the state last accepted (or rejected: no retry of the same body);
    `samples` (by uid) lets a pod's own metrics reveal that it no longer runs what we pushed.
    """
    out = []
    share = desired["partition"]["prefill_sm_share"]
    for pod in pods:
        if not pod.ready:
            continue
        if pushed.get(pod.push_key) != desired:
            out.append(pod)
            continue
        sample = samples.get(pod.uid)
        if sample is None:
            continue
        wrong_policy = sample.policy is not None and sample.policy != desired["policy"]
        wrong_share = (
            desired["partition"]["mode"] != "off"
            and desired["policy"] in ("drift", "static-split")
            and sample.prefill_share is not None
            and abs(sample.prefill_share - share) > _SHARE_MISMATCH
        )
        if wrong_policy or wrong_share:
            out.append(pod)
    return out
