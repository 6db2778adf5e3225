"""Engine configuration: one pydantic model, filled from CLI flags, DRIFT_* env vars and an optional YAML
file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from .fairness import Fairness
from .preemption import PreemptionMode
from .sampling_params import MAX_LOGPROBS
from .sequence import SLO

PolicyName = Literal["prefill-first", "chunked", "static-split", "drift"]
POLICIES: tuple[str, ...] = ("prefill-first", "chunked", "static-split", "drift")
MULTIPLEX_POLICIES: tuple[str, ...] = ("static-split", "drift")  # run prefill and decode on SM partitions
# The value sets other schemas (the operator's CR model, the admin API) share with this one.
PartitionMode = Literal["auto", "static", "off"]
PartitionBackend = Literal["auto", "green-context", "mps", "shared"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]
AttentionBackend = Literal["auto", "sdpa", "flash-attn", "flashinfer", "triton", "flex"]
# The default SLO targets as the admin API's `slo` object names them (GET/PUT /admin/policy, the operator's
# push), and as `EngineConfig` (engine.yaml) does; both in ms.
SLO_SETTINGS: dict[str, str] = {"ttft_ms": "slo_ttft_ms", "tpot_ms": "slo_tpot_ms"}


def field_bounds(field: FieldInfo) -> dict[str, Any]:
    """A field's numeric bounds as `Field` keywords, so a schema derived from this one (a partial update, the
    operator's CR) validates the same ranges without restating them."""
    return {
        key: getattr(meta, key)
        for meta in field.metadata
        for key in ("ge", "gt", "le", "lt")
        if getattr(meta, key, None) is not None
    }


def bounds_text(field: FieldInfo) -> str:
    """A field's range as help texts and messages state it: "in [-0.5, 1]", ">= 0" (from `field_bounds`)."""
    b = field_bounds(field)
    lo, hi = ("ge" if "ge" in b else "gt"), ("le" if "le" in b else "lt")
    if lo in b and hi in b:
        return f"in {'[' if lo == 'ge' else '('}{b[lo]:g}, {b[hi]:g}{']' if hi == 'le' else ')'}"
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{ops[k]} {v:g}" for k, v in b.items())


