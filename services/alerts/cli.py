"""Operator commands of the alerts service (mounted as `alliance alerts ...`)."""

from __future__ import annotations

import typer

app = typer.Typer(help="alerts service commands.", no_args_is_help=True)
