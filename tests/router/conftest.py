"""Harness of the router tests: an event loop on a thread that runs in-process routers and small fake agents
(aiohttp apps that answer `GET /state` and misbehave on request), so tests drive them with plain sync
clients; and real `drift serve` / `drift router` processes on loopback for the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web

from drift_agent.router.app import STATE_KEY, RouterSettings, RouterState, build_app, start_runner
from drift_agent.router.proxy import ProxySettings

T = TypeVar("T")
MODEL = "tiny"


class LoopThread:
    """An asyncio loop on a daemon thread; `run(coro)` runs a coroutine there and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class FakeAgent:
    """A stand-in agent. `mode` decides how generation requests are answered:
    ok (a short SSE stream or JSON), refuse (429 + Retry-After), hang (never answers), die (two events, then
    the connection is cut), die-before-first / die-after-role / stall-before-first (stream headers, a chat's
    opening role chunk for die-after-role, then the connection is cut / nothing more), endless (an event every
    20 ms until the client goes away). With `api_key`, /v1/models wants it as a bearer token."""

    mode: str = "ok"
    model: str = MODEL
    ready: bool = True
    draining: bool = False
    retry_after: str = "30"
    api_key: str | None = None
    interval: float = 0.02  # between two stream events
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    runner: web.AppRunner | None = None

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ready": self.ready,
            "draining": self.draining,
            "engine_up": True,
            "waiting": 0,
            "running": 0,
            "pending_prefill_tokens": 0,
            "kv_blocks_total": 100,
            "kv_blocks_free": 100,
            "kv_used_tokens": 0,
            "block_size": 16,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 512,
            "prefix_cache": {"enabled": True, "queries": 0, "hits": 0},
            "policy": "chunked",
            "split": None,
            "perf": {"prefill_s_per_token": None, "decode_step_s": None, "decode_batch": 1},
            "slo": {"ttft_ms": 1000.0, "tpot_ms": 100.0, "attainment": None, "window_s": 60.0},
            "time": time.time(),
        }

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _models(self, request: web.Request) -> web.Response:
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            err = {
                "message": "bad key",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
            return web.json_response({"error": err}, status=401, headers={"WWW-Authenticate": "Bearer"})
        card = {"id": self.model, "object": "model", "owned_by": "fake", "max_model_len": 99}
        return web.json_response({"object": "list", "data": [card]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if self.mode == "refuse":
            err = {
                "error": {"message": "full", "type": "rate_limit_error", "param": None, "code": "overloaded"}
            }
            return web.json_response(err, status=429, headers={"Retry-After": self.retry_after})
        if self.mode == "hang":
            await asyncio.sleep(3600)
        rid = request.headers.get("x-request-id", "fake")
        if not body.get("stream"):
            return web.json_response(
                {"id": f"cmpl-{rid}", "object": "text_completion", "model": self.model, "choices": []},
                headers={"x-request-id": rid},
            )
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": rid})
        await out.prepare(request)
        if self.mode in ("die-before-first", "die-after-role"):  # accepted the stream, died in the prefill
            if self.mode == "die-after-role":  # as a chat stream opens: the role, before any token
                opening = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                await out.write(b"data: " + json.dumps(opening).encode() + b"\n\n")
            assert request.transport is not None
            request.transport.abort()
            return out
        if self.mode == "stall-before-first":  # accepted the stream, never produced a token
            # Until the router gives up on it and closes the connection (what aborts it on a real agent).
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.01)
            self.disconnected.set()
            return out
        try:
            n = 0
            while True:
                await out.write(b"data: " + json.dumps({"n": n}).encode() + b"\n\n")
                n += 1
                if self.mode == "die" and n == 2:
                    assert request.transport is not None
                    request.transport.abort()  # the agent process died mid-stream
                    return out
                if self.mode in ("ok", "hang") and n == 3:
                    break
                await asyncio.sleep(self.interval)
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return out

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/state", self._state)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url


@dataclass
class InProcessRouter:
    url: str
    runner: web.AppRunner
    state: RouterState

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)


class Harness:
    def __init__(self) -> None:
        self.lt = LoopThread()
        self._runners: list[web.AppRunner] = []

    def fake(self, **kw: Any) -> FakeAgent:
        agent = FakeAgent(**kw)
        self.lt.run(agent.start())
        assert agent.runner is not None
        self._runners.append(agent.runner)
        return agent

    def router(self, backends: list[str], wait_ready: bool = True, **kw: Any) -> InProcessRouter:
        proxy_kw = {k: kw.pop(k) for k in list(kw) if k in ProxySettings.__dataclass_fields__}
        settings = RouterSettings(
            host="127.0.0.1",
            port=0,
            backends=tuple(backends),
            poll_interval_s=kw.pop("poll_interval_s", 0.02),
            proxy=ProxySettings(**proxy_kw),
            **kw,
        )

        async def start() -> InProcessRouter:
            app = build_app(settings)
            runner = await start_runner(app, "127.0.0.1", 0, shutdown_timeout_s=0.5)
            host, port = runner.addresses[0][:2]
            return InProcessRouter(f"http://{host}:{port}", runner, app[STATE_KEY])

        router = self.lt.run(start())
        self._runners.append(router.runner)
        if wait_ready:
            wait_until(
                lambda: httpx.get(f"{router.url}/ready").status_code == 200, "router never became ready"
            )
        return router

    def close(self) -> None:
        for runner in reversed(self._runners):
            self.lt.run(runner.cleanup())
        self.lt.close()


def wait_until(cond: Any, message: str, timeout: float = 20.0) -> None:
    """Poll `cond()` until true; a deadline only against hanging, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


# ---- real processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(args: list[str], log: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "drift_agent.cli", *args, "--host", host, "--port", str(port)]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**_env(), **(env or {})})
    return Proc(proc, f"http://{host}:{port}", log)


def wait_ready(p: Proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert p.proc.poll() is None, p.log.read_text()
        try:
            if httpx.get(f"{p.url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{p.url} did not become ready:\n{p.log.read_text()}"
        time.sleep(0.1)
