"""`drift operator`: run the LLMService operator in-process against the current kubeconfig (or in-cluster)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the LLMService operator against the current kubeconfig",
        description="Run the Drift operator (kopf) in this process. Without --namespace it watches all namespaces.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        default=[],
        help="watch this namespace (repeatable)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no peering: do not coordinate with other operator replicas"
    )
    parser.add_argument(
        "--liveness", metavar="URL", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("--interval", type=float, metavar="SECONDS", help="feedback-loop period (default 15)")
    parser.add_argument("--prometheus-url", metavar="URL", help="read SLO counters from this Prometheus")
    parser.add_argument("-v", "--verbose", action="store_true", help="verbose logging")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.set_defaults(func=run, configures_logging=True)


def run(args: argparse.Namespace) -> int:
    if args.interval is not None:
        if args.interval <= 0:
            print("drift operator: --interval must be positive", file=sys.stderr)
            return 2
        os.environ["DRIFT_OPERATOR_LOOP_INTERVAL"] = str(args.interval)
    if args.prometheus_url:
        os.environ["DRIFT_PROMETHEUS_URL"] = args.prometheus_url
    if args.namespaces:
        os.environ["DRIFT_OPERATOR_NAMESPACES"] = ",".join(args.namespaces)
    try:
        # Imported here: kopf and the handlers read the settings above at import time.
        import kopf

        from drift_operator import handlers  # noqa: F401  (registers the handlers)
    except ValueError as exc:  # a malformed DRIFT_* setting
        print(f"drift operator: {exc}", file=sys.stderr)
        return 2

    from drift_operator.kube import load_credentials

    try:
        load_credentials()
    except Exception as exc:  # the kubernetes loaders raise assorted types
        print(
            f"drift operator: no usable Kubernetes credentials (in-cluster or kubeconfig): {exc}",
            file=sys.stderr,
        )
        return 2
    kopf.configure(verbose=args.verbose, debug=args.debug)
    namespaces = list(args.namespaces)
    try:
        kopf.run(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=args.standalone,
            liveness_endpoint=args.liveness,
        )
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # kopf surfaces login and API failures as assorted exception types
        print(f"drift operator: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
