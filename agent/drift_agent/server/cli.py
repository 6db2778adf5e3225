"""`drift serve`: the OpenAI-compatible server (FastAPI on uvicorn) around the engine."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from ..commands.engine_args import (
    PreflightError,
    add_engine_args,
    check_before_loading,
    config_error_message,
    engine_config_from_args,
    engine_default,
)
from ..core.config import PartitionConfig, bounds_text
from ..core.errors import DriftError
from .settings import UVICORN_GRACEFUL_S, ServerSettings


def _server_default(name: str) -> Any:
    return ServerSettings.model_fields[name].default


def _partition_default(name: str) -> Any:
    return engine_default("partition").model_dump()[name]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API, /metrics and the admin API",
        description="Engine options: flags > DRIFT_* environment > --config YAML. "
        "Set DRIFT_ADMIN_TOKEN to enable PUT /admin/policy, --api-key (DRIFT_API_KEY) to require a key.",
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default=_server_default("host"), help="listen address (default: %(default)s)")
    s.add_argument(
        "--port", type=int, default=_server_default("port"), help="listen port (default: %(default)s)"
    )
    s.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="model id clients send and metrics carry (default: the --model path, or SmolLM2-135M-Instruct)",
    )
    s.add_argument(
        "--max-waiting-requests",
        type=int,
        metavar="N",
        help="bounded waiting queue; past it requests get 429 "
        f"(default: {engine_default('max_waiting_requests')})",
    )
    s.add_argument(
        "--slo-ttft-ms",
        type=float,
        metavar="MS",
        help=f"TTFT target of requests without x-slo-ttft-ms (default: {engine_default('slo_ttft_ms'):g})",
    )
    s.add_argument(
        "--slo-tpot-ms",
        type=float,
        metavar="MS",
        help=f"TPOT target of requests without x-slo-tpot-ms (default: {engine_default('slo_tpot_ms'):g})",
    )
    s.add_argument(
        "--partition-mode",
        choices=["auto", "static", "off"],
        help="SM split of the drift policy: auto picks it per step, static keeps --prefill-sm-share, off "
        f"never splits (default: {_partition_default('mode')})",
    )
    s.add_argument(
        "--prefill-sm-share",
        type=float,
        metavar="FRACTION",
        help="prefill's share of SMs in static partition mode and static-split "
        f"(default: {_partition_default('prefill_sm_share')})",
    )
    s.add_argument(
        "--partition-backend",
        choices=["auto", "green-context", "mps", "shared"],
        help="how the split is realised: CUDA green contexts, MPS, or shared (no split; CPU) "
        f"(default: {_partition_default('backend')})",
    )
    s.add_argument(
        "--fold-max-tokens",
        type=int,
        metavar="TOKENS",
        help="drift: most prompt tokens folded into one decode step when it meets TPOT; 0: never "
        f"(default: {_partition_default('fold_max_tokens')})",
    )
    s.add_argument(
        "--tpot-margin",
        type=float,
        metavar="MARGIN",
        help="drift: plan decode against TPOT step budget / (1 + margin), "
        f"{bounds_text(PartitionConfig.model_fields['tpot_margin'])}; > 0 keeps decode on "
        "more SMs when the performance model is optimistic, < 0 gives prefill more (favours TTFT); the "
        f"operator steers it at run time (default: {_partition_default('tpot_margin'):g})",
    )
    s.add_argument(
        "--slo-window-s",
        type=float,
        metavar="S",
        help="window of drift_slo_attainment, seconds; env DRIFT_SLO_WINDOW_S "
        f"(default: {_server_default('slo_window_s'):g})",
    )
    s.add_argument(
        "--shutdown-timeout-s",
        type=float,
        metavar="S",
        help="on SIGTERM, how long running requests may finish, seconds; env DRIFT_SHUTDOWN_TIMEOUT_S "
        f"(default: {_server_default('shutdown_timeout_s'):g})",
    )
    s.add_argument(
        "--max-request-body-bytes",
        type=int,
        metavar="BYTES",
        help="larger request bodies get 413 before they are read; env DRIFT_MAX_REQUEST_BODY_BYTES "
        f"(default: {_server_default('max_request_body_bytes')})",
    )
    s.add_argument(
        "--chat-template",
        metavar="FILE_OR_TEMPLATE",
        help="the chat template: a Jinja file, or the template itself inline (default: the tokenizer's)",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="honour chat templates sent in requests (chat_template, chat_template_kwargs.chat_template); "
        "they are code the server runs (default: refused with 400)",
    )
    s.add_argument(
        "--tool-call-parser",
        choices=["hermes", "llama3_json", "mistral"],
        help="read tool calls from chat replies in this model family's format and allow tool_choice "
        '"auto" (vLLM\'s names; default: none, only "required" and named functions)',
    )
    s.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM compatibility: --tool-call-parser alone enables tool_choice auto (default: off)",
    )
    s.add_argument(
        "--admin-port",
        type=int,
        metavar="PORT",
        help="serve /admin/* on this port only (same host), so a NetworkPolicy can keep clients from it; "
        "env DRIFT_ADMIN_PORT (default: the API's port)",
    )
    s.add_argument(
        "--allow-client-priority",
        action="store_true",
        help="honour request priorities ahead of the default (x-slo-priority or `priority` < 0); env "
        "DRIFT_ALLOW_CLIENT_PRIORITY (default: refused with 403, so anonymous clients cannot jump the queue)",
    )
    s.add_argument(
        "--api-key",
        nargs="+",
        action="extend",  # vLLM's `--api-key K1 K2`; repeating the flag adds to the list too
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (401 otherwise); "
        "list, repeat or comma-separate for several keys; env DRIFT_API_KEY (comma-separated) "
        "(default: none, the routes are open)",
    )
    s.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="do not log a line per generation request (its id, route and sizes; never prompts or outputs), "
        "as vLLM's flag (default: logged at INFO)",
    )
    s.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: %(default)s)",
    )
    s.add_argument(
        "--no-access-log", action="store_true", help="do not log every HTTP request (default: logged)"
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    from ..core.config import EngineConfig

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


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a port in use is a one-line error now
    rather than uvicorn's after minutes of loading; uvicorn then serves on this very socket, so nothing can
    take the port in between. It listens only once uvicorn starts: until then clients are refused at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn: a restart may reuse TIME_WAIT
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PreflightError(
                f"cannot listen on {host}:{port}: the port is already in use (another server?); "
                "stop it or pass another --port"
            ) from None
        raise PreflightError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def server_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ServerSettings:
    """The server's settings from its flags over the DRIFT_* environment; raises ValueError when invalid."""
    from .chat_template import load_chat_template  # imports FastAPI: not for `drift --help`

    return ServerSettings.from_sources(
        env,
        host=args.host,
        port=args.port,
        slo_window_s=args.slo_window_s,
        shutdown_timeout_s=args.shutdown_timeout_s,
        max_request_body_bytes=args.max_request_body_bytes,
        chat_template=load_chat_template(args.chat_template),
        trust_request_chat_template=args.trust_request_chat_template or None,
        tool_call_parser=args.tool_call_parser,
        admin_port=args.admin_port,
        allow_client_priority=args.allow_client_priority or None,
        api_keys=args.api_key,
        log_requests=False if args.disable_log_requests else None,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        settings = server_settings(args, os.environ)
    except (ValueError, OSError) as exc:
        print(f"drift serve: invalid configuration: {config_error_message(exc)}", file=sys.stderr)
        return 2
    # Everything that can be known wrong before loading the model (which takes minutes on a GPU) is refused
    # here, as one line and exit code 2, like a bad flag.
    sockets: list[socket.socket] = []
    try:
        sockets.append(bind_socket(settings.host, settings.port))
        if settings.admin_port is not None and settings.admin_port != settings.port:
            sockets.append(bind_socket(settings.host, settings.admin_port))
        check_before_loading(config)
    except DriftError as exc:
        for sock in sockets:
            sock.close()
        print(f"drift serve: error: {exc}", file=sys.stderr)
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
            timeout_graceful_shutdown=int(UVICORN_GRACEFUL_S),
            lifespan="on",
        ),
        drain=app.state.drift.inflight,
        drain_timeout_s=settings.shutdown_timeout_s,
    )
    # uvicorn re-raises the signal that stopped it once it is done; a graceful SIGTERM stop must exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=sockets)
    return 0 if server.started else 1
