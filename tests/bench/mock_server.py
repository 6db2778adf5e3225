"""A small OpenAI-like streaming server for the benchmark client's tests, run by uvicorn on 127.0.0.1.

It streams `max_tokens` chunks: the first after `ttft_s` (+ `ttft_per_stream_s` per other stream in flight), the rest `itl_s` apart, then a finish-only chunk, a usage
chunk and [DONE]. Chat streams start with a role-only chunk sent at once, as some servers do, which must not count
as the first token. Prompts containing FAIL get HTTP 500; an unknown model gets 404. Every request's body and
headers are kept in `state.requests`, and the peak number of streams in flight in `state.peak_in_flight`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "mock-model"


@dataclass
class MockState:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    ttft_per_stream_s: float = 0.0  # extra TTFT per other stream in flight: a crude overload model
    send_usage: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(state: MockState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
        try:
            n = int(body.get("max_tokens") or 16)
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(state.ttft_s + state.ttft_per_stream_s * (state.in_flight - 1))
            for i in range(n):
                if i:
                    await asyncio.sleep(state.itl_s)
                piece = f" w{i}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield _sse({"choices": [choice]})
            end = {"index": 0, "finish_reason": "length"}
            yield _sse({"choices": [end | ({"delta": {}} if chat else {"text": ""})]})
            if state.send_usage:
                yield _sse(
                    {
                        "choices": [],
                        "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool) -> Any:
        body = await request.json()
        state.requests.append({"body": body, "headers": dict(request.headers), "t": time.perf_counter()})
        if body.get("model") != MODEL:
            return JSONResponse(
                {"error": {"message": f"model {body.get('model')!r} not found"}}, status_code=404
            )
        text = json.dumps(body.get("messages")) if chat else str(body.get("prompt"))
        if "FAIL" in text:
            return JSONResponse({"error": {"message": "synthetic failure"}}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


class MockServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(make_app(state), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> MockServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("mock server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def free_port_url() -> str:
    """A loopback URL nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
