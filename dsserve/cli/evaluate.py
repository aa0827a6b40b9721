"""`dsserve eval`: accuracy on C-Eval, MMLU, GSM8K or the demo task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dsserve.assets import demo_model_dir
from dsserve.cli.bench import MODEL_FLAGS
from dsserve.cli.flags import console, resolve_model, with_flags
from dsserve.options import EngineArgs


@with_flags(EngineArgs, only=MODEL_FLAGS + ("kv_cache_memory",), unset=True)
def eval_command(
    task: str = typer.Option(..., help="ceval | mmlu | gsm8k | demo"),
    data: Optional[str] = typer.Option(None, help="the task's files in their official layout (demo: default the "
                                                   "demo model's heldout.jsonl)"),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="a checkpoint folder (in-process), or with --base-url the served model name"),
    base_url: Optional[str] = typer.Option(None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000"),
    api_key: Optional[str] = typer.Option(None, envvar="DSSERVE_API_KEY"),
    shots: Optional[int] = typer.Option(None, help="few-shot examples (default: 5 for ceval, mmlu and gsm8k; 0 for demo)"),
    split: Optional[str] = typer.Option(None, help="ceval: val (default); mmlu: test (default) or val"),
    mode: Optional[str] = typer.Option(None, help="loglikelihood | generate (default: loglikelihood for "
                                                  "multiple choice, generate otherwise)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="generate mode: chat template (default) or raw completion"),
    max_tokens: Optional[int] = typer.Option(None, help="generate mode: answer budget (default leaves room for "
                                                        "the chain of thought: 4096; demo 384)"),
    limit: Optional[int] = typer.Option(None, help="items per subject at most"),
    concurrency: int = typer.Option(8, help="requests in flight (HTTP)"),
    max_retries: int = typer.Option(3, help="retries of a transient HTTP failure"),
    output: Optional[Path] = typer.Option(None, help="write the JSON result here"),
    options: dict = None,
):
    """Accuracy on C-Eval, MMLU, GSM8K or the demo task, in-process or against any OpenAI-compatible server."""
    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from dsserve.eval import HTTPBackend, InProcessBackend, evaluate, load
    from dsserve.eval.runner import default_mode

    if task == "demo" and data is None:
        data = str(Path(model if model and not base_url else demo_model_dir()) / "heldout.jsonl")
    if data is None:
        raise typer.BadParameter(f"--data is required for {task}: the folder (or file) in the official layout")
    shots = (0 if task == "demo" else 5) if shots is None else shots
    items = load(task, data, shots, split, limit)
    mode = mode or default_mode(items)
    if base_url:
        if options:
            raise typer.BadParameter(f"--{next(iter(options)).replace('_', '-')} sets how dsserve runs the model "
                                     "in-process; with --base-url the server decides (start it with that flag)")
        if not model:
            raise typer.BadParameter("with --base-url, --model names the served model")
        backend = HTTPBackend(base_url, model, api_key, concurrency, max_retries)
    else:
        from dsserve.llm import LLM

        backend = InProcessBackend(LLM(resolve_model(model), **options))
    total = len(items) * (len(items[0].choices) if mode == "loglikelihood" else 1)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        progress_task = bar.add_task(f"{task} ({mode})", total=total)
        report = evaluate(task, items, backend, mode, shots, chat=chat, max_tokens=max_tokens,
                          progress=lambda n: bar.advance(progress_task, n))
    Console().print(Markdown(report.markdown()))
    print(f"accuracy {report.accuracy:.4f} ({report.correct}/{report.total}), unparseable {report.unparseable}")
    if output:
        output.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
        console.print(f"wrote {output}")
