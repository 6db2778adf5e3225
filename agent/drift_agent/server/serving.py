"""Machinery shared by the generation routes: from a validated request to a running `GenerationGroup`, and
from the group back to an HTTP response (JSON once everything finished, or an SSE stream).

Either way a client that disconnects aborts its engine requests, which frees their KV blocks: a streaming
response notices through Starlette cancelling its body, a non-streaming one through a task that watches the
connection while the choices run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.outputs import RequestOutput
from ..engine.sequence import SLO
from .errors import from_engine_error
from .generation import Aborted, GenerationGroup, Item
from .protocol import PromptTokensDetails, SamplingRequest, UsageInfo, now_s
from .sampling import refuse_unsupported, sampling_params, slo_from_headers
from .state import ServerState


def state_of(request: Request) -> ServerState:
    return request.app.state.drift


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


def sse(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


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
            for p, ids in enumerate(self.prompts):
                for i in range(self.n):
                    await group.add(p * self.n + i, ids, sampling_params(self.req, i), self.slo, self.arrival)
        except Exception as exc:
            for choice in group.choices:  # never started: nothing to classify, just free them
                self.state.async_engine.abort(choice.request_id)
            raise from_engine_error(exc, self.state.settings.retry_after_s) from None
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
    slo = slo_from_headers(request.headers, state.engine.config, req.priority)
    rid = request.headers.get("x-request-id") or req.request_id or uuid.uuid4().hex
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


def stream_response(job: Job, group: GenerationGroup, body: AsyncIterator[str]) -> SSEResponse:
    job.state.inflight.add(group)

    def on_close() -> None:
        group.abort("disconnect")
        job.state.inflight.remove(group)

    return SSEResponse(body, on_close, headers={"x-request-id": job.id})


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
