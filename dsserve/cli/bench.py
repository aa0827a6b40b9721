"""`dsserve bench`: throughput, MindIE's performance table and latency on the in-process engine; load on a server."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dsserve.cli.flags import MODEL_HELP, console, resolve_model, with_flags
from dsserve.errors import DsserveError
from dsserve.options import EngineArgs

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks on the in-process engine.")
MODEL_FLAGS = ("dtype", "weight_dtype", "kv_cache_dtype", "backend", "num_threads", "quantization")  # how the model computes


@bench_app.command("throughput")
@with_flags(EngineArgs, only=MODEL_FLAGS + ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                                            "kv_cache_memory", "enable_prefix_caching"))
def bench_throughput(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    num_prompts: int = typer.Option(64),
    input_len: int = typer.Option(128),
    output_len: int = typer.Option(128),
    seed: int = typer.Option(0),
    options: dict = None,
):
    """Offline throughput: random prompts of exact length, exactly output_len tokens each; prints tokens/s."""
    from dsserve.bench.throughput import run_throughput

    engine = _engine(model, {**options, "max_model_len": options["max_model_len"] or input_len + output_len + 8})
    r = run_throughput(engine, num_prompts, input_len, output_len, seed)
    print(f"Throughput: {r.requests_per_s:.2f} requests/s, {r.total_tokens_per_s:.1f} total tokens/s, "
          f"{r.output_tokens_per_s:.1f} output tokens/s ({r.num_prompts} prompts x {r.input_len} in / "
          f"{r.output_len} out in {r.elapsed_s:.2f} s; dtype {engine.config.dtype}, "
          f"weights {engine.config.weight_dtype}, KV cache {engine.config.kv_cache_dtype}, "
          f"{engine.config.num_threads} threads)")


@bench_app.command("perf")
@with_flags(EngineArgs, only=MODEL_FLAGS + ("block_size", "kv_cache_memory"), defaults={"block_size": 128},
            helps={"block_size": "tokens per KV cache block (MindIE's cacheBlockSize default)"})
def bench_perf(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    cases: str = typer.Option("[[256,256]]", help="[[in, out], ...] as MindIE writes them"),
    batch_size: int = typer.Option(16, help="requests per batch"),
    batch_sizes: Optional[str] = typer.Option(None, help="a sweep, e.g. 1,4,16,64 (overrides --batch-size)"),
    output: Optional[Path] = typer.Option(None, help="CSV path; default performance_pa_batch{bs}_tp1_result.csv here"),
    plot: Optional[Path] = typer.Option(None, help="also plot throughput and per-token latency (needs matplotlib)"),
    seed: int = typer.Option(0),
    options: dict = None,
):
    """MindIE's performance table: exact input/output lengths, first and non-first token times, throughputs."""
    from rich.table import Table

    from dsserve.bench.timing import time_batch
    from dsserve.mindie.perf_csv import MINDIE_COLUMNS, MindieRow, mindie_csv

    try:
        pairs = [tuple(int(x) for x in pair) for pair in json.loads(cases)]
        sizes = [int(b) for b in batch_sizes.split(",")] if batch_sizes else [batch_size]
    except (ValueError, TypeError):
        raise typer.BadParameter("--cases is [[in, out], ...] and --batch-sizes is comma-separated integers") from None
    longest = max(i + o for i, o in pairs)
    engine = _engine(model, {**options, "max_model_len": longest + 8, "max_num_seqs": max(sizes),
                             "max_num_batched_tokens": max(max(sizes) * max(i for i, _ in pairs), 2048),
                             "enable_prefix_caching": False})
    name = Path(engine.model_config.path).name
    time_batch(engine, min(2, max(sizes)), 8, 4, seed + 1)  # warm-up
    rows = []
    for size in sizes:
        for input_len, output_len in pairs:
            rows.append(MindieRow.from_timing(name, time_batch(engine, size, input_len, output_len, seed)))
    text = mindie_csv(rows)
    path = output or Path(f"performance_pa_batch{sizes[0] if len(sizes) == 1 else 'sweep'}_tp1_result.csv")
    path.write_text(text)
    table = Table(*MINDIE_COLUMNS[1:])
    for line in text.splitlines()[1:]:
        table.add_row(*line.split(",")[1:])
    Console().print(table)
    console.print(f"wrote {path}")
    if plot:
        _plot(rows, plot)


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DsserveError("--plot needs matplotlib: pip install matplotlib") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for input_len, output_len in sorted({(r.input_len, r.output_len) for r in rows}):
        sel = [r for r in rows if (r.input_len, r.output_len) == (input_len, output_len)]
        a.plot([r.batch_size for r in sel], [r.e2e_throughput for r in sel], marker="o", label=f"{input_len}/{output_len}")
        b.plot([r.batch_size for r in sel], [r.decode_ms for r in sel], marker="o", label=f"{input_len}/{output_len}")
    a.set(xlabel="batch size", ylabel="E2E throughput (tokens/s)", xscale="log")
    b.set(xlabel="batch size", ylabel="non-first token time (ms)", xscale="log")
    a.legend()
    fig.tight_layout()
    fig.savefig(path)
    console.print(f"wrote {path}")


