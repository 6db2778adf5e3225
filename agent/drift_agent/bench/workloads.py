"""Workload generators: what each request asks for, independent of how it is sent or simulated.

A workload is a list of `RequestSpec`s. Single-turn requests are sessions of one. A multi-turn session's later
turn resends the whole conversation: the runner appends the answer actually streamed back, while `prompt_len`
assumes every earlier answer had exactly its target length (what the simulator uses). All generators are seeded
and pure (numpy RNG, no I/O), so the same seed gives the same requests for every engine compared.

Workloads (length sources are documented in `lengths.py`):
- random: input/output lengths uniform around --input-len/--output-len (vLLM's random set, range ratio 0 = fixed),
  optionally behind a shared prefix of --prefix-len tokens.
- sharegpt-like, lmsys-like: lognormal lengths fitted to the published ShareGPT / LMSYS-Chat-1M means.
- multi-turn: sessions with geometric turn counts (mean --mean-turns), LMSYS-like turn lengths and exponential
  think time (mean --think-time s) between an answer and the next user message; prefix reuse matters.
- long-context: long inputs (default 8192 tokens +-50%, in the spirit of LongBench, whose English inputs average
  6,711 words per Bai et al. 2023) and short outputs (default 256 +-50%).
- jsonl: a user's own prompts and conversations (see `jsonl.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .lengths import LMSYS_PROMPT, LMSYS_RESPONSE, SHAREGPT_INPUT, SHAREGPT_OUTPUT, UniformLengths
from .prompts import PromptBuilder

WorkloadName = Literal["random", "sharegpt-like", "lmsys-like", "multi-turn", "long-context", "jsonl"]
WORKLOADS: tuple[str, ...] = ("random", "sharegpt-like", "lmsys-like", "multi-turn", "long-context", "jsonl")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload.

    `prompt` is this turn's new user text (the whole prompt for single-turn requests); `prompt_len` counts the
    tokens the server will see, assuming earlier answers had exactly their target length; `think_time_s` is the
    pause between the previous turn's answer and this turn (0 for first turns). `messages`, when set, are chat
    messages to send as given (user-supplied conversations); `prompt` then holds their text rendering.
    """

    request_id: str
    prompt: str
    prompt_len: int
    output_len: int
    session_id: str
    turn: int = 0
    new_prompt_len: int = 0
    think_time_s: float = 0.0
    messages: tuple[dict[str, str], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "session_id": self.session_id,
            "turn": self.turn,
            "prompt_len": self.prompt_len,
            "new_prompt_len": self.new_prompt_len,
            "output_len": self.output_len,
            "think_time_s": self.think_time_s,
        }


@dataclass(frozen=True, slots=True)
class WorkloadParams:
    """Knobs of the synthetic workloads; None means the workload's own default."""

    input_len: int | None = None
    output_len: int | None = None
    range_ratio: float | None = None
    prefix_len: int = 0
    mean_turns: float = 4.0
    max_turns: int = 16
    think_time_s: float = 2.0
    max_session_tokens: int = 8192


def group_sessions(specs: list[RequestSpec]) -> list[list[RequestSpec]]:
    """Sessions in order of their first request; turns in order."""
    sessions: dict[str, list[RequestSpec]] = {}
    for spec in specs:
        sessions.setdefault(spec.session_id, []).append(spec)
    return [sorted(turns, key=lambda s: s.turn) for turns in sessions.values()]


def _single_turn(
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    rng: np.random.Generator,
    builder: PromptBuilder | None,
    prefix_len: int = 0,
    id_prefix: str = "",
) -> list[RequestSpec]:
    prefix = builder.build(prefix_len, rng) if builder is not None and prefix_len > 0 else ""
    specs = []
    for i, (n_in, n_out) in enumerate(zip(input_lens.tolist(), output_lens.tolist(), strict=True)):
        total = int(n_in) + prefix_len
        text = builder.build(total, rng, prefix=prefix) if builder is not None else ""
        rid = f"{id_prefix}{i}"
        specs.append(RequestSpec(rid, text, total, int(n_out), session_id=rid, new_prompt_len=total))
    return specs


