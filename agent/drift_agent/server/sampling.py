"""From an OpenAI request to the engine's inputs: sampling parameters per choice, and the request's SLO."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ..core.config import EngineConfig
from ..core.errors import InvalidRequestError, PromptTooLongError
from ..core.sampling_params import SamplingParams, StructuredOutput
from ..core.sequence import SLO
from .errors import APIError
from .protocol import SEED_MAX, ChatCompletionRequest, CompletionRequest, SamplingRequest

TTFT_HEADER = "x-slo-ttft-ms"
TPOT_HEADER = "x-slo-tpot-ms"
PRIORITY_HEADER = "x-slo-priority"
CLIENT_HEADER = "x-client-id"
MAX_CLIENT_ID_LEN = 128
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
    api_key_index: int | None = None,
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
    # Filled now by `Scheduler.add`'s rule: the server classifies the request against this copy of the
    # targets, also when it ends without any output from the engine.
    slo = SLO.from_ms(ttft_ms, tpot_ms, priority).with_defaults(config.default_slo)
    slo.client = client_id(headers, api_key_index)
    return slo


def client_id(headers: Mapping[str, str], api_key_index: int | None = None) -> str:
    """Who sent the request, for fair scheduling and per-client metrics. With API keys on, the index of the key
    it authenticated with (never the key itself), so a client cannot pose as another by a header; otherwise
    the x-client-id header (cut to a bounded length), else "" (the anonymous client)."""
    if api_key_index is not None:
        return f"key-{api_key_index}"
    return (headers.get(CLIENT_HEADER) or "").strip()[:MAX_CLIENT_ID_LEN]


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
    structured_output_of(req)  # its shape errors before anything is tokenized
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
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")


def apply_model_defaults(req: SamplingRequest, defaults: Mapping[str, Any], max_logprobs: int) -> None:
    """The server's model settings on `req`, in place, before its sampling parameters are built: the
    `--generation-config` defaults (GENERATION_DEFAULT_KEYS' names) fill only the fields the request left
    unset (absent or null), as vLLM applies them, except `max_tokens` (max_new_tokens), which caps the
    request's own value as vLLM's get_max_tokens does: a request without one runs up to the context window
    or the cap, whichever is first, and never fails for the cap. A request asking for more logprobs than
    `--max-logprobs` (-1: no limit) is a 400 naming the field."""
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if name in defaults and getattr(req, name) is None:
            setattr(req, name, defaults[name])
    asked = logprobs_of(req)
    if isinstance(asked, int) and max_logprobs >= 0 and asked > max_logprobs:
        param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise APIError(
            400,
            f"{param} {asked} is more than this server allows (--max-logprobs {max_logprobs})",
            param=param,
        )


def _json_spec(value: Any, param: str) -> dict[str, Any]:
    """A schema given as an object or as JSON text (vLLM takes both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    return value


def _with_whitespace(so: StructuredOutput | None, pattern: Any, param: str) -> StructuredOutput:
    """`so` with vLLM's whitespace pattern; a 400 naming `param` when it cannot apply."""
    from ..engine.structured import whitespace_pattern_error

    if so is None or so.kind not in ("json", "json_schema"):
        raise APIError(
            400,
            f"{param}: a whitespace pattern applies to a JSON constraint only (guided_json, response_format "
            "json_object / json_schema, structured_outputs json / json_object)",
            param=param,
        )
    error = whitespace_pattern_error(pattern)
    if error:
        raise APIError(400, f"{param}: invalid whitespace pattern: {error}", param=param)
    return dataclasses.replace(so, whitespace_pattern=pattern)


def structured_output_of(req: SamplingRequest) -> StructuredOutput | None:
    """The request's output constraint: `response_format` (json_object / json_schema), vLLM's `guided_*`
    extras or their `structured_outputs` spelling; at most one. Shape errors are a 400 naming the field; a
    grammar that cannot compile is refused by the engine when the request is validated (also naming it)."""
    given: list[StructuredOutput] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        kind = fmt.get("type", "text") if isinstance(fmt, dict) else None
        if kind == "json_object":
            given.append(StructuredOutput("json", None, "response_format"))
        elif kind == "json_schema":
            inner = fmt.get("json_schema")
            if not isinstance(inner, dict) or "schema" not in inner and "json_schema" not in inner:
                raise APIError(
                    400, "response_format json_schema needs json_schema.schema", param="response_format"
                )
            schema = inner.get("schema", inner.get("json_schema"))
            given.append(
                StructuredOutput("json_schema", _json_spec(schema, "response_format"), "response_format")
            )
        elif kind != "text":
            raise APIError(
                400,
                f"response_format {kind!r} is not supported (text, json_object, json_schema)",
                param="response_format",
            )
    if req.guided_json is not None:
        given.append(
            StructuredOutput("json_schema", _json_spec(req.guided_json, "guided_json"), "guided_json")
        )
    if req.guided_regex is not None:
        given.append(StructuredOutput("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        given.append(StructuredOutput("choice", list(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        given.append(StructuredOutput("grammar", req.guided_grammar, "guided_grammar"))
    so = req.structured_outputs
    if so is not None:
        keys = [
            k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)
        ]
        if len(keys) != 1:
            raise APIError(
                400,
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object",
                param="structured_outputs",
            )
        key, value = keys[0], so[keys[0]]
        if key == "json_object":
            given.append(StructuredOutput("json", None, "structured_outputs"))
        elif key == "json":
            given.append(
                StructuredOutput("json_schema", _json_spec(value, "structured_outputs"), "structured_outputs")
            )
        else:
            given.append(StructuredOutput(key, value, "structured_outputs"))  # type: ignore[arg-type]
    if len(given) > 1:
        names = ", ".join(g.param or "" for g in given)
        raise APIError(
            400, f"at most one structured output constraint per request, got {names}", param=given[1].param
        )
    pattern, pattern_param = req.guided_whitespace_pattern, "guided_whitespace_pattern"
    if pattern is None and so is not None and so.get("whitespace_pattern") is not None:
        pattern, pattern_param = so["whitespace_pattern"], "structured_outputs"
    if pattern is not None:
        given[:1] = [_with_whitespace(given[0] if given else None, pattern, pattern_param)]
    if not given:
        return None
    try:
        given[0].validate()
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=given[0].param) from None
    return given[0]


def max_tokens_of(req: SamplingRequest) -> int | None:
    """The request's own max_tokens (None: up to the context window)."""
    if isinstance(req, ChatCompletionRequest):
        return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    assert isinstance(req, CompletionRequest)
    return req.max_tokens


def capped(params: SamplingParams, cap: int | None) -> SamplingParams:
    """`params` with max_tokens capped by `cap`, the generation config's max_new_tokens (see
    apply_model_defaults). Applied after the context-length check, which judges the request's own value, as
    vLLM orders them; the engine also stops at the context window, so an unset max_tokens never fails for
    the cap."""
    if cap is None or (params.max_tokens is not None and params.max_tokens <= cap):
        return params
    return dataclasses.replace(params, max_tokens=cap)


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
    its parameter (`top_p must be in (0, 1]`); chat names two of them differently. A structured-output
    error carries the request field it is about as its `param`."""
    if getattr(exc, "param", None):
        return exc.param  # type: ignore[attr-defined]
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
            structured=structured_output_of(req),
        )
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=param_of(exc, req)) from None
