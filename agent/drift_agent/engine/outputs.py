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
    # Prompt tokens (and a preempted request's tokens to recompute) of waiting and prefilling requests that have
    # no KV yet: the prefill work queued here, for a router.
    pending_prefill_tokens: int = 0
    # Measured costs (`StepCosts`), None until measured: seconds per prompt token of prefill work, and seconds
    # of a decode step at about `decode_batch` sequences.
    prefill_s_per_token: float | None = None
    decode_step_s: float | None = None
    decode_batch: int = 0
    # The host KV tier (`swap_space_gb`; 0 blocks without one) and what preemption and fairness did.
    num_host_kv_blocks: int = 0
    num_free_host_kv_blocks: int = 0
    num_swapped: int = 0  # preempted requests whose KV is in the host tier or on its way back
    prefix_cache_host_hits: int = 0  # of the prefix-cache hits, tokens promoted from the host tier
    num_swap_preemptions: int = 0
    num_fairness_preemptions: int = 0
    recomputed_tokens: int = 0  # KV computed again after recompute preemptions
    # Blocks moved between the tiers, by why: demoted (cached blocks the pool let go), promoted (host prefix
    # hits), swapped_out, swapped_in, reused (a swap that found the other tier holding the block already).
    kv_blocks_moved: dict[str, int] = field(default_factory=dict)
    # Per direction ("out": device to host, "in"): copies (runs of contiguous blocks), bytes, seconds.
    kv_copies: dict[str, int] = field(default_factory=dict)
    kv_copy_bytes: dict[str, int] = field(default_factory=dict)
    kv_copy_seconds: dict[str, float] = field(default_factory=dict)


class StepCosts:
    """Exponentially weighted means of what the engine's own steps cost, so a router can predict an agent's
    TTFT without its profile. Prefill samples come only from batches of at least `min_prefill_tokens` prompt
    tokens (`MIN_PREFILL_TOKENS`, or the chunk budget if smaller): smaller ones are memory-bound, and their
    per-token cost says little about a queue of prompts."""

    ALPHA = 0.2  # weight of the newest sample: about the last ten steps count
    MIN_PREFILL_TOKENS = 128

    def __init__(self, min_prefill_tokens: int = MIN_PREFILL_TOKENS) -> None:
        self.min_prefill_tokens = min_prefill_tokens
        self.prefill_s_per_token: float | None = None
        self.decode_step_s: float | None = None
        self._decode_batch: float = 0.0

    @property
    def decode_batch(self) -> int:
        return round(self._decode_batch)

    @staticmethod
    def _mean(old: float | None, sample: float, alpha: float) -> float:
        return sample if old is None else old + alpha * (sample - old)

    def prefill(self, seconds: float, prompt_tokens: int, total_tokens: int | None = None) -> None:
        """A batch with `prompt_tokens` prompt tokens (of `total_tokens` rows in all, decodes included) took
        `seconds`; all its rows are charged as prefill work (a conservative figure)."""
        if prompt_tokens < self.min_prefill_tokens or not seconds > 0:
            return
        per_token = seconds / (total_tokens or prompt_tokens)
        self.prefill_s_per_token = self._mean(self.prefill_s_per_token, per_token, self.ALPHA)

    def decode(self, seconds: float, batch: int) -> None:
        if batch < 1 or not seconds > 0:
            return
        first = self.decode_step_s is None
        self.decode_step_s = self._mean(self.decode_step_s, seconds, self.ALPHA)
        self._decode_batch = (
            batch if first else self._decode_batch + self.ALPHA * (batch - self._decode_batch)
        )
