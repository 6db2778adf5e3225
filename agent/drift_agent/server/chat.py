"""POST /v1/chat/completions: the prompt is rendered with the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from . import chat_template, tool_calls
from .errors import APIError, error_body, from_engine_error
from .generation import Aborted, GenerationGroup
from .logprobs import chat_logprobs
from .protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageIn,
    ChatMessageOut,
    ChatStreamChoice,
    ToolCall,
    UsageInfo,
)
from .sampling import check_context, sampling_params, structured_output_of
from .serving import (
    SSE_DONE,
    Job,
    cached,
    check_text,
    collect_tracked,
    encode,
    final_of,
    off_loop,
    prepare,
    sse,
    state_of,
    stream_response,
    usage_flags,
)
from .state import ServerState
from .tool_calls import ToolPlan, parse_output, parser_for


def _apply_tool_plan(req: ChatCompletionRequest, plan: ToolPlan) -> None:
    """What a tool plan changes in the request before its sampling parameters are built."""
    if plan.mode == "auto":
        # The parsers' markers (<|python_tag|>, [TOOL_CALLS], <tool_call>) are special tokens in some
        # tokenizers: they must reach the parser, as vLLM's parsers ask for.
        req.skip_special_tokens = False
    elif plan.schema is not None:
        # "required" / a named function: structured outputs guarantee a parseable call (vLLM does the same).
        other = structured_output_of(req)
        if other is not None:
            raise APIError(
                400,
                f"tool_choice {plan.mode!r} constrains the output itself; it cannot be combined with "
                f"{other.param}",
                param="tool_choice",
            )
        req.guided_json = plan.schema


def chat_prompt(
    state: ServerState,
    messages: list[ChatMessageIn],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    template: str | None,
    template_kwargs: dict[str, Any] | None,
    max_model_len: int | None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The token ids of the rendered conversation; on the tokenizer thread (see serving.off_loop)."""
    tokenizer = state.engine.tokenizer
    text = chat_template.render(
        tokenizer,
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        template_kwargs=template_kwargs,
        chat_template=template or state.settings.chat_template,
        tools=tools,
    )
    check_text(tokenizer, text, param="messages", add_special_tokens=False, max_model_len=max_model_len)
    # The template already wrote BOS and the other special tokens.
    return encode(tokenizer, text, add_special_tokens=False)


async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Response:
    state = state_of(request)
    rid, slo, arrival = prepare(state, request, req, "chatcmpl")
    template = chat_template.request_template(
        req.chat_template, req.chat_template_kwargs, trusted=state.settings.trust_request_chat_template
    )
    plan = tool_calls.plan_tools(
        req.tools, req.tool_choice, state.settings.tool_call_parser, req.parallel_tool_calls
    )
    _apply_tool_plan(req, plan)
    try:
        params0 = sampling_params(req, 0)
    except APIError as exc:
        raise plan.blame(exc) from None
    ids = await off_loop(
        chat_prompt,
        state,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        template=template,
        template_kwargs=req.chat_template_kwargs,
        max_model_len=state.engine.max_model_len,
        tools=plan.tools,
    )
    try:
        if not ids:
            raise APIError(400, "the rendered chat prompt is empty", param="messages")
        check_context(len(ids), params0.max_tokens, state.engine.max_model_len, "messages")
    except Exception as exc:
        raise from_engine_error(exc, prompt_param="messages") from None
    echo = ""
    if req.echo and req.messages[-1].role == "assistant":
        echo = chat_template.message_text(req.messages[-1], len(req.messages) - 1)
    job = Job(state, req, rid, [ids], slo, arrival, [echo], prompt_param="messages")
    try:
        group = await job.start()
    except APIError as exc:
        raise plan.blame(exc) from None
    parser = state.settings.tool_call_parser
    if req.stream:
        return stream_response(job, group, _chat_stream(job, group, plan, parser))
    items = await collect_tracked(job, group, request)
    num_top = req.top_logprobs or 0
    choices: list[ChatChoice] = []
    tokens: list[int] = []
    for index in range(job.num_choices):
        out, finish, stop = final_of(items[index])
        last = out or group.choices[index].last
        logprobs = None
        if req.logprobs and last is not None:
            logprobs = ChatChoiceLogprobs(
                content=chat_logprobs(last.logprobs or [], job.decode_token, num_top)
            )
        content, calls = parse_output(plan, parser, last.text if last else "")
        if calls and finish == "stop":
            finish = "tool_calls"
        message = ChatMessageOut(
            content=echo + (content or "") if content is not None or echo else None,
            tool_calls=[ToolCall.model_validate(c) for c in calls],
        )
        choices.append(
            ChatChoice(
                index=index, message=message, logprobs=logprobs, finish_reason=finish, stop_reason=stop
            )
        )
        tokens.append(last.num_output_tokens if last else 0)
    resp = ChatCompletionResponse(
        id=rid,
        created=job.created,
        model=state.model_name,
        choices=choices,
        usage=job.usage(tokens, cached(job, group)),
    )
    return JSONResponse(resp.model_dump(), headers={"x-request-id": rid})


async def _chat_stream(
    job: Job, group: GenerationGroup, plan: ToolPlan, parser: str | None
) -> AsyncIterator[str]:
    req = job.req
    assert isinstance(req, ChatCompletionRequest)
    include_usage, continuous = usage_flags(req)
    tokens = [0] * job.num_choices
    num_top = req.top_logprobs or 0
    parsers = [parser_for(plan, parser) for _ in range(job.num_choices)]

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=job.id, created=job.created, model=job.state.model_name, choices=choices, usage=usage
            )
        )

    # As OpenAI does: every choice opens with its role before any content.
    for index in range(job.num_choices):
        opening = {"role": "assistant", "content": job.echo_texts[0]}
        yield chunk([ChatStreamChoice(index=index, delta=opening)], job.usage(tokens) if continuous else None)
    async for index, item in group:
        if isinstance(item, BaseException):
            err = from_engine_error(item)
            yield sse(error_body(err.status, err.message, err.param, err.code))
            break
        if isinstance(item, Aborted):
            yield chunk([ChatStreamChoice(index=index, delta={}, finish_reason="abort")])
            continue
        logprobs = None
        if req.logprobs and item.delta_logprobs:
            logprobs = ChatChoiceLogprobs(
                content=chat_logprobs(item.delta_logprobs, job.decode_token, num_top)
            )
        tokens[index] = item.num_output_tokens
        delta: dict[str, Any] = {"content": item.delta_text} if item.delta_text else {}
        finish = item.finish_reason if item.finished else None
        tool_parser = parsers[index]
        if tool_parser is not None:
            parsed = tool_parser.feed(item.delta_text)
            if item.finished:
                parsed.extend(tool_parser.finish())
                if tool_parser.num_calls and finish == "stop":
                    finish = "tool_calls"
            delta = parsed.as_delta()
        if not delta and not item.finished and logprobs is None:
            continue
        choice = ChatStreamChoice(
            index=index,
            delta=delta,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=item.stop_reason if item.finished else None,
        )
        yield chunk([choice], job.usage(tokens) if continuous else None)
    if include_usage:
        yield chunk([], job.usage(tokens, cached(job, group)))
    yield SSE_DONE
