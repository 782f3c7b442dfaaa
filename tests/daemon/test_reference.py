"""docs/reference.md names every command and every option that ``--help`` shows."""

import argparse
from pathlib import Path

from nbdcrypt.daemon.cli import build_parser

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def walk(parser, path=()):
    """``(command path, parser)`` for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def test_every_command_and_option_is_documented():
    text = REFERENCE.read_text()
    missing = []
    for path, parser in walk(build_parser()):
        if path and path[-1] not in text:
            missing.append(" ".join(path))
        for action in parser._actions:
            missing += [f"{' '.join(path)} {o}" for o in action.option_strings
                        if o.startswith("--") and o != "--help" and o not in text]
    assert not missing, f"not in docs/reference.md: {missing}"
