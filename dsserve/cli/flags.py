"""Typer flags built from the fields of options.EngineArgs / ServerArgs, so that a command lists no option by hand."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from dsserve.errors import DsserveError

console = Console(stderr=True)
MODEL_HELP = "checkpoint folder; default: the built-in demo model (a tiny R1-style reasoning model)"


def with_flags(*classes: type, only: tuple[str, ...] | None = None, unset: bool = False,
               defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None) -> Callable:
    """Give a command one flag per CLI-visible field of `classes` (those named in `only`, else all); the command
    receives them as `options: dict`.

    `unset`: every flag defaults to None and `options` holds only those given (`serve` merges them over its
    --config file); otherwise each defaults to the field's default, or to `defaults[name]` for this command."""
    from dsserve.options import cli_fields

    defaults, helps = defaults or {}, helps or {}
    chosen = [(f, kind) for cls in classes for f, kind in cli_fields(cls) if only is None or f.name in only]

    def wrap(command: Callable) -> Callable:
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "options"]
        added = [_parameter(f, kind, unset, defaults, helps) for f, kind in chosen]

        @functools.wraps(command)
        def adapter(**kwargs: Any) -> Any:
            options = {p.name: kwargs.pop(p.name) for p in added}
            if unset:
                options = {k: v for k, v in options.items() if v is not None and v != []}
            return command(**kwargs, options=options)

        parameters = own + added
        adapter.__signature__ = inspect.Signature(parameters)
        adapter.__annotations__ = {p.name: p.annotation for p in parameters}
        return adapter

    return wrap


def resolve_model(model: Optional[str]) -> str:
    """The model folder given, or the demo model that ships inside the package."""
    from dsserve.assets import DEMO_SERVED_NAME, demo_model_dir

    if model:
        return model
    folder = demo_model_dir()
    if not (folder / "model.safetensors").exists():
        raise DsserveError(f"the built-in demo model is missing ({folder}); reinstall dsserve, or give a model folder")
    console.print(f"[dim]no model given: using the built-in demo model {DEMO_SERVED_NAME} (addition, subtraction, "
                  "comparing decimals, counting letters; English or Chinese)[/dim]")
    return str(folder)


def _parameter(f, kind: Any, unset: bool, defaults: dict[str, Any], helps: dict[str, str]) -> inspect.Parameter:
    flag = "--" + f.name.replace("_", "-")
    names = [f"{flag}/--no-{flag[2:]}" if kind is bool else flag] + ([f.metadata["short"]] if f.metadata["short"] else [])
    default = None if unset else defaults.get(f.name, f.default)
    help_text = helps.get(f.name, f.metadata["help"])
    if unset and f.default is not None and "default" not in help_text:
        shown = ("on" if f.default else "off") if kind is bool else f.default
        help_text += f" (default {shown})"
    info = typer.Option(default, *names, help=help_text, envvar=f.metadata["envvar"], show_default=not unset)
    annotation = Optional[kind] if default is None else kind
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
