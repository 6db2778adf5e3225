"""`drift router`: the OpenAI-compatible front door that forwards each request to one agent."""

from __future__ import annotations

import argparse
import sys

from ..routing.policies import DEFAULT_ROUTER, ROUTERS
from . import DEFAULT_DRAIN_S, DEFAULT_SHUTDOWN_TIMEOUT_S

_DEFAULT_POLICY = DEFAULT_ROUTER


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "router",
        help="OpenAI-compatible front door routing requests across drift serve agents",
        description="Forwards /v1/completions, /v1/chat/completions (streaming or not) and /v1/models to one "
        "agent per request, chosen by a routing policy over each agent's polled GET /state; retries a refused "
        "request (429/503, unreachable, no first byte in time) on another agent.",
    )
    p.add_argument("--host", default="0.0.0.0", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default: %(default)s)")
    p.add_argument(
        "--backend",
        action="extend",
        nargs="+",
        default=[],
        metavar="URL",
        help="agents' base URLs, e.g. http://10.0.0.5:8000; several after one flag or the flag repeated "
        "(default: none)",
    )
    p.add_argument(
        "--discover",
        metavar="NAMESPACE/SERVICE",
        help="follow the ready endpoints of this Kubernetes Service, adding and removing agents live "
        "(default: off)",
    )
    p.add_argument(
        "--discover-port",
        default="8000",
        metavar="PORT",
        help="the agents' port (number or port name) under --discover (default: %(default)s)",
    )
    p.add_argument(
        "--policy", choices=ROUTERS, default=_DEFAULT_POLICY, help="routing policy (default: %(default)s)"
    )
    p.add_argument(
        "--poll-interval-ms",
        type=float,
        default=50.0,
        metavar="MS",
        help="how often each agent's GET /state is polled (default: %(default)g)",
    )
    p.add_argument(
        "--poll-timeout-ms",
        type=float,
        default=1000.0,
        metavar="MS",
        help="a poll slower than this marks the agent unroutable until one succeeds (default: %(default)g)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        metavar="N",
        help="most agents one request is sent to before its first byte (default: %(default)s)",
    )
    p.add_argument(
        "--connect-timeout-s",
        type=float,
        default=2.0,
        metavar="S",
        help="TCP connect to an agent; past it the request goes elsewhere (default: %(default)g)",
    )
    p.add_argument(
        "--first-byte-timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="streaming: wait for the agent's response headers; past it the request goes elsewhere "
        "(default: %(default)g)",
    )
    p.add_argument(
        "--first-token-timeout-s",
        type=float,
        default=60.0,
        metavar="S",
        help="streaming: wait from sending a request until its first token; past it the stalled agent's "
        "request is aborted and the request goes elsewhere (nothing has reached the client yet) "
        "(default: %(default)g)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=600.0,
        metavar="S",
        help="non-streaming: wait for the whole response; past it the request goes elsewhere "
        "(default: %(default)g)",
    )
    p.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        default=300.0,
        metavar="S",
        help="streaming: the longest silence between two chunks before the stream is ended with an error "
        "event (default: %(default)g)",
    )
    p.add_argument(
        "--max-retry-after-s",
        type=float,
        default=60.0,
        metavar="S",
        help="cap on how long an agent's Retry-After keeps it out of rotation (default: %(default)g)",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="larger request bodies get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_S,
        metavar="S",
        help="on SIGTERM, /ready turns 503 at once and requests are still served this long, while the pod "
        "leaves the Service's endpoints; a second signal ends it early (default: %(default)g)",
    )
    p.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="S",
        help="after the drain, how long open requests (streams) may finish before they are cut "
        "(default: %(default)g)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .app import RouterSettings, serve
    from .proxy import ProxySettings

    if not args.backend and not args.discover:
        print(
            "drift router: error: give --backend URL (repeatable) or --discover NAMESPACE/SERVICE",
            file=sys.stderr,
        )
        return 2
    try:
        settings = RouterSettings(
            host=args.host,
            port=args.port,
            backends=tuple(args.backend),
            policy=args.policy,
            poll_interval_s=args.poll_interval_ms / 1000.0,
            poll_timeout_s=args.poll_timeout_ms / 1000.0,
            max_request_body_bytes=args.max_request_body_bytes,
            discover=args.discover,
            discover_port=args.discover_port,
            access_log=args.access_log,
            drain_s=args.drain_seconds,
            shutdown_timeout_s=args.shutdown_timeout_s,
            proxy=ProxySettings(
                max_attempts=args.max_attempts,
                connect_timeout_s=args.connect_timeout_s,
                first_byte_timeout_s=args.first_byte_timeout_s,
                first_token_timeout_s=args.first_token_timeout_s,
                request_timeout_s=args.request_timeout_s,
                stream_idle_timeout_s=args.stream_idle_timeout_s,
                max_retry_after_s=args.max_retry_after_s,
            ),
        )
    except ValueError as exc:
        print(f"drift router: error: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0