@bench_app.command("serve")
def bench_serve(
    base_url: str = typer.Option(..., help="the server, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, help="the served model name; default the first of /v1/models"),
    dataset: str = typer.Option("random", help="random | sharegpt"),
    dataset_path: Optional[Path] = typer.Option(None, help="ShareGPT JSON file (with --dataset sharegpt)"),
    input_len: int = typer.Option(128),
    output_len: int = typer.Option(128),
    num_prompts: int = typer.Option(100),
    request_rate: float = typer.Option(float("inf"), help="requests/s, Poisson arrivals; inf sends all at once"),
    max_concurrency: Optional[int] = typer.Option(None),
    goodput: Optional[list[str]] = typer.Option(None, help="SLOs in ms, e.g. --goodput ttft:500 --goodput tpot:50"),
    vocab_size: int = typer.Option(256, help="random prompts draw token ids below this (keep it <= the model's)"),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY"),
    save_result: Optional[Path] = typer.Option(None, help="write the result JSON here"),
    mindie_csv_path: Optional[Path] = typer.Option(None, "--mindie-csv", help="also write MindIE's CSV "
                                                   "(first token = mean TTFT, non-first = mean TPOT)"),
    seed: int = typer.Option(0),
):
    """Streaming load against any OpenAI-compatible server: TTFT, TPOT, ITL, E2E latency, throughput, goodput."""
    import httpx
    from rich.progress import Progress

    from dsserve.bench import serve as online
    from dsserve.mindie.perf_csv import MindieRow, mindie_csv

    try:
        online.Client(base_url)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--base-url") from None
    slos = {}
    for item in goodput or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise typer.BadParameter(f"--goodput {item!r}: use ttft:MS, tpot:MS or e2el:MS")
        slos[key] = float(value)
    if model is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    if dataset == "sharegpt":
        if not dataset_path:
            raise typer.BadParameter("--dataset sharegpt needs --dataset-path FILE")
        workload = online.sharegpt_workload(dataset_path, num_prompts, output_len, seed)
    elif dataset == "random":
        workload = online.random_workload(num_prompts, input_len, output_len, vocab_size, seed)
    else:
        raise typer.BadParameter("--dataset is random or sharegpt")
    # The client's own full garbage collection would walk its start-up heap (~17 ms on 2 cores) while the run is timed,
    # on the cores a server on this machine shares: collect once now and freeze what is alive.
    gc.collect()
    gc.freeze()
    # The bar redraws from a thread of its own while the run is timed; on a machine the client shares with the server
    # its time is taken from the server, so: only on a terminal, and 2 redraws a second rather than rich's 10.
    with Progress(console=console, disable=not console.is_terminal, refresh_per_second=2) as bar:
        task = bar.add_task("requests", total=len(workload))
        results, duration = online.run_async(online.run(base_url, model, workload, request_rate, max_concurrency,
                                                        api_key, seed, progress=lambda: bar.advance(task)))
    summary = online.summarize(results, duration, slos or None)
    print(online.report(summary))
    if save_result:
        save_result.write_text(online.to_json(summary, {"base_url": base_url, "model": model, "dataset": dataset,
                                                        "input_len": input_len, "output_len": output_len,
                                                        "num_prompts": num_prompts, "request_rate": request_rate,
                                                        "max_concurrency": max_concurrency}))
    if mindie_csv_path:
        row = MindieRow(model, max_concurrency or num_prompts, input_len, output_len, duration,
                        summary["ttft_ms"]["mean"], summary["tpot_ms"]["mean"])
        mindie_csv_path.write_text(mindie_csv([row]))
    raise typer.Exit(0 if summary["failed_requests"] == 0 else 1)


@bench_app.command("latency")
@with_flags(EngineArgs, only=MODEL_FLAGS)
def bench_latency(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    batch_size: int = typer.Option(8),
    input_len: int = typer.Option(128),
    output_len: int = typer.Option(128),
    seed: int = typer.Option(0),
    profile: bool = typer.Option(False, "--profile", help="also print where a decode step's time goes"),
    options: dict = None,
):
    """One batch: prefill time and the distribution of decode-step times (--profile: and their breakdown)."""
    from dsserve.bench.timing import time_batch
    from dsserve.profiling import profile_rows

    engine = _engine(model, {**options, "max_model_len": input_len + output_len + 8, "max_num_seqs": batch_size,
                             "max_num_batched_tokens": max(batch_size * input_len, 2048),
                             "enable_prefix_caching": False})
    time_batch(engine, min(2, batch_size), 8, 4, seed + 1)
    t = time_batch(engine, batch_size, input_len, output_len, seed, profile=profile)
    steps = sorted(t.decode_steps_s) or [0.0]

    def pct(q: float) -> float:
        return 1000 * steps[min(len(steps) - 1, int(q * len(steps)))]

    print(f"batch {batch_size}, {input_len} in / {output_len} out: total {t.total_s:.3f} s, prefill "
          f"{1000 * t.first_token_s:.1f} ms, decode step mean {1000 * t.decode_step_s:.2f} ms, p50 {pct(0.5):.2f}, "
          f"p90 {pct(0.9):.2f}, p99 {pct(0.99):.2f}, max {1000 * steps[-1]:.2f} ms over {len(t.decode_steps_s)} steps")
    if profile:
        from rich.table import Table

        table = Table(title=f"where a decode step goes (batch {batch_size}, mean over {len(t.decode_steps_s)} steps; "
                            "timing each section adds a little)")
        table.add_column("section")
        table.add_column("ms / step", justify="right")
        table.add_column("share", justify="right")
        for label, ms, share in profile_rows():
            table.add_row(label, f"{ms:.2f}", f"{share:.0%}")
        Console().print(table)


def _engine(model: Optional[str], options: dict):
    from dsserve.engine.engine import LLMEngine

    return LLMEngine.from_options(resolve_model(model), **options)
