"""`drift`: one command line, one subcommand per module. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

# (module, function registering its subcommand(s) on the top-level subparsers)
COMMANDS: list[tuple[str, str]] = [
    ("drift_agent.commands.generate", "add_parser"),
    ("drift_agent.commands.bench", "add_parser"),
]
OPTIONAL_COMMANDS: list[tuple[str, str]] = [
    # Present when their part of the product is installed.
    ("drift_agent.server.cli", "add_parser"),
    ("drift_agent.commands.profile", "add_parser"),
    ("drift_agent.sim.cli", "add_parser"),
    ("drift_operator.cli", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drift", description="Drift: SLO-oriented LLM serving")
    parser.add_argument("--version", action="version", version=f"drift {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, fn in COMMANDS:
        getattr(importlib.import_module(module), fn)(sub)
    for module, fn in OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        getattr(mod, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "configures_logging", False):  # e.g. the operator: kopf installs its own handler
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    if not args.verbose:  # one INFO line per HTTP request would bury the benchmark's own output
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .engine.errors import DriftError

    try:
        return int(args.func(args) or 0)
    except DriftError as exc:
        print(f"drift {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
