"""POST /v1/completions: OpenAI's legacy completions, streaming or not, with vLLM's extra parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, error_body, from_engine_error
from .generation import Aborted, GenerationGroup
from .logprobs import completion_logprobs
from .protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, UsageInfo
from .sampling import check_context, sampling_params
from .serving import (
    SSE_DONE,
    Job,
    cached,
    check_text,
    collect_tracked,
    final_of,
    off_loop,
    prepare,
    sse,
    state_of,
    stream_response,
    usage_flags,
)
from .state import ServerState


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids) as a list of prompts."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):  # validated: a list holds one kind, so one look tells
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return prompts


def _tokenize(
    state: ServerState, prompts: list[str | list[int]], echo: bool
) -> tuple[list[list[int]], list[str]]:
    """Every prompt's token ids, in order, and the texts to echo; on the tokenizer thread."""
    engine = state.engine
    try:
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                check_text(
                    engine.tokenizer,
                    p,
                    param="prompt",
                    add_special_tokens=True,
                    max_model_len=engine.max_model_len,
                )
            ids.append(engine.tokenize(p))  # the engine's own rules: empty prompts, ids in the vocabulary
    except Exception as exc:
        raise from_engine_error(exc, param="prompt") from None
    # The prompt as the client sent it; token-id prompts decoded.
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if echo else []
    return ids, texts


async def create_completion(req: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    rid, slo, arrival = prepare(state, request, req, "cmpl")
    originals = prompt_list(req.prompt)
    params0 = sampling_params(req, 0)  # validates the sampling values before any context-length message
    prompts, echo = await off_loop(_tokenize, state, originals, req.echo)
    for ids in prompts:
        try:
            check_context(len(ids), params0.max_tokens, state.engine.max_model_len, "prompt")
        except Exception as exc:
            raise from_engine_error(exc) from None
    job = Job(state, req, rid, prompts, slo, arrival, echo)
    group = await job.start()
    if req.stream:
        return stream_response(job, group, _completion_stream(job, group))
    items = await collect_tracked(job, group, request)
    choices: list[CompletionChoice] = []
    tokens: list[int] = []
    for index in range(job.num_choices):
        out, finish, stop = final_of(items[index])
        last = out or group.choices[index].last
        text = (job.echo_texts[job.prompt_of(index)] if req.echo else "") + (last.text if last else "")
        logprobs = None
        if req.logprobs is not None and last is not None:
            logprobs = completion_logprobs(last.logprobs or [], job.decode_token, req.logprobs, 0)
        choices.append(
            CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop
            )
        )
        tokens.append(last.num_output_tokens if last else 0)
    resp = CompletionResponse(
        id=rid,
        created=job.created,
        model=state.model_name,
        choices=choices,
        usage=job.usage(tokens, cached(job, group)),
    )
    return JSONResponse(resp.model_dump(), headers={"x-request-id": rid})


async def _completion_stream(job: Job, group: GenerationGroup) -> AsyncIterator[str]:
    req = job.req
    assert isinstance(req, CompletionRequest)
    include_usage, continuous = usage_flags(req)
    tokens = [0] * job.num_choices
    offsets = [0] * job.num_choices
    echoed: set[int] = set()

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            CompletionChunk(
                id=job.id, created=job.created, model=job.state.model_name, choices=choices, usage=usage
            )
        )

    async for index, item in group:
        if isinstance(item, BaseException):
            err = from_engine_error(item)
            yield sse(error_body(err.status, err.message, err.param, err.code))
            break
        if isinstance(item, Aborted):
            yield chunk([CompletionChoice(index=index, text="", finish_reason="abort")])
            continue
        text = item.delta_text
        if req.echo and index not in echoed:
            echoed.add(index)
            text = job.echo_texts[job.prompt_of(index)] + text
        logprobs = None
        if req.logprobs is not None and item.delta_logprobs:
            logprobs = completion_logprobs(
                item.delta_logprobs, job.decode_token, req.logprobs, offsets[index]
            )
            offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        tokens[index] = item.num_output_tokens
        if not text and not item.finished and logprobs is None:
            continue  # text held back (partial UTF-8 or a possible stop string): nothing to send yet
        choice = CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=item.finish_reason if item.finished else None,
            stop_reason=item.stop_reason if item.finished else None,
        )
        yield chunk([choice], job.usage(tokens) if continuous else None)
    if include_usage:
        yield chunk([], job.usage(tokens, cached(job, group)))
    yield SSE_DONE
