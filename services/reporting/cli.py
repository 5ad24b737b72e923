"""Operator commands of the reporting service (mounted as `alliance reporting ...`)."""

from __future__ import annotations

import typer

app = typer.Typer(help="reporting service commands.", no_args_is_help=True)
