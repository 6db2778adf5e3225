"""The LLMService spec as pydantic models: the operator's single reading of the CR.

The settings the agent has take its own defaults, enums and bounds (`EngineConfig`, `PartitionConfig`); the
CRD's OpenAPI schema repeats them for the API server (a test compares the two), and the model validators
re-check the CRD's CEL rules, so a spec that reached us without server-side validation (an old API server, a
test emulator) is still reported as invalid in status rather than half-applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from drift_agent.core.config import (
    AttentionBackend,
    DeviceName,
    Dtype,
    EngineConfig,
    PartitionBackend,
    PartitionConfig,
    PartitionMode,
    PolicyName,
    field_bounds,
)
from drift_agent.core.fairness import Fairness
from drift_agent.core.preemption import PreemptionMode
from drift_agent.routing.policies import DEFAULT_ROUTER

from .constants import ANNOTATION_REPLICAS_OWNER, DEFAULT_IMAGE

DURATION_PATTERN = r"^[1-9][0-9]*(s|m|h)$"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
QuantityValue = str | int
SteeredSetting = Literal["prefill_sm_share", "tpot_margin"]


_AS_THE_AGENT: Any = object()


def _agent_field(model: type[BaseModel], name: str, default: Any = _AS_THE_AGENT) -> Any:
    """The CR field for the agent's setting `name` of `model`: its default (unless given) and bounds, defined
    once in the agent's model (the CRD restates them for the API server; a test keeps the two equal)."""
    field = model.model_fields[name]
    return Field(field.default if default is _AS_THE_AGENT else default, **field_bounds(field))


def _engine(name: str) -> Any:
    return _agent_field(EngineConfig, name)


def _partition(name: str, default: Any = _AS_THE_AGENT) -> Any:
    return _agent_field(PartitionConfig, name, default)


class SpecError(ValueError):
    """The spec cannot be served as written; the message is shown in the Ready condition."""


