"""`dsserve generate` and `dsserve chat`: one prompt, or a terminal conversation, on the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dsserve.cli.flags import MODEL_HELP, console, resolve_model, with_flags
from dsserve.options import EngineArgs


@with_flags(EngineArgs)
def generate(
    prompt: str = typer.Argument(..., help="prompt text"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    chat: bool = typer.Option(True, "--chat/--raw", help="apply the chat template (default) or send the text as is"),
    max_tokens: int = typer.Option(512, help="tokens to generate at most (reasoning models think first)"),
    temperature: Optional[float] = typer.Option(None, help="0 for greedy; default from generation_config.json"),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="same seed, same output"),
    n: int = typer.Option(1, help="samples of the prompt"),
    options: dict = None,
):
    """Generate a completion for one prompt with the offline engine."""
    from dsserve import LLM, SamplingParams

    llm = LLM(resolve_model(model), **options)
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if chat and llm.tokenizer is not None and llm.tokenizer.chat_template:
        outputs = llm.chat([{"role": "user", "content": prompt}], params)
    else:
        outputs = llm.generate(prompt, params)
    for completion in outputs[0].outputs:
        print(completion.text)
        console.print(f"[dim]({len(completion.token_ids)} tokens, finish_reason={completion.finish_reason})[/dim]")


def chat(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " (ignored with --url)"),
    url: Optional[str] = typer.Option(None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000"),
    served_model: Optional[str] = typer.Option(None, "--model-name", help="with --url: the model to ask; default the first listed"),
    api_key: Optional[str] = typer.Option(None, envvar="DSSERVE_API_KEY"),
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", help="do not print the chain of thought"),
    max_tokens: int = typer.Option(1024),
    temperature: Optional[float] = typer.Option(None, help="default: the model's generation_config.json"),
    system: Optional[str] = typer.Option(None, help="a system prompt (R1 recommends none)"),
    kv_cache_memory: Optional[str] = typer.Option(None),
    tools: Optional[Path] = typer.Option(None, help="with --url: a JSON file of OpenAI tool definitions to offer; "
                                         "the model's calls are shown and the next lines are their results"),
):
    """Chat in the terminal: the reasoning streams dimmed, then the answer. Pipe lines into it to script it."""
    from dsserve.chat import HTTPBackend, InProcessBackend, run_chat

    if tools is not None and not url:
        raise typer.BadParameter("--tools needs --url: the in-process chat does not parse tool calls", param_hint="--tools")
    if url:
        backend = HTTPBackend(url, served_model, api_key, _read_tools(tools) if tools is not None else None)
    else:
        backend = InProcessBackend(resolve_model(model), kv_cache_memory=kv_cache_memory)
    run_chat(backend, show_reasoning=not hide_reasoning, max_tokens=max_tokens, temperature=temperature, system=system)


def _read_tools(path: Path) -> list[dict]:
    try:
        tools = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{path} is not a readable JSON file ({e})", param_hint="--tools") from None
    if not isinstance(tools, list):
        raise typer.BadParameter(f"{path} must hold a JSON list of tool definitions", param_hint="--tools")
    return tools
