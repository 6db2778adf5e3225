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
    ("drift_agent.router.cli", "add_parser"),
    ("drift_operator.cli", "add_parser"),
]


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that reports arguments it does not know itself.

    argparse hands a subparser's leftovers back to the top-level parser, whose error then shows
    `usage: drift [-h] ... COMMAND`; refusing them here shows `usage: drift serve ...` instead. Nested
    subparsers (`drift bench serve`) inherit the class, so the innermost command reports.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drift", description="Drift: SLO-oriented LLM serving")
    parser.add_argument("--version", action="version", version=f"drift {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SubcommandParser)
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
    from .core.errors import DriftError

    try:
        return int(args.func(args) or 0)
    except DriftError as exc:
        print(f"drift {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
