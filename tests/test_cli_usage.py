"""What a new user meets first: `--help` of the engine commands, and the usage line of a mistyped flag."""

from __future__ import annotations

import argparse

import pytest

from drift_agent.cli import build_parser, main


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["serve", "--bogus"], "usage: drift serve "),
        (["generate", "hi", "--bogus"], "usage: drift generate "),
        (["bench", "serve", "--bogus"], "usage: drift bench serve "),
        (["bench", "offline", "--bogus"], "usage: drift bench offline "),
        (["bench", "--bogus"], "usage: drift bench "),
        (["sim", "plan", "--request-rate", "1", "--bogus"], "usage: drift sim plan "),
        (["profile", "--bogus"], "usage: drift profile "),
    ],
)
def test_an_unknown_flag_shows_the_subcommands_usage(argv: list[str], usage: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err.splitlines()[0]
    prog = usage.removeprefix("usage: ").strip()
    assert err.strip().splitlines()[-1] == f"{prog}: error: unrecognized arguments: --bogus"


def test_the_top_level_parser_still_reports_its_own_unknown_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--bogus"])
    assert capsys.readouterr().err.startswith("usage: drift [-h]")


@pytest.mark.parametrize("path", [("serve",), ("generate",), ("bench", "offline")])
def test_every_flag_of_the_engine_commands_says_what_it_does_and_its_default(path: tuple[str, ...]) -> None:
    parser = _subparser(*path)
    missing = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        if text.startswith("==SUPPRESS=="):
            continue
        if len(text) < 12 or "default" not in text:
            missing.append(f"{action.option_strings[0]}: {text!r}")
    assert not missing, "\n".join(missing)
    help_text = parser.format_help()  # %-formatting of every help string works
    assert "%(default)" not in help_text


def test_engine_flag_help_shows_the_engine_configs_defaults() -> None:
    help_text = " ".join(_subparser("generate").format_help().split())
    assert "most sequences running in one step (default: 256)" in help_text
    assert "(default: 2048)" in help_text and "(default: chunked)" in help_text
    assert "(default: the model's max_position_embeddings)" in help_text
