"""The CLI as a whole: every command's --help carries an example, and --help is instant."""

from __future__ import annotations

from typing import Any

import typer

from runtime.cli import app


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}".strip()
        if hasattr(command, "commands"):  # a group (typer may carry its own click)
            out += _commands(command, path)
        else:
            out.append((path, command))
    return out


def test_every_command_has_an_example_in_its_help() -> None:
    root: Any = typer.main.get_command(app)
    commands = _commands(root)
    assert len(commands) > 25
    missing = [path for path, command in commands if "Example:" not in (command.help or "")]
    assert not missing, f"commands whose --help shows no example: {missing}"
