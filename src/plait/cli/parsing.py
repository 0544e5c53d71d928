"""The pieces every `plait` sub-command is made of: a parser whose handler is a function of the parsed arguments,
described by that function's docstring, and the repeatable `--set KEY=VALUE` override."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

Handler = Callable[[argparse.Namespace], None]
# What add_subparsers returns: argparse names no public type for it, and its class is generic only to type checkers.
if TYPE_CHECKING:
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Commands = argparse._SubParsersAction


def add_command(commands: Commands, name: str, handler: Handler) -> argparse.ArgumentParser:
    """Sub-command `name` of `commands`, which runs `handler(args)`: its one-line help is the docstring's first line,
    its description the whole docstring."""
    doc = (handler.__doc__ or "").strip()
    parser: argparse.ArgumentParser = commands.add_parser(name, help=doc.split("\n")[0], description=doc)
    parser.set_defaults(handler=handler)
    return parser


def add_group(commands: Commands, name: str, help_text: str) -> Commands:
    """Sub-command `name` that is itself a group of sub-commands (`plait fl ...`, `plait ps ...`)."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    group: Commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    return group


def add_overrides(parser: argparse.ArgumentParser, example: str = "fl.rounds=5") -> None:
    """`--set KEY=VALUE`, repeatable: config keys the command line overrides (settings/config.py's rules)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeat for more)")
