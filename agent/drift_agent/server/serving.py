"""Machinery shared by the generation routes: from a validated request to a running `GenerationGroup`, and
from the group back to an HTTP response (JSON once everything finished, or an SSE stream).

Either way a client that disconnects aborts its engine requests, which frees their KV blocks: a streaming
response notices through Starlette cancelling its body, a non-streaming one through a task that watches the
connection while the choices run.

Tokenization and chat-template rendering run on one worker thread, never on the event loop: a prompt of
megabytes takes seconds to tokenize, and /health, /metrics and every other request must not wait for it.
Large JSON bodies are decoded on the same thread (`OffLoopBodyRoute`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..core.sequence import SLO
from ..engine.outputs import RequestOutput
from .auth import API_KEY_INDEX
from .errors import APIError, error_body, from_engine_error
from .generation import Aborted, GenerationGroup, Item
from .protocol import PromptTokensDetails, SamplingRequest, UsageInfo, now_s
from .sampling import (
    apply_model_defaults,
    capped,
    check_context,
    max_tokens_of,
    param_of,
    refuse_unsupported,
    sampling_params,
    slo_from_headers,
)
from .state import ServerState

T = TypeVar("T")
# Per-request lines (ServerSettings.log_requests, off with --disable-log-requests).
request_log = logging.getLogger("drift_agent.server.requests")

# One thread, as vLLM does: HF fast tokenizers encode concurrently, but a call may first reconfigure the
# tokenizer (padding, truncation, special-token splitting), which is not thread-safe; one thread also
# keeps requests in arrival order.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-tokenizer")
# Texts longer than this are counted before they are tokenized for good: materialising the ids of a prompt
# of millions of tokens holds the GIL (and so the event loop) for a tenth of a second and more.
_LONG_TEXT_CHARS = 1 << 17
# JSON bodies above this many bytes are decoded on the tokenizer thread: json.loads takes about 0.1 s per
# MiB of numbers and lets the event loop run meanwhile; below it the hop costs more than it saves.
OFF_LOOP_BODY_BYTES = 1 << 16


def state_of(request: Request) -> ServerState:
    return request.app.state.drift


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the tokenizer thread: for tokenization and chat-template rendering."""
    return await asyncio.get_running_loop().run_in_executor(
        _TOKENIZER_THREAD, functools.partial(fn, *args, **kwargs)
    )


class OffLoopBodyRoute(APIRoute):
    """A route whose large JSON body is decoded on the tokenizer thread. FastAPI reads it from
    `request.json()`, which returns what is cached here, and validates it as always."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            body = await request.body()
            if len(body) > OFF_LOOP_BODY_BYTES and "json" in request.headers.get("content-type", ""):
                with contextlib.suppress(UnicodeDecodeError):  # not UTF-8: FastAPI's decoding reports it
                    request._json = await off_loop(_decode_json, body)
            return await handle(request)

        return handler


def _decode_json(body: bytes) -> Any:
    """The JSON value of a body, or the error FastAPI raises for one it cannot decode."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "input": {}, "ctx": {"error": exc.msg}}]) from None


def check_text(
    tokenizer: Any,
    text: str,
    *,
    param: str,
    add_special_tokens: bool,
    max_model_len: int | None = None,
) -> None:
    """Refuse what cannot be tokenized (400 naming `param`) and, given `max_model_len`, a long text that
    cannot fit the context window, counted without materialising its ids. On the tokenizer thread."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(
            400, f"{param}: not valid Unicode text ({exc.reason} at position {exc.start})", param=param
        ) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if max_model_len is None or len(text) <= _LONG_TEXT_CHARS or backend is None:
        return
    # encode_batch releases the GIL while it works (encode does not); len() builds no list.
    count = len(backend.encode_batch([text], add_special_tokens=add_special_tokens)[0])
    try:
        check_context(count, None, max_model_len, param)
    except Exception as exc:
        raise from_engine_error(exc, prompt_param=param) from None


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always runs `on_close` when it ends: finished, disconnected (Starlette
    cancels the body when the client goes away) or cancelled by the server's own shutdown."""

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]
    ) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


