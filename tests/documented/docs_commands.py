"""The shell commands a reader finds in the README and in examples/, read out of the files mechanically, so that a
command added to the docs is picked up by the tests (test_documented_commands.py) without anyone listing it.

Where a command is found:
- in Markdown, every line of a fenced code block, and `inline code` anywhere;
- in a TOML file, its comments; in a Python or shell file, every line (docstrings and comments hold the commands);
- on such a line, a command starts the line (after a leading `#`) or follows a colon ("Run: plait run ...").
A command starts with one of COMMAND_WORDS and at least one argument. It ends before a shell comment (` # ...`) or
a note in parentheses after two spaces; runs of spaces are read as one.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND_WORDS = ("plait", "python", "torchrun", "make", "pip", "sudo", "tensorboard", ".venv/bin/python")
_WORD = "|".join(re.escape(word) for word in COMMAND_WORDS)
_AT_START_OR_AFTER_COLON = re.compile(rf"(?:^|(?<=:)\s+)((?:{_WORD})\s+\S.*)$")
_INLINE_CODE = re.compile(r"`([^`]+)`")
_SHELL_COMMENT = re.compile(r"\s+#(?:\s.*)?$")
_NOTE = re.compile(r"\s{2,}\(.*\)$")
_FENCE = "```"


def documents(repo: Path = REPO) -> list[Path]:
    """The files a user reads commands from: the README and every Markdown, TOML, Python or shell file of examples/."""
    examples = sorted(p for p in (repo / "examples").rglob("*")
                      if p.suffix in (".md", ".toml", ".py", ".sh") and "__pycache__" not in p.parts)
    return [repo / "README.md", *examples]


def _cleaned(command: str) -> str:
    return " ".join(_NOTE.sub("", _SHELL_COMMENT.sub("", command.strip())).split())


def _inline(line: str) -> list[str]:
    return [_cleaned(span) for span in _INLINE_CODE.findall(line)
            if re.match(rf"(?:{_WORD})\s+\S", span.strip())]


def _on_code_line(line: str) -> list[str]:
    found = _inline(line)
    text = _INLINE_CODE.sub(" ", line).strip().lstrip("#").strip()
    match = _AT_START_OR_AFTER_COLON.search(text)
    if match:
        found.append(_cleaned(match.group(1)))
    return found


def _toml_comment(line: str) -> str:
    """The comment part of a TOML line ('' if none): after the first '#' outside a quoted string."""
    quote = ""
    for at, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[at:]
    return ""


def commands_in_text(text: str, kind: str) -> list[tuple[int, str]]:
    """(line number, command) for each command in one file's text; `kind` is its suffix: .md, .toml, .py or .sh."""
    found: list[tuple[int, str]] = []
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if kind == ".md" and line.strip().startswith(_FENCE):
            in_fence = not in_fence
            continue
        if kind == ".md":
            commands = _on_code_line(line) if in_fence else _inline(line)
        else:
            commands = _on_code_line(_toml_comment(line) if kind == ".toml" else line)
        found += [(number, command) for command in commands]
    return found


@cache
def documented_commands(repo: Path = REPO) -> dict[str, tuple[str, ...]]:
    """Every documented command, mapped to where it is written ("README.md:12", ...)."""
    places: dict[str, list[str]] = {}
    for path in documents(repo):
        for number, command in commands_in_text(path.read_text(encoding="utf-8"), path.suffix):
            places.setdefault(command, []).append(f"{path.relative_to(repo)}:{number}")
    return {command: tuple(where) for command, where in places.items()}


def documented(command: str) -> str:
    """`command`, after checking that the docs still say it word for word: a test runs what a user reads."""
    commands = documented_commands()
    assert command in commands, (f"{command!r} is no longer in the README or examples/; documented commands:\n"
                                 + "\n".join(sorted(commands)))
    return command
