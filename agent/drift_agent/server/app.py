"""The FastAPI app: `build_app(async_engine, settings)`. It takes an already-built engine so tests (and a
future multi-app process) can share one; `own_engine=True` makes the app start and stop it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics

from .. import __version__
from ..engine.async_engine import AsyncLLMEngine
from . import admin, openai_routes
from .errors import error_body, install_handlers
from .metrics import ServerMetrics
from .settings import ServerSettings
from .state import ServerState

log = logging.getLogger(__name__)


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
    app.state.drift = state
    install_handlers(app)
    app.include_router(openai_routes.build_router())
    app.include_router(admin.build_router())

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/ready")
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

    @app.get("/metrics")
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
