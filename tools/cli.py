"""`alliance`: the operator CLI (services/cli.py) plus the development tools.

The console script of a development install. It mounts the operator commands and adds the
tools (`run`, `simulate`, `bench`, `docs gen | check`, `stack up`), so every documented
`alliance ...` command works from one entry point; the production image, which has no tools/,
runs the operator commands as `python -m services.cli ...`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from services import cli as operator_cli
from tools.bench.system import bench
from tools.contracts import app as docs_app
from tools.run import run
from tools.simulate import simulate
from tools.stack import LocalStack

DATA_DIR = Path(".alliance")

app = operator_cli.app
stack_app = typer.Typer(help="The local broker and store (Tansu + SecantusDB).", no_args_is_help=True)


@stack_app.command("up")
def stack_up(
    durable: Annotated[bool, typer.Option(help="keep the Kafka log across restarts (s3 over localbucket)")] = True,
    data_dir: Annotated[Path, typer.Option(help="where data and logs go")] = DATA_DIR / "data",
) -> None:
    """Start the local broker and store and keep them running until Ctrl-C."""
    stack = LocalStack(data_dir, durable=durable)
    stack.start()
    typer.echo("broker 127.0.0.1:9092, store mongodb://127.0.0.1:27017 (Ctrl-C stops both)")
    try:
        asyncio.run(stack.watch_topics())
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def mount_tool_commands() -> None:
    """Add the tool commands to the operator CLI's app (call once, before running it)."""
    app.info.help = "Alliance Stream operator commands and development tools."
    app.add_typer(stack_app, name="stack")
    app.command("run")(run)
    app.command("simulate")(simulate)
    app.command("bench")(bench)
    app.add_typer(docs_app, name="docs")


def main() -> None:
    """Console-script entry point."""
    operator_cli.mount_operator_commands()
    mount_tool_commands()
    app()


if __name__ == "__main__":
    main()
