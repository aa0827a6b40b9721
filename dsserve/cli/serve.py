"""`dsserve serve`: the flags and the --config file merged, handed to server/launch.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dsserve.cli.flags import MODEL_HELP, resolve_model, with_flags
from dsserve.errors import ConfigError
from dsserve.options import EngineArgs, ServerArgs


@with_flags(ServerArgs, EngineArgs, unset=True)
def serve(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with these options' names; flags override"),
    options: dict = None,
):
    """Serve the OpenAI-compatible API (chat, completions, models, tokenize, health, metrics).

    With -tp N this process is rank 0 and starts N-1 more on this node. Multi-node: run the same command on
    every node with --rank-table and its own --node-rank (node 0 serves HTTP), or start it with torchrun."""
    from dsserve.options import load_toml, split_options
    from dsserve.server import launch

    given = {**(load_toml(config) if config else {}), **options, **({"model": model} if model else {})}
    try:
        engine_options, server_options = split_options(given, "dsserve serve")
        server = ServerArgs.from_options(server_options)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    sys.exit(launch.serve(resolve_model(server.model), server, engine_options))
