"""README names every option of the `aidsafe` CLI, and its command lines use only options
the commands have."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from app.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
TYPER_OWN = {"--help", "--install-completion", "--show-completion"}
OPTION = r"(?<![\w-])(--?[a-z][a-z-]*)"


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(cli)))


def _options(command: Any) -> list[list[str]]:
    """Each option's names: `--follow` and `--no-follow` are one option, `-o` and `--output` too."""
    names = ([*p.opts, *p.secondary_opts] for p in command.params)
    return [forms for forms in names if forms[0].startswith("-") and not TYPER_OWN & set(forms)]


def _command_lines() -> Iterator[str]:
    """`aidsafe ...` as the README's shell blocks write it, continuation lines joined and
    comments cut."""
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            code = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
            yield from re.findall(r"(?:^|[\s/(])aidsafe( .*)", code)


def test_readme_names_every_option_of_every_command() -> None:
    named = set(re.findall(OPTION, README))

    missing = {
        " ".join(path) + " " + forms[0]
        for path, command in COMMANDS.items()
        for forms in _options(command)
        if not named & set(forms)
    }

    assert missing == set(), "CLI options the README never names"


def test_readme_command_lines_use_only_options_the_commands_have() -> None:
    unknown = []
    for line in _command_lines():
        path: tuple[str, ...] = ()
        for word in line.split():
            if (*path, word) not in COMMANDS:
                break
            path = (*path, word)
        known = {form for forms in _options(COMMANDS[path]) for form in forms} | {"--help"}
        unknown += [f"aidsafe{line}: {option}" for option in re.findall(OPTION, line) if option not in known]

    assert unknown == []