def parse_duration(text: str) -> float:
    """'90s' / '5m' / '1h' -> seconds (the CRD's pattern admits exactly these)."""
    match = re.fullmatch(DURATION_PATTERN, text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: expected a number and s|m|h, e.g. '5m'")
    return float(text[:-1]) * _DURATION_UNITS[text[-1]]


class _CRModel(BaseModel):
    # camelCase on the wire (as in every Kubernetes API), snake_case in Python.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSpec(_CRModel):
    source: Literal["embedded", "pvc", "hostPath", "image"] = "embedded"
    # pvc/hostPath: a directory relative to the volume's root; image: an absolute path inside the image.
    path: str | None = Field(None, max_length=4096)
    claim_name: str | None = Field(None, max_length=253)
    host_path: str | None = Field(None, max_length=4096)
    served_model_name: str | None = None

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.source == "pvc" and not self.claim_name:
            raise ValueError("model.claimName is required when model.source is 'pvc'")
        if self.source == "hostPath" and not self.host_path:
            raise ValueError("model.hostPath is required when model.source is 'hostPath'")
        if self.source == "image" and not (self.path and self.path.startswith("/")):
            raise ValueError("model.path must be an absolute path when model.source is 'image'")
        if (
            self.source in ("pvc", "hostPath")
            and self.path
            and (self.path.startswith("/") or ".." in self.path)
        ):
            raise ValueError("model.path must be relative to the volume (no leading '/', no '..')")
        if self.source == "embedded" and (self.path or self.claim_name or self.host_path):
            raise ValueError("model.path/claimName/hostPath make no sense with model.source 'embedded'")
        return self


class EngineSpec(_CRModel):
    """The agent's `EngineConfig` settings a CR may set (the rest the operator renders itself)."""

    dtype: Dtype = _engine("dtype")
    device: DeviceName = _engine("device")
    max_model_len: int | None = _engine("max_model_len")
    block_size: int = _engine("block_size")
    num_kv_blocks: int | None = _engine("num_kv_blocks")
    kv_cache_memory_gb: float | None = _engine("kv_cache_memory_gb")
    # Host-memory KV tier: the operator adds it to the container's memory request (and limit, when set).
    swap_space_gb: float = _engine("swap_space_gb")
    # Pushed live through PUT /admin/policy (no restart), as the policy is.
    preemption_mode: PreemptionMode = _engine("preemption_mode")
    fairness: Fairness = _engine("fairness")
    fairness_preempt_gap: float = _engine("fairness_preempt_gap")
    gpu_memory_utilization: float = _engine("gpu_memory_utilization")
    max_num_seqs: int = _engine("max_num_seqs")
    max_num_batched_tokens: int = _engine("max_num_batched_tokens")
    max_waiting_requests: int = _engine("max_waiting_requests")
    enable_prefix_caching: bool = _engine("enable_prefix_caching")
    attention_backend: AttentionBackend = _engine("attention_backend")
    num_threads: int | None = _engine("num_threads")
    seed: int = Field(EngineConfig.model_fields["seed"].default, ge=0)  # the CRD admits no negative seed
    profile_path: str | None = _engine("profile_path")


class PartitionSpec(_CRModel):
    """The agent's `PartitionConfig` (defaults and bounds are its own), and how the operator steers it."""

    mode: PartitionMode = _partition("mode")
    # auto: the starting split, then steered by the operator; static: the fixed split.
    prefill_sm_share: float = _partition("prefill_sm_share")
    min_prefill_sm_share: float = _partition("prefill_sm_share", default=0.1)
    max_prefill_sm_share: float = _partition("prefill_sm_share", default=0.9)
    step: float = Field(0.05, gt=0.0, le=0.5)
    cooldown_seconds: int = Field(60, ge=0)
    backend: PartitionBackend = _partition("backend")
    # drift: most prompt tokens folded into one decode step (the dispatcher's folding); 0 never folds.
    fold_max_tokens: int = _partition("fold_max_tokens")
    # drift: the dispatcher's internal TPOT margin (predicted step x (1 + margin) must fit the step budget).
    # auto: the starting margin, then steered (up when TPOT lags, down when TTFT lags); static: fixed.
    tpot_margin: float = _partition("tpot_margin")
    min_tpot_margin: float = _partition("tpot_margin", default=-0.3)
    max_tpot_margin: float = _partition("tpot_margin", default=0.5)
    margin_step: float = Field(0.1, gt=0.0, le=0.5)

    @model_validator(mode="after")
    def _check_bounds(self) -> PartitionSpec:
        if self.min_prefill_sm_share > self.max_prefill_sm_share:
            raise ValueError("partition.minPrefillSmShare must not exceed partition.maxPrefillSmShare")
        if self.mode == "auto" and not (
            self.min_prefill_sm_share <= self.prefill_sm_share <= self.max_prefill_sm_share
        ):
            raise ValueError(
                "partition.prefillSmShare must lie within [minPrefillSmShare, maxPrefillSmShare]"
            )
        if self.min_tpot_margin > self.max_tpot_margin:
            raise ValueError("partition.minTpotMargin must not exceed partition.maxTpotMargin")
        if self.mode == "auto" and not (self.min_tpot_margin <= self.tpot_margin <= self.max_tpot_margin):
            raise ValueError("partition.tpotMargin must lie within [minTpotMargin, maxTpotMargin]")
        return self


class SLOSpec(_CRModel):
    # The agents' default targets (EngineConfig.slo_ttft_ms / slo_tpot_ms), in ms as users write them.
    ttft_ms: float = _engine("slo_ttft_ms")
    tpot_ms: float = _engine("slo_tpot_ms")
    attainment_target: float = Field(0.9, gt=0.0, le=1.0)
    window: str = Field("5m", pattern=DURATION_PATTERN)

    @property
    def window_seconds(self) -> float:
        return parse_duration(self.window)


class ScalingSpec(_CRModel):
    replicas_owner: Literal["operator", "external"] = "operator"
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    max_step: int = Field(2, ge=1)
    max_scale_down_step: int = Field(1, ge=1)
    scale_up_cooldown_seconds: int = Field(60, ge=0)
    scale_down_cooldown_seconds: int = Field(300, ge=0)
    scale_down_stabilization_seconds: int = Field(300, ge=0)
    headroom: float = Field(0.05, ge=0.0, le=1.0)
    min_requests: int = Field(20, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("scaling.minReplicas must not exceed scaling.maxReplicas")
        return self


class Toleration(_CRModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class ResourcesSpec(_CRModel):
    gpus_per_replica: int = Field(0, ge=0)
    gpu_resource_name: str = Field("nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-zA-Z0-9._-]+$")
    requests: dict[str, QuantityValue] = Field(default_factory=dict)
    limits: dict[str, QuantityValue] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    runtime_class_name: str | None = None


class EnvVar(_CRModel):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: dict[str, Any] | None = None


class MonitoringSpec(_CRModel):
    enabled: bool = True
    prometheus_url: str | None = Field(None, pattern=r"^https?://")
    scrape_interval: str = Field("15s", pattern=DURATION_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)
    stale_after_seconds: int = Field(120, ge=1)


RouterPolicy = Literal["round-robin", "random", "least-loaded", "least-kv", "slo-aware", "prefix-affinity"]


class RouterResourcesSpec(_CRModel):
    requests: dict[str, QuantityValue] = Field(default_factory=dict)
    limits: dict[str, QuantityValue] = Field(default_factory=dict)


class RouterSpec(_CRModel):
    """`drift router` in front of the agents. `enabled` unset means: on when the service may have more than
    one replica (scaling.maxReplicas > 1), where choosing the replica per request pays off."""

    enabled: bool | None = None
    policy: RouterPolicy = DEFAULT_ROUTER
    replicas: int = Field(2, ge=1, le=100)
    resources: RouterResourcesSpec = Field(default_factory=RouterResourcesSpec)


# A Secret's name (a DNS subdomain) and a key in its data, as the API server admits them.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class AuthSpec(_CRModel):
    """API keys of the agents' OpenAI routes: the Secret `secret_name` holds them, comma-separated, under
    `key`; the pods read it through `secretKeyRef`, so no key is ever written into the pod spec."""

    secret_name: str | None = Field(None, max_length=253, pattern=SECRET_NAME_PATTERN)
    key: str = Field("api-keys", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class LLMServiceSpec(_CRModel):
    replicas: int = Field(1, ge=0)
    image: str = Field(DEFAULT_IMAGE, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    model: ModelSpec = Field(default_factory=ModelSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    policy: PolicyName = "drift"
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    slo: SLOSpec = Field(default_factory=SLOSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    env: list[EnvVar] = Field(default_factory=list)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)

    @property
    def router_enabled(self) -> bool:
        if self.router.enabled is not None:
            return self.router.enabled
        return self.scaling.max_replicas > 1

    @property
    def steered_setting(self) -> SteeredSetting | None:
        """What the SLO loop moves on the agents, by policy, in partition mode auto: the fixed split of
        `static-split`, or `drift`'s TPOT margin (its dispatcher picks the split per step itself, so the
        margin on the decode budget is what tilts it toward prefill or decode); None: nothing is steered."""
        if self.partition.mode != "auto":
            return None
        if self.policy == "static-split":
            return "prefill_sm_share"
        if self.policy == "drift":
            return "tpot_margin"
        return None

    @property
    def partition_steerable(self) -> bool:
        return self.steered_setting is not None

    @property
    def runs_partition(self) -> bool:
        """Whether the agents split SMs at all (a prefill share means something)."""
        return self.policy in ("drift", "static-split") and self.partition.mode != "off"


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else f"spec: {msg}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_spec(raw: Mapping[str, Any] | None) -> LLMServiceSpec:
    """Validate a CR's spec; raise SpecError with a short, user-facing message when it is invalid."""
    try:
        return LLMServiceSpec.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise SpecError(_format_error(exc)) from exc


def replicas_owner(
    spec: LLMServiceSpec, annotations: Mapping[str, str] | None
) -> Literal["operator", "external"]:
    """Who writes spec.replicas: the operator's loop, or an HPA/KEDA (spec field or annotation says so)."""
    if (annotations or {}).get(ANNOTATION_REPLICAS_OWNER, "").lower() == "external":
        return "external"
    return spec.scaling.replicas_owner
