"""`drift serve`: the OpenAI-compatible server (FastAPI on uvicorn) around the engine."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from ..commands.engine_args import add_engine_args, config_error_message, engine_config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API, /metrics and the admin API",
        description="Engine options: flags > DRIFT_* environment > --config YAML. "
        "Set DRIFT_ADMIN_TOKEN to enable PUT /admin/policy.",
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="model id clients send (default: the --model path)")
    s.add_argument("--max-waiting-requests", type=int, help="bounded waiting queue; past it requests get 429")
    s.add_argument("--slo-ttft-ms", type=float, help="default TTFT target of requests without x-slo-ttft-ms")
    s.add_argument("--slo-tpot-ms", type=float, help="default TPOT target of requests without x-slo-tpot-ms")
    s.add_argument("--partition-mode", choices=["auto", "static", "off"])
    s.add_argument("--prefill-sm-share", type=float, help="prefill share of SMs in static partition mode")
    s.add_argument("--partition-backend", choices=["auto", "green-context", "mps", "shared"])
    s.add_argument(
        "--fold-max-tokens",
        type=int,
        help="drift: most prompt tokens folded into one decode step when it meets TPOT (0: never; default 2048)",
    )
    s.add_argument(
        "--tpot-margin",
        type=float,
        help="drift: plan decode against TPOT step budget / (1 + margin), in [-0.5, 1]; > 0 keeps decode on "
        "more SMs when the performance model is optimistic, < 0 gives prefill more (favours TTFT); default 0. "
        "The operator steers it at run time",
    )
    s.add_argument(
        "--slo-window-s", type=float, help="window of drift_slo_attainment (default 60; DRIFT_SLO_WINDOW_S)"
    )
    s.add_argument(
        "--shutdown-timeout-s",
        type=float,
        help="on SIGTERM, how long running requests may finish (default 20; DRIFT_SHUTDOWN_TIMEOUT_S)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    add_engine_args(p)
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    from ..engine.config import EngineConfig

    config = engine_config_from_args(args)
    extra: dict[str, Any] = {
        k: v
        for k, v in {
            "served_model_name": args.served_model_name,
            "max_waiting_requests": args.max_waiting_requests,
            "slo_ttft_ms": args.slo_ttft_ms,
            "slo_tpot_ms": args.slo_tpot_ms,
        }.items()
        if v is not None
    }
    partition = {
        k: v
        for k, v in {
            "mode": args.partition_mode,
            "prefill_sm_share": args.prefill_sm_share,
            "backend": args.partition_backend,
            "fold_max_tokens": args.fold_max_tokens,
            "tpot_margin": args.tpot_margin,
        }.items()
        if v is not None
    }
    if partition:
        extra["partition"] = config.partition.model_dump() | partition
    return EngineConfig.model_validate(config.model_dump() | extra) if extra else config


def run(args: argparse.Namespace) -> int:
    from .settings import ServerSettings

    try:
        config = _config(args)
        settings = ServerSettings.from_sources(
            os.environ,
            host=args.host,
            port=args.port,
            slo_window_s=args.slo_window_s,
            shutdown_timeout_s=args.shutdown_timeout_s,
        )
    except (ValueError, OSError) as exc:
        print(f"drift serve: invalid configuration: {config_error_message(exc)}", file=sys.stderr)
        return 2

    import uvicorn

    from ..engine.async_engine import AsyncLLMEngine
    from ..engine.llm_engine import LLMEngine
    from .app import build_app
    from .uvicorn_server import DrainingServer

    engine = LLMEngine(config)
    app = build_app(AsyncLLMEngine(engine), settings, own_engine=True)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            access_log=not args.no_access_log,
            timeout_graceful_shutdown=5,
            lifespan="on",
        ),
        drain=app.state.drift.inflight,
        drain_timeout_s=settings.shutdown_timeout_s,
    )
    # uvicorn re-raises the signal that stopped it once it is done; a graceful SIGTERM stop must exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1
