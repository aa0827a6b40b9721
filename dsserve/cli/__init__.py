"""The `dsserve` command line: each command parses flags, calls the layer below and prints; no logic lives here."""

from __future__ import annotations

import logging
import sys

import typer

from dsserve.assets import DEMO_SERVED_NAME, demo_model_dir
from dsserve.cli import bench, evaluate, generate, serve, tools
from dsserve.cli.flags import console
from dsserve.errors import DsserveError

__all__ = ["app", "main", "DEMO_SERVED_NAME", "demo_model_dir"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve and operate DeepSeek models.")
app.command()(generate.generate)
app.command()(serve.serve)
app.command()(generate.chat)
app.add_typer(bench.bench_app, name="bench")
app.command("eval")(evaluate.eval_command)
app.command()(tools.plan)
app.command()(tools.doctor)
app.add_typer(tools.weights_app, name="weights")
app.add_typer(tools.ranktable_app, name="ranktable")
app.add_typer(tools.config_app, name="config")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        app()
    except DsserveError as e:
        from rich.markup import escape

        # soft_wrap: long paths stay whole for copy and paste (the terminal wraps them)
        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