class PartitionConfig(BaseModel):
    """How the GPU's SMs are split between prefill and decode (used by `static-split` and `drift`)."""

    model_config = ConfigDict(extra="forbid")

    mode: PartitionMode = Field(
        "auto",
        description="drift: auto picks the split per step, static keeps prefill_sm_share, off never splits",
    )
    # For mode=static (and the static-split policy): the prefill share of SMs, decode gets the rest.
    prefill_sm_share: float = Field(
        0.5, ge=0.0, le=1.0, description="prefill's share of SMs in static mode and static-split"
    )
    # Which partitioner realises the split: green contexts, MPS, or a shared (no-op) partitioner.
    backend: PartitionBackend = Field(
        "auto", description="how the split is realised: CUDA green contexts, MPS, or shared (no split)"
    )
    # drift (mode=auto): most prompt tokens the dispatcher may fold into one decode step, chunked-prefill
    # style, when that step still meets the decode budget (the dispatcher's folding); 0 never folds.
    fold_max_tokens: int = Field(
        2048, ge=0, description="drift: most prompt tokens folded into a decode step that meets TPOT; 0 never"
    )
    # drift (mode=auto): the dispatcher plans decode against step budget / (1 + tpot_margin). The operator's
    # SLO loop steers it: > 0 defends TPOT when the performance model is optimistic (decode keeps more SMs,
    # fewer prompts fold), < 0 hands prefill more SMs and folds more (favours TTFT).
    tpot_margin: float = Field(
        0.0,
        ge=-0.5,
        le=1.0,
        description="drift: plan decode against TPOT step budget / (1 + margin); > 0 favours TPOT, < 0 TTFT",
    )


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(
        None,
        description="Hugging Face model directory, or a Hugging Face id (org/name) already in the local "
        "Hugging Face cache (never downloaded); None serves the embedded default",
    )
    served_model_name: str | None = Field(
        None, description="model id clients send and metrics carry; None: the model path (or embedded name)"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer directory or cached Hugging Face id; None: the model's own"
    )
    generation_config: str = Field(
        "auto",
        min_length=1,
        description="default sampling values of requests that leave them unset: auto reads the model's "
        "generation_config.json, vllm ignores it, else a directory holding a generation_config.json",
    )
    max_logprobs: int = Field(
        MAX_LOGPROBS,
        ge=-1,
        description="most logprobs (completions) or top_logprobs (chat) a request may ask for; more is a 400; "
        "-1: no limit (the whole vocabulary), as vLLM",
    )
    dtype: Dtype = Field(
        "auto", description="weights and KV cache dtype; auto: float32 on CPU, bfloat16 on GPU"
    )
    device: DeviceName = Field("auto", description="auto: cuda when a GPU is visible")
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="context window in tokens (prompt + output); None: the model's max_position_embeddings; "
        "larger is an error",
    )
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="fixed KV pool size; overrides the memory budget"
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="KV budget in GiB; None: 2 on CPU, what gpu_memory_utilization leaves on GPU"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="fraction of GPU memory the engine may use (weights + KV cache)"
    )
    max_num_seqs: int = Field(256, ge=1, description="most sequences running in one step")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one step (chunk size)")
    max_waiting_requests: int = Field(1024, ge=1, description="bounded queue; past it requests get 429")
    policy: PolicyName = Field(
        "chunked", description="scheduling policy: prefill-first, chunked, static-split or drift"
    )
    fairness: Fairness = Field(
        "none",
        description="fair scheduling across clients: none (priority, then FCFS) or vtc (priority, then the "
        "least-served client's oldest request first, by a virtual token counter)",
    )
    fairness_preempt_gap: float = Field(
        4096.0,
        gt=0,
        description="vtc: preempt a running request for a waiting one that cannot start when its client was "
        "served this many weighted tokens (prompt 1, output 2 each) more",
    )
    swap_space_gb: float = Field(
        0.0,
        ge=0,
        description="host-memory KV tier in GiB (pinned on CUDA): holds the cached blocks the device pool "
        "lets go and the KV of swapped-out requests; 0: none",
    )
    preemption_mode: PreemptionMode = Field(
        "auto",
        description="what a preempted request does with its KV: recompute it later, swap it to the host tier "
        "and back, or auto (per request, whichever the performance model says is cheaper); needs "
        "swap_space_gb for swap",
    )
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig, description="SM split between prefill and decode"
    )
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of shared prompt prefixes")
    attention_backend: AttentionBackend = Field(
        "auto",
        description="attention kernels; auto: flash-attn, then flashinfer, then triton on CUDA in 16 bits, "
        "else sdpa",
    )
    enforce_eager: bool = Field(
        False,
        description="never replay decode steps from CUDA graphs (graphs need a CUDA device and the triton "
        "attention backend)",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU; None: torch's default (one per core)"
    )
    seed: int = Field(
        0, description="accepted for vLLM compatibility; unused: a request's own seed makes it reproducible"
    )
    slo_ttft_ms: float = Field(1000.0, gt=0, description="default TTFT target for requests without one")
    slo_tpot_ms: float = Field(100.0, gt=0, description="default TPOT target for requests without one")
    profile_path: str | None = Field(
        None,
        description="performance-model JSON from `drift profile`; the profile used is the one of this "
        "model's architecture and shape, device and dtype, whatever the served name",
    )
    trace_path: str | None = Field(None, description="write every scheduling decision as JSON lines here")

    @property
    def default_slo(self) -> SLO:
        """The targets of requests that bring none, in the engine's unit (seconds)."""
        return SLO.from_ms(self.slo_ttft_ms, self.slo_tpot_ms)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_model_len is not None and self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        return self

    @classmethod
    def from_sources(
        cls, yaml_path: str | Path | None = None, env: dict[str, str] | None = None, **overrides: Any
    ) -> EngineConfig:
        """Merge, lowest precedence first: YAML file, DRIFT_* environment, explicit overrides (CLI flags)."""
        data: dict[str, Any] = {}
        if yaml_path is not None:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_path}: expected a mapping of engine options")
            data.update({k.replace("-", "_"): v for k, v in loaded.items()})
        for key, value in (env or {}).items():
            if key.startswith("DRIFT_") and key not in ("DRIFT_ADMIN_TOKEN", "DRIFT_API_KEY"):
                name = key[len("DRIFT_") :].lower()
                if name in cls.model_fields:
                    data[name] = value
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