# Valid JSON, but line breaks to clients that split like str.splitlines (httpx's iter_lines does): escaping
# them keeps every SSE event on one line for any client.
_LINE_BREAKS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body.translate(_LINE_BREAKS_IN_JSON)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class Job:
    """A validated request ready to run: its prompts (token ids) and what the response needs to know."""

    state: ServerState
    req: SamplingRequest
    id: str
    prompts: list[list[int]]
    slo: SLO
    arrival: float
    echo_texts: list[str] = field(default_factory=list)  # per prompt, prepended to each choice's text
    created: int = field(default_factory=now_s)
    prompt_param: str = "prompt"  # the field that held the prompt, for context-length errors

    @property
    def n(self) -> int:
        return self.req.n

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, index: int) -> int:
        return index // self.n

    def usage(self, completion_tokens: list[int], cached: int = 0) -> UsageInfo:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(completion_tokens)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=done,
            total_tokens=prompt + done,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def decode_token(self, token_id: int) -> str:
        return self.state.engine.tokenizer.decode([token_id])

    async def start(self) -> GenerationGroup:
        group = self.state.new_group()
        try:
            structured = sampling_params(self.req, 0).structured
            if structured is not None:  # compile (or find cached) off the event loop; the engine reuses it
                await off_loop(self.state.engine.runner.structured.compile, structured)
            max_new_tokens = self.state.engine.generation_defaults.get("max_tokens")
            for p, ids in enumerate(self.prompts):
                for i in range(self.n):
                    params = capped(sampling_params(self.req, i), max_new_tokens)
                    await group.add(p * self.n + i, ids, params, self.slo, self.arrival)
        except Exception as exc:
            for choice in group.choices:  # never started: nothing to classify, just free them
                self.state.async_engine.abort(choice.request_id)
            raise from_engine_error(
                exc,
                self.state.settings.retry_after_s,
                prompt_param=self.prompt_param,
                param=param_of(exc, self.req),
            ) from None
        group.start()
        return group


def prepare(
    state: ServerState, request: Request, req: SamplingRequest, prefix: str
) -> tuple[str, SLO, float]:
    """Checks every generation request goes through first; returns (response id, SLO, arrival time)."""
    arrival = time.monotonic()
    state.check_accepting()
    state.check_model(req.model)
    refuse_unsupported(req)
    apply_model_defaults(req, state.engine.generation_defaults, state.engine.config.max_logprobs)
    slo = slo_from_headers(
        request.headers,
        state.engine.config,
        req.priority,
        state.settings.allow_client_priority,
        api_key_index=request.scope.get("state", {}).get(API_KEY_INDEX),
    )
    rid = request.headers.get("x-request-id") or req.request_id or uuid.uuid4().hex
    if state.settings.log_requests:  # sizes only: prompts and outputs never reach the log
        request_log.info(
            "Received request %s-%s: n=%d, max_tokens=%s, stream=%s, client=%r",
            prefix,
            rid,
            req.n,
            max_tokens_of(req),
            req.stream,
            slo.client,
        )
    return f"{prefix}-{rid}", slo, arrival


async def await_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(group: GenerationGroup, request: Request) -> dict[int, Item]:
    """The last item of every choice; aborts the group if the client disconnects first."""
    watcher = asyncio.create_task(await_disconnect(request))
    watcher.add_done_callback(lambda t: None if t.cancelled() else group.abort("disconnect"))
    last: dict[int, Item] = {}
    try:
        async for index, item in group:
            last[index] = item
    finally:
        watcher.cancel()
    return last


def final_of(item: Item) -> tuple[RequestOutput | None, str | None, int | str | None]:
    """(last output, finish_reason, stop_reason) of a choice's final item; raises engine errors as API errors."""
    if isinstance(item, BaseException):
        raise from_engine_error(item) from None
    if isinstance(item, Aborted):
        return None, "abort", None
    return item, item.finish_reason, item.stop_reason


async def _ended_properly(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """`body`, but a failure while producing it still ends the stream the documented way (an error event,
    then [DONE]) instead of cutting the connection and leaving the client to guess."""
    try:
        async for chunk in body:
            yield chunk
    except Exception as exc:
        err = from_engine_error(exc)
        yield sse(error_body(err.status, err.message, err.param, err.code))
        yield SSE_DONE
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


def stream_response(job: Job, group: GenerationGroup, body: AsyncIterator[str]) -> SSEResponse:
    job.state.inflight.add(group)

    def on_close() -> None:
        group.abort("disconnect")
        job.state.inflight.remove(group)

    return SSEResponse(_ended_properly(body), on_close, headers={"x-request-id": job.id})


def usage_flags(req: SamplingRequest) -> tuple[bool, bool]:
    opts = req.stream_options
    include = bool(opts and opts.include_usage)
    return include, include and bool(opts and opts.continuous_usage_stats)


async def collect_tracked(job: Job, group: GenerationGroup, request: Request) -> dict[int, Item]:
    """`collect`, with the group counted as in flight (the shutdown drain waits for it) until it is done."""
    job.state.inflight.add(group)
    try:
        return await collect(group, request)
    finally:
        group.abort("disconnect")  # no-op once every choice has finished
        job.state.inflight.remove(group)


def cached(job: Job, group: GenerationGroup) -> int:
    """Prompt tokens served from the prefix cache, counted once per prompt (by its first choice)."""
    return sum(c.last.num_cached_tokens for c in group.choices if c.last is not None and c.index % job.n == 0)
