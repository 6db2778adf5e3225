"""The router's aiohttp application: OpenAI routes forwarded to the agents, `/health`, `/ready`, `/metrics`.

`build_app(settings)` returns the application (tests run it in process); `serve(settings)` runs it on a socket
until SIGTERM/SIGINT. The upstream client is one `aiohttp.ClientSession` for the router's lifetime: pooled
keep-alive connections to every agent, no connection limit (each open stream holds one), no per-request
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from ..routing.policies import ROUTERS, PrefixAffinityRouter, Router, make_router
from . import DEFAULT_DRAIN_S, DEFAULT_SHUTDOWN_TIMEOUT_S
from .backend import Backend, BackendPool
from .errors import error_response
from .metrics import RouterMetrics
from .proxy import Forwarder, ProxySettings, parse_json_body

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024  # the agent's default (server/settings.py)
AFFINITY_MAX_KEYS = 100_000  # bounds prefix-affinity's key -> backend map in a long-running router


@dataclass(frozen=True)
class RouterSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    backends: tuple[str, ...] = ()
    policy: str = "least-loaded"
    poll_interval_s: float = 0.05
    poll_timeout_s: float = 1.0
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    discover: str | None = None  # "NAMESPACE/SERVICE"
    discover_port: str = "8000"
    proxy: ProxySettings = field(default_factory=ProxySettings)
    access_log: bool = False
    # On SIGTERM: /ready turns 503 and requests are still served for `drain_s` (endpoints controllers and
    # load balancers stop sending new ones meanwhile), then the listener closes and open requests (streams)
    # have `shutdown_timeout_s` to finish.
    drain_s: float = DEFAULT_DRAIN_S
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.policy not in ROUTERS:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(ROUTERS)}")
        if self.proxy.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.poll_interval_s <= 0 or self.poll_timeout_s <= 0:
            raise ValueError("poll interval and timeout must be > 0")
        if self.drain_s < 0 or self.shutdown_timeout_s < 0:
            raise ValueError("drain and shutdown timeout must be >= 0")
        p = self.proxy
        if min(p.connect_timeout_s, p.first_byte_timeout_s, p.first_token_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")
        if self.discover is not None and self.discover.count("/") != 1:
            raise ValueError(f"--discover takes NAMESPACE/SERVICE, got {self.discover!r}")


def make_policy(name: str, proxy: ProxySettings | None = None) -> Router:
    if name == "prefix-affinity":
        # A home away (refusing, retried elsewhere, failing polls) keeps its keys for as long as the longest
        # Retry-After the router honours: past that it is down, not busy.
        rehome = (proxy or ProxySettings()).max_retry_after_s
        return PrefixAffinityRouter(max_keys=AFFINITY_MAX_KEYS, rehome_after_s=rehome)
    return make_router(name)


class RouterState:
    """Everything a request handler needs, on `app["drift_router"]`."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.started = time.time()
        self.shutting_down = False
        self.policy = make_policy(settings.policy, settings.proxy)
        self.pool = BackendPool(
            settings.poll_interval_s, settings.poll_timeout_s, self._on_change, self._on_removed
        )
        self.metrics = RouterMetrics(lambda: list(self.pool.backends.values()), settings.policy)
        self.session_holder: dict[str, aiohttp.ClientSession] = {}
        self.forwarder = Forwarder(self.pool, self.policy, self.session_holder, self.metrics, settings.proxy)
        for url in settings.backends:
            self.pool.add_static(url)
        self._discovery_stop = threading.Event()
        self._discovery_task: asyncio.Future[Any] | None = None

    def _on_change(self, backend: Backend, before: str | None, after: str | None) -> None:
        if after is not None and before is None:
            self.metrics.ejected.labels(backend.url, after).inc()
            log.warning("backend %s out of rotation: %s", backend.url, after)
        elif after is None:
            log.info("backend %s routable", backend.url)

    def _on_removed(self, backend: Backend) -> None:
        self.metrics.ejected.labels(backend.url, "removed").inc()
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(backend.index)

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.session_holder["session"]

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        self.session_holder["session"] = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through as the agent sent them, Content-Encoding included
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),  # only the client's own
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.pool.start(self.session)
        if self.settings.discover:
            self._start_discovery()

    async def stop(self) -> None:
        self._discovery_stop.set()
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._discovery_task), 2)
        await self.pool.stop()
        session = self.session_holder.pop("session", None)
        if session is not None:
            await session.close()

    def _start_discovery(self) -> None:
        """`--discover NAMESPACE/SERVICE`: the discovery module calls back with the full list of ready agent
        URLs on every change; the pool follows it (a blocking watcher runs on a thread of its own)."""
        from . import discovery  # lazy: it imports the kubernetes client

        assert self.settings.discover is not None
        namespace, service = self.settings.discover.split("/")
        loop = asyncio.get_running_loop()
        raw_port = self.settings.discover_port
        port: int | str = int(raw_port) if raw_port.isdigit() else raw_port  # a number or a port name
        watch: Callable[..., Any] = discovery.watch_endpoints
        if inspect.iscoroutinefunction(watch):
            coro: Awaitable[Any] = watch(namespace, service, port, self.pool.set_urls)
            self._discovery_task = asyncio.ensure_future(coro)
            self._discovery_task.add_done_callback(_log_discovery_end)
        else:

            def on_change(urls: list[str]) -> None:
                loop.call_soon_threadsafe(self.pool.set_urls, list(urls))

            def run() -> None:
                try:
                    watch(namespace, service, port, on_change, self._discovery_stop)
                except Exception:
                    log.exception("discovery stopped")

            # A daemon thread, not the loop's executor: the watcher notices `stop` only between two watch
            # requests, and shutdown must not wait for that.
            threading.Thread(target=run, name="discovery", daemon=True).start()


