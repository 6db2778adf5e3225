"""What the engine hands back per request per step: cumulative text and tokens plus this step's delta."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.sequence import SLO, RequestTimes
from .sampler import TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    delta_logprobs: list[TokenLogprobs] = field(default_factory=list)
    times: RequestTimes = field(default_factory=RequestTimes)
    slo: SLO = field(default_factory=SLO)
    # Set on the final output of a request that failed (finish_reason "error"): why. `AsyncLLMEngine` raises it
    # to the request's consumer instead of handing over this output.
    error: Exception | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by live sequences
    num_kv_blocks: int
    num_free_kv_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found cached
    num_preemptions: int
    prompt_tokens: int  # prompt tokens computed (excluding cache hits)
    generation_tokens: int
    policy: str = "chunked"
    # Multiplexing policies: the split in force (prefill SMs, decode SMs) out of total_sms; None otherwise.
    split: tuple[int, int] | None = None
    realized_split: tuple[int, int] | None = None  # SMs the partitioner really gives each phase under `split`
    total_sms: int | None = None
    decisions: dict[str, int] = field(default_factory=dict)  # dispatcher decisions by mode
    predicted_step_s: float | None = None  # latest decision's predicted decode step (or prefill block)
    actual_step_s: float | None = None  # and what that iteration actually took
