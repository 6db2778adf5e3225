"""The FastAPI app: `build_app(async_engine, settings)`. It takes an already-built engine so tests (and a
future multi-app process) can share one; `own_engine=True` makes the app start and stop it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics

from .. import __version__
from ..engine.async_engine import AsyncLLMEngine
from . import admin, agent_state, openai_routes
from .auth import APIKeyMiddleware, is_protected
from .body_limit import BodyLimitMiddleware
from .errors import error_body, error_responses, install_handlers
from .metrics import ServerMetrics
from .settings import ServerSettings
from .state import ServerState

log = logging.getLogger(__name__)


def _documented(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`, adjusted to what the routes really do: a malformed request is a 400 in OpenAI's shape
    (errors.py), never FastAPI's 422 `HTTPValidationError`; and the models of bodies a route reads by hand
    (PUT /admin/policy) join the others in components.schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = FastAPI.openapi(app)
        models = schema.setdefault("components", {}).setdefault("schemas", {})
        for operations in schema["paths"].values():
            for op in operations.values():
                responses = op.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422")):
                    del responses["422"]
                body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
                models.update(body.get("schema", {}).pop("$defs", {}))
        models.pop("HTTPValidationError", None)
        models.pop("ValidationError", None)
        return schema

    return openapi


def _document_api_keys(app: FastAPI) -> None:
    """With --api-key, the OpenAPI document shows the bearer scheme and the 401 on the routes it guards."""
    documented = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = documented()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["APIKey"] = {"type": "http", "scheme": "bearer", "description": "--api-key / DRIFT_API_KEY"}
        for path, operations in schema["paths"].items():
            if is_protected(path):
                for op in operations.values():
                    op.setdefault("security", []).append({"APIKey": []})
                    op.setdefault("responses", {})["401"] = {
                        "description": "Missing or wrong API key (`code: invalid_api_key`)",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                        },
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class AdminPortMiddleware:
    """With `--admin-port`, /admin/* answers only on that port and nothing else does (404 both ways), so a
    NetworkPolicy on the port keeps clients from the admin API. One server listens on both sockets; the
    port a request came in on is the ASGI scope's `server`."""

    def __init__(self, app: Any, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            server = scope.get("server") or (None, None)
            on_admin_port = server[1] == self.admin_port
            if scope["path"].startswith("/admin/") != on_admin_port:
                where = f"port {self.admin_port}" if not on_admin_port else "the API port"
                response = JSONResponse(error_body(404, f"{scope['path']} is served on {where}"), 404)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    async_engine: AsyncLLMEngine,
    settings: ServerSettings | None = None,
    *,
    own_engine: bool = False,
    gpu_metrics: bool = True,
) -> FastAPI:
    settings = settings or ServerSettings()
    # As vLLM does: no `_created` series; they double the exposition and no dashboard reads them.
    disable_created_metrics()
    metrics = ServerMetrics(
        async_engine, async_engine.engine.model_name, settings.slo_window_s, gpu=gpu_metrics
    )
    state = ServerState(async_engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        async_engine.step_hooks.append(metrics.on_step)
        try:
            yield
        finally:
            # A server that drained already (SIGTERM) has nothing left here; otherwise end what is still open.
            await state.inflight.drain(0.0)
            with contextlib.suppress(ValueError):
                async_engine.step_hooks.remove(metrics.on_step)
            if own_engine:
                async_engine.shutdown()

    app = FastAPI(title="Drift", version=__version__, lifespan=lifespan)
    app.openapi = _documented(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.admin_port is not None and settings.admin_port != settings.port:
        app.add_middleware(AdminPortMiddleware, admin_port=settings.admin_port)
    if settings.api_keys:
        # Added last, so outermost: a request without a valid key is refused before its body is read.
        app.add_middleware(APIKeyMiddleware, keys=settings.api_key_values())
        _document_api_keys(app)
    app.state.drift = state
    install_handlers(app)
    app.include_router(openai_routes.build_router())
    app.include_router(admin.build_router())
    app.include_router(agent_state.build_router())

    @app.get("/health", responses=error_responses(503))
    async def health() -> JSONResponse:
        """Liveness: 503 once the engine loop has died, so the orchestrator restarts the process (it cannot
        recover in place); 200 otherwise, draining or still starting included (readiness covers those)."""
        if async_engine.is_dead:
            error = async_engine.error or async_engine.engine.dead
            reason = f"engine loop is dead: {error!r}" if error else "engine loop has exited"
            return JSONResponse(error_body(503, reason, code="engine_dead"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", responses=error_responses(503))
    async def ready() -> JSONResponse:
        """The model is loaded, the engine loop is alive and the server is not draining (readiness)."""
        if not async_engine.is_running:
            reason = (
                f"engine loop is not running: {async_engine.error!r}"
                if async_engine.error
                else "engine not started"
            )
            return JSONResponse(error_body(503, reason, code="engine_dead"), 503)
        if state.inflight.draining:
            return JSONResponse(error_body(503, "server is draining for shutdown", code="draining"), 503)
        return JSONResponse({"status": "ready", "model": state.model_name})

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        metrics.draining = state.inflight.draining
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"version": __version__}

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "ok"}

    return app