def _log_discovery_end(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("discovery stopped: %r", fut.exception())


STATE_KEY = web.AppKey("drift_router", RouterState)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json")


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (unknown route, wrong method, body too large) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, headers=headers)


def _too_large(limit: int) -> web.Response:
    return error_response(413, f"request body is larger than {limit} bytes (--max-request-body-bytes)")


async def _generation(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    state = request.app[STATE_KEY]
    limit = state.settings.max_request_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _too_large(limit)  # refused before anything is read
    try:
        body = await request.read()  # bounded by client_max_size for a chunked body
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit)
    payload, problem = parse_json_body(body)
    if payload is None:
        return error_response(400, problem or "invalid request body")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        return error_response(400, "model must be a string", param="model")
    if model is not None:
        known = state.pool.models()
        if known and model not in known:
            state.metrics.client_errors.labels("404", "model_not_found").inc()
            return error_response(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
    return await state.forwarder.forward(request, body, payload, arrival)


async def _models(request: web.Request) -> web.Response:
    """One card per model the agents serve, as the agent that serves it describes it. The client's
    credentials go along: agents with API keys answer a client without one 401, and so does the router."""
    state = request.app[STATE_KEY]
    now = time.monotonic()
    auth = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
    cards: list[dict[str, Any]] = []
    for model in sorted(state.pool.models()):
        card: dict[str, Any] = {
            "id": model,
            "object": "model",
            "created": int(state.started),
            "owned_by": "drift",
        }
        for backend in state.pool.routable(now, model):
            try:
                async with state.session.get(
                    backend.url + "/v1/models", headers=auth, timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    if resp.status == 401:  # the agent's own refusal, in OpenAI's shape
                        headers = {k: v for k, v in resp.headers.items() if k.lower() == "www-authenticate"}
                        return web.Response(
                            status=401,
                            body=await resp.read(),
                            content_type="application/json",
                            headers=headers,
                        )
                    data = await resp.json(content_type=None)
                card = next(c for c in data["data"] if isinstance(c, dict) and c.get("id") == model)
                break
            except Exception as exc:  # the next backend, else the card from /state
                log.debug("GET /v1/models on %s: %r", backend.url, exc)
        cards.append(card)
    return _json({"object": "list", "data": cards})


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.shutting_down:
        return error_response(503, "router is shutting down", code="draining")
    now = time.monotonic()
    ready = [b.url for b in state.pool.backends.values() if b.routable(now)]
    if not ready:
        return error_response(503, "no ready backend", code="no_ready_backend", headers={"Retry-After": "1"})
    return _json({"status": "ready", "backends": ready})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _backends(request: web.Request) -> web.Response:
    """What the router knows of each backend (debugging; the routing inputs as the policy sees them)."""
    now = time.monotonic()
    out = [
        {
            "url": b.url,
            "index": b.index,
            "routable": b.routable(now),
            "reason": b.unroutable_reason(now),
            "model": b.state.model if b.state else None,
            "inflight": b.inflight,
            "pending_prefill_tokens": b.pending_prefill_tokens,
            "kv_used_tokens": b.kv_used_tokens,
            "num_running": b.num_running,
            "kv_usage": b.kv_usage,
            "slo_attainment": b.slo_attainment,
        }
        for b in request.app[STATE_KEY].pool.backends.values()
    ]
    return _json({"policy": request.app[STATE_KEY].settings.policy, "backends": out})


def build_app(settings: RouterSettings) -> web.Application:
    # client_max_size bounds a chunked body as it is read (a declared Content-Length is checked first).
    app = web.Application(client_max_size=settings.max_request_body_bytes, middlewares=[_openai_errors])
    state = RouterState(settings)
    app[STATE_KEY] = state

    async def on_startup(_: web.Application) -> None:
        await state.start()

    async def on_cleanup(_: web.Application) -> None:
        await state.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/completions", _generation)
    app.router.add_post("/v1/chat/completions", _generation)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/backends", _backends)
    return app


async def start_runner(
    app: web.Application, host: str, port: int, access_log: bool = False, shutdown_timeout_s: float = 30.0
) -> web.AppRunner:
    """Start `app` on host:port. A client that disconnects cancels its handler (handler_cancellation), which
    is what aborts its upstream request."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout_s,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    return runner


async def _serve(settings: RouterSettings) -> None:
    app = build_app(settings)
    runner = await start_runner(
        app, settings.host, settings.port, settings.access_log, settings.shutdown_timeout_s
    )
    log.info(
        "drift router on %s:%d, policy %s, %d backend(s)%s",
        settings.host,
        settings.port,
        settings.policy,
        len(settings.backends),
        f", discovering {settings.discover}" if settings.discover else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Draining: /ready answers 503 at once, but the listener stays open and requests are still served while
    # the pod leaves the Service's endpoints (which takes a moment to reach every proxy and load balancer).
    app[STATE_KEY].shutting_down = True
    stop.clear()
    log.info("draining for %g s (signal again to stop now)", settings.drain_s)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), settings.drain_s)
    await runner.cleanup()  # stops accepting, lets open requests finish (aiohttp's shutdown timeout)


def serve(settings: RouterSettings) -> None:
    """Run the router until SIGTERM/SIGINT, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(settings))
        return
    uvloop.run(_serve(settings))
