"""From an OpenAI request to the engine's inputs: sampling parameters per choice, and the request's SLO."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..core.config import EngineConfig
from ..core.errors import InvalidRequestError, PromptTooLongError
from ..core.sampling_params import SamplingParams
from ..core.sequence import SLO
from .errors import APIError
from .protocol import SEED_MAX, ChatCompletionRequest, CompletionRequest, SamplingRequest

TTFT_HEADER = "x-slo-ttft-ms"
TPOT_HEADER = "x-slo-tpot-ms"
PRIORITY_HEADER = "x-slo-priority"
# The most choices one request may fan out to (each is one engine request).
MAX_N = 64


def _positive_ms(headers: Mapping[str, str], name: str) -> float | None:
    """The header's target in ms; None when the request sets none."""
    raw = headers.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise APIError(
            400, f"header {name} must be a number of milliseconds, got {raw!r}", param=name
        ) from None
    if not value > 0 or value == float("inf"):
        raise APIError(
            400, f"header {name} must be a positive finite number of milliseconds, got {raw!r}", param=name
        )
    return value


def slo_from_headers(
    headers: Mapping[str, str],
    config: EngineConfig,
    body_priority: int | None = None,
    allow_client_priority: bool = False,
) -> SLO:
    """The request's targets: its headers, else the server's current defaults (which /admin/policy may change).
    A priority ahead of the default (< 0) is honoured only where the server allows it (403 otherwise), so an
    anonymous client cannot jump the queue; yielding (> 0) is always allowed."""
    ttft_ms, tpot_ms = _positive_ms(headers, TTFT_HEADER), _positive_ms(headers, TPOT_HEADER)
    priority = body_priority or 0
    raw = headers.get(PRIORITY_HEADER)
    if raw is not None and raw.strip() != "":
        try:
            priority = int(raw)
        except ValueError:
            raise APIError(
                400, f"header {PRIORITY_HEADER} must be an integer, got {raw!r}", param=PRIORITY_HEADER
            ) from None
    if priority < 0 and not allow_client_priority:
        raise APIError(
            403,
            f"priority {priority} would go ahead of other requests: this server does not allow client "
            "priorities (start it with --allow-client-priority)",
            param="priority",
        )
    given, default = SLO.from_ms(ttft_ms, tpot_ms, priority), config.default_slo
    return SLO(
        ttft=default.ttft if given.ttft is None else given.ttft,
        tpot=default.tpot if given.tpot is None else given.tpot,
        priority=priority,
    )


def refuse_unsupported(req: SamplingRequest) -> None:
    """Fields we understand but cannot honour get a clear 400 instead of being silently ignored."""
    if not isinstance(req.n, int) or not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {req.n!r}", param="n")
    if req.seed is not None and req.seed + req.n - 1 > SEED_MAX:
        raise APIError(
            400,
            f"seed must be at most {SEED_MAX} - (n - 1): choice i samples with seed + i",
            param="seed",
        )
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of < req.n:
            raise APIError(400, f"best_of ({req.best_of}) must be at least n ({req.n})", param="best_of")
        if req.best_of is not None and req.best_of > req.n:
            raise APIError(
                400,
                "best_of greater than n is not supported (no server-side candidate ranking)",
                param="best_of",
            )
        if req.echo and req.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs needs prompt logprobs, which this server does not compute",
                param="echo",
            )
    if isinstance(req, ChatCompletionRequest):
        if req.tools and req.tool_choice != "none":
            raise APIError(400, "tool calling is not supported by this server", param="tools")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(
                400, f"response_format {fmt!r} is not supported (only 'text')", param="response_format"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")


def max_tokens_of(req: SamplingRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    assert isinstance(req, CompletionRequest)
    return req.max_tokens


def logprobs_of(req: SamplingRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    assert isinstance(req, CompletionRequest)
    return req.logprobs


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """As OpenAI and vLLM do: an explicit max_tokens that cannot fit next to the prompt is an error."""
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {param} has "
            f"{num_prompt_tokens} tokens (prompt plus at least one output token must fit)."
        )
    if max_tokens is not None and max_tokens > 0 and num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in the "
            f"completion). Please reduce the length of the {param} or the completion."
        )


_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def param_of(exc: BaseException, req: SamplingRequest) -> str | None:
    """The request field an engine validation error is about. The engine's messages start with the name of
    its parameter (`top_p must be in (0, 1]`); chat names two of them differently."""
    name = str(exc).split(" ", 1)[0]
    if name not in _ENGINE_FIELDS:
        return None
    if isinstance(req, ChatCompletionRequest):
        if name == "max_tokens" and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        if name == "logprobs":
            return "top_logprobs"
    return name


def sampling_params(req: SamplingRequest, choice: int) -> SamplingParams:
    """The engine's parameters for choice `choice` of `req` (seeded choices use seed + choice)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=1,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=None if req.seed is None else req.seed + choice,
            max_tokens=max_tokens_of(req),
            min_tokens=req.min_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs_of(req),
            skip_special_tokens=req.skip_special_tokens,
        )
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=param_of(exc, req)) from None