def _multi_turn(
    num_requests: int,
    params: WorkloadParams,
    rng: np.random.Generator,
    builder: PromptBuilder | None,
    id_prefix: str,
) -> list[RequestSpec]:
    if params.mean_turns < 1:
        raise ValueError(f"mean turns must be >= 1, got {params.mean_turns}")
    specs: list[RequestSpec] = []
    session = 0
    while len(specs) < num_requests:
        # Geometric turn count with the requested mean: each answer is followed by another turn w.p. 1-1/mean;
        # an infinite mean never stops by chance (numpy refuses p=0), only at max_turns or the token cap.
        drawn = (
            params.max_turns if math.isinf(params.mean_turns) else int(rng.geometric(1.0 / params.mean_turns))
        )
        turns = min(drawn, params.max_turns, num_requests - len(specs))
        user_lens = LMSYS_PROMPT.sample(turns, rng)
        answer_lens = LMSYS_RESPONSE.sample(turns, rng)
        if params.output_len is not None:
            answer_lens = np.full(turns, params.output_len)
        history = 0
        sid = f"{id_prefix}s{session}"
        for t in range(turns):
            n_user, n_out = int(user_lens[t]), int(answer_lens[t])
            if t > 0 and history + n_user + n_out > params.max_session_tokens:
                break
            text = builder.build(n_user, rng) if builder is not None else ""
            think = float(rng.exponential(params.think_time_s)) if t > 0 and params.think_time_s > 0 else 0.0
            specs.append(
                RequestSpec(
                    f"{sid}t{t}",
                    text,
                    prompt_len=history + n_user,
                    output_len=n_out,
                    session_id=sid,
                    turn=t,
                    new_prompt_len=n_user,
                    think_time_s=think,
                )
            )
            history += n_user + n_out
        session += 1
    return specs


def generate(
    name: str,
    num_requests: int,
    seed: int = 0,
    params: WorkloadParams | None = None,
    builder: PromptBuilder | None = None,
    id_prefix: str = "",
) -> list[RequestSpec]:
    """`num_requests` requests of a synthetic workload. builder=None gives lengths only (empty prompts)."""
    if num_requests < 1:
        raise ValueError(f"number of requests must be >= 1, got {num_requests}")
    params = params or WorkloadParams()
    rng = np.random.default_rng(seed)
    if name == "random":
        ins = UniformLengths(params.input_len or 1024, params.range_ratio or 0.0).sample(num_requests, rng)
        outs = UniformLengths(params.output_len or 128, params.range_ratio or 0.0).sample(num_requests, rng)
        return _single_turn(ins, outs, rng, builder, params.prefix_len, id_prefix)
    if name == "long-context":
        ratio = 0.5 if params.range_ratio is None else params.range_ratio
        ins = UniformLengths(params.input_len or 8192, ratio).sample(num_requests, rng)
        outs = UniformLengths(params.output_len or 256, ratio).sample(num_requests, rng)
        return _single_turn(ins, outs, rng, builder, params.prefix_len, id_prefix)
    if name in ("sharegpt-like", "lmsys-like"):
        dist_in, dist_out = (
            (SHAREGPT_INPUT, SHAREGPT_OUTPUT) if name == "sharegpt-like" else (LMSYS_PROMPT, LMSYS_RESPONSE)
        )
        ins = dist_in.sample(num_requests, rng)
        outs = dist_out.sample(num_requests, rng)
        if params.output_len is not None:
            outs = np.full(num_requests, params.output_len)
        return _single_turn(ins, outs, rng, builder, params.prefix_len, id_prefix)
    if name == "multi-turn":
        return _multi_turn(num_requests, params, rng, builder, id_prefix)
    raise ValueError(f"unknown synthetic workload {name!r}; expected one of {', '.join(WORKLOADS[:-1])}")
