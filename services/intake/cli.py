"""Operator commands of the intake service (mounted as `alliance intake ...`)."""

from __future__ import annotations

import typer

app = typer.Typer(help="intake service commands.", no_args_is_help=True)
