"""Running one typer command as a program of its own (`python -m tools.<module>`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer


def run_command(command: Callable[..., Any], argv: list[str] | None, prog_name: str) -> None:
    """Parse `argv` (default: the process's arguments) for `command` and run it."""
    app = typer.Typer(add_completion=False)
    app.command()(command)
    app(args=argv, prog_name=prog_name)
