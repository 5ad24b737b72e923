"""Operator commands of the scoring service (mounted as `alliance scoring ...`)."""

from __future__ import annotations

import typer

app = typer.Typer(help="scoring service commands.", no_args_is_help=True)
