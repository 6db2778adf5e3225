"""A request's state as the scheduler sees it: token ids, KV progress, block table. No tensors."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field, replace

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV in the host tier (or on its way back)
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"
    ERROR = "error"  # the request's own work, or the step that ran it, failed (the engine went on)


@dataclass
class SLO:
    """Per-request latency targets in seconds (None: no target)."""

    ttft: float | None = None
    tpot: float | None = None
    priority: int = 0
    # Who sent it, for fair scheduling (`fairness: vtc`) and per-client metrics; "" is the anonymous client.
    client: str = ""

    @classmethod
    def from_ms(cls, ttft_ms: float | None, tpot_ms: float | None, priority: int = 0) -> SLO:
        """From milliseconds, the unit users write targets in (headers, engine config, the CR): the one
        conversion, where a target enters the engine."""
        return cls(
            ttft=None if ttft_ms is None else ttft_ms / 1e3,
            tpot=None if tpot_ms is None else tpot_ms / 1e3,
            priority=priority,
        )

    def with_defaults(self, default: SLO) -> SLO:
        """These targets, the missing ones taken from `default` (a request's defaults are fixed when it
        arrives: a later change of the server's defaults does not reach it)."""
        if self.ttft is not None and self.tpot is not None:
            return self
        return replace(
            self,
            ttft=default.ttft if self.ttft is None else self.ttft,
            tpot=default.tpot if self.tpot is None else self.tpot,
        )


@dataclass
class RequestTimes:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One generation stream. `num_computed_tokens` counts tokens whose KV is in the pool.

    Slotted, with the prompt length and output limit fixed at creation: the scheduler and the simulator touch
    these attributes once per sequence per step."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    slo: SLO = field(default_factory=SLO)
    times: RequestTimes = field(default_factory=RequestTimes)
    seq_id: int = field(default_factory=lambda: next(_ids))

    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    max_tokens: int = field(init=False)  # output tokens allowed, bounded by the context window
    status: SequenceStatus = field(init=False, default=SequenceStatus.WAITING)
    finish_reason: FinishReason | None = field(init=False, default=None)
    stop_reason: str | int | None = field(init=False, default=None)
    num_computed_tokens: int = field(init=False, default=0)
    num_cached_tokens: int = field(init=False, default=-1)  # prefix-cache hit at first admission
    num_preemptions: int = field(init=False, default=0)
    num_dropped_tokens: int = field(init=False, default=0)  # KV dropped by its last recompute preemption
    block_table: list[int] = field(init=False, default_factory=list)
    host_block_table: list[int] = field(init=False, default_factory=list)  # its KV while swapped out
    block_hashes: list[int] = field(init=False, default_factory=list)  # chained hash per full block
    num_registered_blocks: int = field(init=False, default=0)  # leading blocks published to the prefix cache
    in_flight: bool = field(init=False, default=False)  # part of a batch that has not completed yet
    abort_pending: bool = field(init=False, default=False)
    # Whether a sampled token can end it (EOS honoured, or stop tokens): otherwise only its length can, and
    # the scheduler skips `check_stop_token` until the length is reached. Fixed at creation, as the params.
    stops_on_token: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = n = len(self.prompt_token_ids)
        params = self.params
        room = self.max_model_len - n
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.stops_on_token = bool(params.stop_token_ids) or (
            not params.ignore_eos and bool(self.eos_token_ids)
        )

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """True while some tokens besides the newest sampled one still lack KV."""
        n = len(self.token_ids)
        return n - self.num_computed_tokens > 1 or n == self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def check_stop_token(self) -> bool:
        """Length / EOS / stop-token finish after the newest token; stop *strings* are the detokenizer's."""
        n_out = len(self.token_ids) - self.num_prompt_tokens
        if n_out == 0:
            return False
        params = self.params
        # (Token checks only where a token can stop: this runs once per sequence per step.)
        if n_out >= params.min_tokens and (params.stop_token_ids or not params.ignore_eos):
            last = self.token_ids[-1]
            if not params.ignore_eos and last in self.eos_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, None
                return True
            if params.stop_token_ids and last in params.stop_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, last
                return True
        if n_out >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False
