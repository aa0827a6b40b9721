"""The `dsserve` command line: each command parses flags and calls the layer below; no logic lives here."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dsserve.errors import DsserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve and operate DeepSeek models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks on the in-process engine.")
app.add_typer(bench_app, name="bench")
weights_app = typer.Typer(no_args_is_help=True, help="Check and convert checkpoint folders.")
app.add_typer(weights_app, name="weights")
ranktable_app = typer.Typer(no_args_is_help=True, help="MindIE rank tables for multi-node deployments.")
app.add_typer(ranktable_app, name="ranktable")
console = Console(stderr=True)

MODEL_HELP = "checkpoint folder; default: the built-in demo model (a tiny R1-style reasoning model)"
KV_CACHE_DTYPE_HELP = ("auto (the compute dtype) or, on CPU with float32 compute, float16: half the KV cache's memory "
                       "and of the bytes decode attention reads (llama.cpp's default f16 cache)")
WEIGHT_DTYPE_HELP = ("CPU, float32 compute: how linear weights are stored, auto|float32|float16|bfloat16 (16-bit "
                     "halves the bytes each token reads; bfloat16 runs batched matmuls on AMX tiles where the CPU "
                     "has them; auto: bfloat16 for a bf16 checkpoint on such a CPU, else float16 for a 16-bit "
                     "checkpoint, float32 for a float32 one)")
DEMO_SERVED_NAME = "dsserve-demo-r1"


def demo_model_dir() -> Path:
    """The demo model that ships inside the package (scripts/train_demo_model.py writes it)."""
    from dsserve import assets

    return Path(assets.__file__).parent / "demo-r1"


def _resolve_model(model: Optional[str]) -> str:
    if model:
        return model
    folder = demo_model_dir()
    if not (folder / "model.safetensors").exists():
        raise DsserveError(f"the built-in demo model is missing ({folder}); reinstall dsserve, or give a model folder")
    console.print(f"[dim]no model given: using the built-in demo model {DEMO_SERVED_NAME} (addition, subtraction, "
                  "comparing decimals, counting letters; English or Chinese)[/dim]")
    return str(folder)


def _engine_options(dtype: str, weight_dtype: str, kv_cache_dtype: str, block_size: int,
                    max_model_len: Optional[int], max_num_seqs: int,
                    max_num_batched_tokens: Optional[int], kv_cache_memory: Optional[str],
                    enable_prefix_caching: bool, num_threads: Optional[int]) -> dict:
    return dict(dtype=dtype, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
                enable_prefix_caching=enable_prefix_caching, num_threads=num_threads)


@app.command()
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
    dtype: str = typer.Option("auto", help="auto|bfloat16|float16|float32"),
    weight_dtype: str = typer.Option("auto", help=WEIGHT_DTYPE_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=KV_CACHE_DTYPE_HELP),
    block_size: int = typer.Option(16),
    max_model_len: Optional[int] = typer.Option(None),
    max_num_seqs: int = typer.Option(256),
    max_num_batched_tokens: Optional[int] = typer.Option(None),
    kv_cache_memory: Optional[str] = typer.Option(None, help="e.g. 4GiB; default a share of free memory"),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    num_threads: Optional[int] = typer.Option(None, help="torch threads on CPU; default all cores given"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help="ranks to split the model over"),
    enable_expert_parallel: bool = typer.Option(False, "--enable-expert-parallel", help="MoE: whole experts per rank"),
):
    """Generate a completion for one prompt with the offline engine."""
    from dsserve import LLM, SamplingParams

    llm = LLM(_resolve_model(model), **_engine_options(dtype, weight_dtype, kv_cache_dtype, block_size,
                                                     max_model_len, max_num_seqs,
                                                     max_num_batched_tokens, kv_cache_memory, enable_prefix_caching,
                                                     num_threads),
              tensor_parallel_size=tensor_parallel_size, enable_expert_parallel=enable_expert_parallel)
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if chat and llm.tokenizer is not None and llm.tokenizer.chat_template:
        outputs = llm.chat([{"role": "user", "content": prompt}], params)
    else:
        outputs = llm.generate(prompt, params)
    for completion in outputs[0].outputs:
        print(completion.text)
        console.print(f"[dim]({len(completion.token_ids)} tokens, finish_reason={completion.finish_reason})[/dim]")


@app.command()
def serve(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    host: Optional[str] = typer.Option(None, help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)"),
    port: Optional[int] = typer.Option(None, help="default 8000"),
    served_model_name: Optional[str] = typer.Option(None, help="the `model` clients send; default the folder name"),
    api_key: Optional[list[str]] = typer.Option(
        None, envvar="DSSERVE_API_KEY", help="require `Authorization: Bearer KEY`; repeat for several keys (a key "
        "given here shows in `ps`: prefer --api-key-file or the DSSERVE_API_KEY variable)"),
    api_key_file: Optional[Path] = typer.Option(
        None, help="TOML with [[keys]] tables: name, key, optional requests_per_minute and max_concurrent"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with these options' names; flags override"),
    dtype: Optional[str] = typer.Option(None, help="auto|bfloat16|float16|float32"),
    weight_dtype: Optional[str] = typer.Option(None, help=WEIGHT_DTYPE_HELP),
    kv_cache_dtype: Optional[str] = typer.Option(None, help=KV_CACHE_DTYPE_HELP),
    max_model_len: Optional[int] = typer.Option(None),
    max_num_seqs: Optional[int] = typer.Option(None),
    max_num_batched_tokens: Optional[int] = typer.Option(None),
    block_size: Optional[int] = typer.Option(None),
    kv_cache_memory: Optional[str] = typer.Option(None, help="e.g. 4GiB"),
    enable_prefix_caching: Optional[bool] = typer.Option(None, "--enable-prefix-caching/--no-enable-prefix-caching"),
    num_threads: Optional[int] = typer.Option(None),
    max_queued_requests: Optional[int] = typer.Option(None, help="beyond max_num_seqs + this, requests get 503"),
    stream_interval: Optional[int] = typer.Option(
        None, min=1, help="engine steps between a stream's chunks (1: every token; the first token and the end are "
        "always sent at once); larger sends fewer, bigger chunks, for less HTTP work per token"),
    reasoning_parser: Optional[str] = typer.Option(None, help="auto|deepseek_r1|none"),
    strict_reasoning_history: Optional[bool] = typer.Option(
        None, "--strict-reasoning-history/--no-strict-reasoning-history",
        help="reject reasoning_content in input messages with 400, as DeepSeek's API does (default: drop it)"),
    chat_template: Optional[Path] = typer.Option(None, help="a Jinja file replacing the tokenizer's chat template"),
    max_input_len: Optional[int] = typer.Option(None, help="longest prompt accepted (MindIE maxInputTokenLen)"),
    truncate_input: Optional[bool] = typer.Option(None, "--truncate-input/--no-truncate-input",
                                                  help="cut longer prompts to --max-input-len instead of refusing"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG|INFO|WARNING|ERROR (default INFO)"),
    tensor_parallel_size: Optional[int] = typer.Option(
        None, "--tensor-parallel-size", "-tp", help="ranks (devices) to split the model over; this node starts them"),
    enable_expert_parallel: Optional[bool] = typer.Option(
        None, "--enable-expert-parallel/--no-enable-expert-parallel", help="MoE: whole experts per rank"),
    rank_table: Optional[Path] = typer.Option(None, help="multi-node: the MindIE rank table (same file on every node)"),
    node_rank: Optional[int] = typer.Option(None, help="multi-node: this node's index in the rank table's server_list"),
    master_port: Optional[int] = typer.Option(None, help="multi-node: rank 0's rendezvous port (default 29500)"),
    dist_backend: Optional[str] = typer.Option(None, help="torch.distributed backend (default gloo/nccl/hccl by device)"),
    connect_timeout: Optional[float] = typer.Option(None, help="seconds for every rank to join and agree (120)"),
    step_timeout: Optional[float] = typer.Option(
        None, help="seconds before a dead or stalled rank fails the step, and a step stuck this long makes /health "
        "answer 503 (60)"),
    ssl_keyfile: Optional[str] = typer.Option(None, help="TLS: the server's private key (PEM)"),
    ssl_certfile: Optional[str] = typer.Option(None, help="TLS: the server's certificate chain (PEM)"),
    ssl_ca_certs: Optional[str] = typer.Option(None, help="TLS: CA certificates to verify clients with"),
    ssl_cert_reqs: Optional[int] = typer.Option(None, help="TLS client certificates: 0 none (default), 1 optional, "
                                                "2 required (with --ssl-ca-certs)"),
    audit_log: Optional[Path] = typer.Option(None, help="write one JSON line per request here (key names, never keys)"),
    audit_log_content: Optional[bool] = typer.Option(None, "--audit-log-content/--no-audit-log-content",
                                                     help="also write prompt and completion text to the audit log"),
    audit_log_max_bytes: Optional[str] = typer.Option(None, help="rotate the audit log past this size (100MiB)"),
    shutdown_timeout: Optional[float] = typer.Option(
        None, help="SIGTERM/SIGINT: seconds running requests get to finish before they are ended (30); a second "
        "signal exits at once"),
    max_messages: Optional[int] = typer.Option(None, help="chat messages per request (2048)"),
    max_prompt_chars: Optional[int] = typer.Option(None, help="characters of messages or prompts per request, "
                                                   "before templating (2000000)"),
    max_stop: Optional[int] = typer.Option(None, help="stop strings per request (16)"),
    max_stop_chars: Optional[int] = typer.Option(None, help="characters per stop string (256)"),
    max_prompts: Optional[int] = typer.Option(None, help="prompts per /v1/completions request (256)"),
    max_request_tokens: Optional[int] = typer.Option(None, help="tokens one request may generate in all: n x "
                                                     "max_tokens x prompts (262144)"),
    max_tokens_default: Optional[int] = typer.Option(None, help="max_tokens of a request that gives none (default: "
                                                     "what fits the context; 16 on /v1/completions)"),
):
    """Serve the OpenAI-compatible API (chat, completions, models, tokenize, health, metrics).

    With -tp N this process is rank 0 and starts N-1 more on this node. Multi-node: run the same command on
    every node with --rank-table and its own --node-rank (node 0 serves HTTP), or start it with torchrun."""
    from dsserve.config import load_toml
    from dsserve.server.launch import serve as run_server

    flags = {k: v for k, v in dict(
        dtype=dtype, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, kv_cache_memory=kv_cache_memory,
        enable_prefix_caching=enable_prefix_caching, num_threads=num_threads, max_queued_requests=max_queued_requests,
        stream_interval=stream_interval,
        reasoning_parser=reasoning_parser, strict_reasoning_history=strict_reasoning_history,
        chat_template=str(chat_template) if chat_template else None, max_input_len=max_input_len,
        truncate_input=truncate_input, served_model_name=served_model_name, api_key=api_key, model=model,
        host=host, port=port, log_level=log_level, tensor_parallel_size=tensor_parallel_size,
        enable_expert_parallel=enable_expert_parallel, rank_table=str(rank_table) if rank_table else None,
        node_rank=node_rank, master_port=master_port, dist_backend=dist_backend, connect_timeout=connect_timeout,
        step_timeout=step_timeout, api_key_file=str(api_key_file) if api_key_file else None, ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile, ssl_ca_certs=ssl_ca_certs, ssl_cert_reqs=ssl_cert_reqs,
        audit_log=str(audit_log) if audit_log else None, audit_log_content=audit_log_content,
        audit_log_max_bytes=audit_log_max_bytes, shutdown_timeout=shutdown_timeout, max_messages=max_messages,
        max_prompt_chars=max_prompt_chars, max_stop=max_stop, max_stop_chars=max_stop_chars, max_prompts=max_prompts,
        max_request_tokens=max_request_tokens, max_tokens_default=max_tokens_default,
    ).items() if v is not None and v != []}
    options = {**(load_toml(config) if config else {}), **flags}
    table_file, node = options.pop("rank_table", None), options.pop("node_rank", None)
    if table_file is not None:
        from dsserve.ranktable.ranktable import load, topology

        options["topology"] = topology(load(table_file), 0 if node is None else int(node))
    elif node is not None:
        raise typer.BadParameter("--node-rank needs --rank-table (or start the ranks with torchrun)")
    options["from_env"] = True  # torchrun's RANK / WORLD_SIZE / ... start a multi-rank deployment
    model_path = _resolve_model(options.pop("model", None))
    server_config = server_config_from(options, model_path)
    tls = {name: options.pop(name) for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs")
           if name in options}
    bind_host, bind_port = options.pop("host", "127.0.0.1"), int(options.pop("port", 8000))
    level = options.pop("log_level", "INFO")
    sys.exit(run_server(model_path, bind_host, bind_port, server_config, options, level, tls=tls))


def server_config_from(options: dict, model_path: str):
    """Pop the HTTP side's options (flags over the --config file) into a checked ServerConfig."""
    from dsserve.config import parse_memory
    from dsserve.server.app import ServerConfig
    from dsserve.server.keys import load_keys

    template_file = options.pop("chat_template", None)
    caps = {name: options.pop(name) for name in ("max_messages", "max_prompt_chars", "max_stop", "max_stop_chars",
                                                 "max_prompts", "max_request_tokens", "max_tokens_default")
            if name in options}
    for name, value in caps.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise typer.BadParameter(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
    shutdown_timeout = options.pop("shutdown_timeout", 30.0)
    if not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
        raise typer.BadParameter(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout!r}")
    audit_bytes = options.pop("audit_log_max_bytes", None)
    server_config = ServerConfig(
        served_model_name=options.pop("served_model_name", None) or _default_name(model_path),
        api_keys=load_keys(options.pop("api_key", None), options.pop("api_key_file", None)),
        max_queued_requests=options.pop("max_queued_requests", 1024),
        stream_interval=options.pop("stream_interval", 1),
        reasoning_parser=options.pop("reasoning_parser", "auto"),
        strict_reasoning_history=options.pop("strict_reasoning_history", False),
        chat_template=Path(template_file).read_text() if template_file else None,
        max_input_len=options.pop("max_input_len", None),
        truncate_input=options.pop("truncate_input", False),
        audit_log=options.pop("audit_log", None),
        audit_log_content=bool(options.pop("audit_log_content", False)),
        audit_log_max_bytes=parse_memory(audit_bytes) if audit_bytes is not None else 100 * 2**20,
        shutdown_timeout_s=float(shutdown_timeout),
        step_timeout_s=float(options.get("step_timeout") or 60.0),
        **caps,
    )
    interval = server_config.stream_interval
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise typer.BadParameter(f"--stream-interval must be a whole number of at least 1, got {interval!r}")
    if server_config.reasoning_parser not in ("auto", "deepseek_r1", "none"):
        raise typer.BadParameter("--reasoning-parser must be auto, deepseek_r1 or none")
    return server_config


def _default_name(model_path: str) -> str:
    return DEMO_SERVED_NAME if Path(model_path) == demo_model_dir() else Path(model_path).name


@app.command()
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
):
    """Chat in the terminal: the reasoning streams dimmed, then the answer. Pipe lines into it to script it."""
    from dsserve.chat import HTTPBackend, InProcessBackend, run_chat

    if url:
        backend = HTTPBackend(url, served_model, api_key)
    else:
        backend = InProcessBackend(_resolve_model(model), kv_cache_memory=kv_cache_memory)
    run_chat(backend, show_reasoning=not hide_reasoning, max_tokens=max_tokens, temperature=temperature, system=system)


def _bench_engine(model, dtype, weight_dtype, kv_cache_dtype, block_size, max_model_len, max_num_seqs,
                  max_num_batched_tokens,
                  kv_cache_memory, enable_prefix_caching, num_threads):
    from dsserve.engine.engine import LLMEngine

    return LLMEngine.from_options(_resolve_model(model), **_engine_options(
        dtype, weight_dtype, kv_cache_dtype, block_size, max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_memory,
        enable_prefix_caching, num_threads))


@bench_app.command("throughput")
def bench_throughput(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    num_prompts: int = typer.Option(64),
    input_len: int = typer.Option(128),
    output_len: int = typer.Option(128),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("auto"),
    weight_dtype: str = typer.Option("auto", help=WEIGHT_DTYPE_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=KV_CACHE_DTYPE_HELP),
    block_size: int = typer.Option(16),
    max_model_len: Optional[int] = typer.Option(None),
    max_num_seqs: int = typer.Option(256),
    max_num_batched_tokens: Optional[int] = typer.Option(None),
    kv_cache_memory: Optional[str] = typer.Option(None),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    num_threads: Optional[int] = typer.Option(None),
):
    """Offline throughput: random prompts of exact length, exactly output_len tokens each; prints tokens/s."""
    from dsserve.bench.throughput import run_throughput

    engine = _bench_engine(model, dtype, weight_dtype, kv_cache_dtype, block_size,
                           max_model_len or input_len + output_len + 8,
                           max_num_seqs, max_num_batched_tokens, kv_cache_memory, enable_prefix_caching, num_threads)
    r = run_throughput(engine, num_prompts, input_len, output_len, seed)
    print(f"Throughput: {r.requests_per_s:.2f} requests/s, {r.total_tokens_per_s:.1f} total tokens/s, "
          f"{r.output_tokens_per_s:.1f} output tokens/s ({r.num_prompts} prompts x {r.input_len} in / "
          f"{r.output_len} out in {r.elapsed_s:.2f} s; dtype {engine.config.dtype}, "
          f"weights {engine.config.weight_dtype}, KV cache {engine.config.kv_cache_dtype}, "
          f"{engine.config.num_threads} threads)")


@bench_app.command("perf")
def bench_perf(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    cases: str = typer.Option("[[256,256]]", help="[[in, out], ...] as MindIE writes them"),
    batch_size: int = typer.Option(16, help="requests per batch"),
    batch_sizes: Optional[str] = typer.Option(None, help="a sweep, e.g. 1,4,16,64 (overrides --batch-size)"),
    output: Optional[Path] = typer.Option(None, help="CSV path; default performance_pa_batch{bs}_tp1_result.csv here"),
    plot: Optional[Path] = typer.Option(None, help="also plot throughput and per-token latency (needs matplotlib)"),
    dtype: str = typer.Option("auto"),
    weight_dtype: str = typer.Option("auto", help=WEIGHT_DTYPE_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=KV_CACHE_DTYPE_HELP),
    block_size: int = typer.Option(128, help="MindIE's cacheBlockSize default"),
    kv_cache_memory: Optional[str] = typer.Option(None),
    num_threads: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
):
    """MindIE's performance table: exact input/output lengths, first and non-first token times, throughputs."""
    from rich.table import Table

    from dsserve.bench.timing import MINDIE_COLUMNS, MindieRow, mindie_csv, time_batch

    try:
        pairs = [tuple(int(x) for x in pair) for pair in json.loads(cases)]
        sizes = [int(b) for b in batch_sizes.split(",")] if batch_sizes else [batch_size]
    except (ValueError, TypeError):
        raise typer.BadParameter("--cases is [[in, out], ...] and --batch-sizes is comma-separated integers") from None
    longest = max(i + o for i, o in pairs)
    engine = _bench_engine(model, dtype, weight_dtype, kv_cache_dtype, block_size, longest + 8, max(sizes),
                           max(max(sizes) * max(i for i, _ in pairs), 2048), kv_cache_memory, False, num_threads)
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
    import asyncio

    import httpx
    from rich.progress import Progress

    from dsserve.bench import serve as online
    from dsserve.bench.timing import MindieRow, mindie_csv

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
def bench_latency(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    batch_size: int = typer.Option(8),
    input_len: int = typer.Option(128),
    output_len: int = typer.Option(128),
    dtype: str = typer.Option("auto"),
    weight_dtype: str = typer.Option("auto", help=WEIGHT_DTYPE_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=KV_CACHE_DTYPE_HELP),
    num_threads: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    profile: bool = typer.Option(False, "--profile", help="also print where a decode step's time goes"),
):
    """One batch: prefill time and the distribution of decode-step times (--profile: and their breakdown)."""
    from dsserve.bench.timing import time_batch
    from dsserve.profiling import profile_rows

    engine = _bench_engine(model, dtype, weight_dtype, kv_cache_dtype, 16, input_len + output_len + 8, batch_size,
                           max(batch_size * input_len, 2048), None, False, num_threads)
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


@app.command()
def plan(
    model: str = typer.Argument(..., help="checkpoint folder, config.json, or a preset: deepseek-r1, deepseek-v3, "
                                          "deepseek-v2, deepseek-v2-lite, r1-distill-{qwen-1.5b,qwen-7b,qwen-14b,"
                                          "qwen-32b,llama-8b,llama-70b}"),
    device: str = typer.Option("910b-64g", help="h100-80g|h800-80g|h200-141g|a100-40g|a100-80g|rtx4090-24g|910b-64g|cpu"),
    devices_per_node: int = typer.Option(8),
    dtype: str = typer.Option("bf16", help="weights: bf16|fp8|w8a8|int4"),
    max_model_len: int = typer.Option(4096, help="tokens per sequence (prompt + output)"),
    concurrency: int = typer.Option(1, help="sequences of max_model_len that must fit at once"),
    memory_fraction: float = typer.Option(0.9, help="share of each device's memory dsserve may use"),
    as_json: bool = typer.Option(False, "--json"),
):
    """How many devices and nodes a model needs, memory per device, and how many sequences fit."""
    from dsserve.plan.planner import plan as make_plan

    p = make_plan(model, device, devices_per_node, dtype, max_model_len, concurrency, memory_fraction)
    if as_json:
        print(p.to_json())
        raise typer.Exit(0 if p.fits else 1)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold]{p.model}[/bold]: {p.params_total / 1e9:.2f}B parameters ({p.params_active / 1e9:.2f}B active per "
              f"token); {p.dtype} weights {p.weight_gib:.1f} GiB; KV cache {p.kv_bytes_per_token / 1024:.1f} KiB per token "
              f"(BF16, per device)")
    for reason in p.reasons:
        out.print(f"[dim]  not {reason}[/dim]")
    if p.fits:
        out.print(f"[green]fits[/green] on {p.devices} x {p.device} ({p.nodes} node(s) of {devices_per_node}): "
                  f"{p.weight_gib_per_device:.1f} GiB weights + {p.kv_gib_per_device:.1f} GiB KV per device of "
                  f"{p.device_memory_gib:.1f} GiB; up to {p.max_concurrent_sequences} concurrent sequences of "
                  f"{p.max_model_len} tokens")
        out.print(f"launch: {p.launch}")
    if p.dtype != "bf16":
        out.print(f"[yellow]note[/yellow]: dsserve's engine dequantizes {p.dtype} weights to BF16 when it loads them; "
                  "these figures are for an engine that keeps them quantized. For a dsserve deployment, plan with "
                  "--dtype bf16.")
    if not p.fits:
        out.print(f"[bold red]does not fit[/bold red] on up to 64 nodes of {devices_per_node} x {p.device}, because "
                  + (p.reasons[-1] if p.reasons else "no device count is valid"))
    raise typer.Exit(0 if p.fits else 1)


config_app = typer.Typer(no_args_is_help=True, help="Configuration files.")
app.add_typer(config_app, name="config")


@config_app.command("import-mindie")
def config_import_mindie(path: Path = typer.Argument(..., help="MindIE's config.json")):
    """Print a `dsserve serve --config` TOML for a MindIE service config, with the fields that have no equivalent."""
    from dsserve.config import import_mindie, to_toml

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DsserveError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DsserveError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    options, notes = import_mindie(data, path)  # the path: MindIE reads relative TLS paths from its install folder
    print(to_toml(options, notes), end="")


@app.command()
def doctor(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint folder to verify and size"),
    config: Optional[Path] = typer.Option(None, "--config", help="the TOML you give `dsserve serve --config`"),
    port: Optional[int] = typer.Option(None, help="port to check (default: the config's, else 8000)"),
    rank_table: Optional[Path] = typer.Option(None, help="rank table to validate"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key to check (overrides the config's)"),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) to check (overrides the config's)"),
    ssl_ca_certs: Optional[Path] = typer.Option(None, help="CA bundle for client certificates (overrides the config)"),
):
    """A pass/fail checklist: Python and torch, devices, the model folder, whether it fits, port, TLS files, API
    keys and network exposure, rank table, logs."""
    from rich.markup import escape

    from dsserve.doctor.checks import run_checks

    def text(path: Optional[Path]) -> Optional[str]:
        return str(path) if path else None

    lines = run_checks(model, text(config), port, text(rank_table), ssl_keyfile=text(ssl_keyfile),
                       ssl_certfile=text(ssl_certfile), ssl_ca_certs=text(ssl_ca_certs))
    out = Console(highlight=False, soft_wrap=True)
    for ok, message in lines:
        mark = {True: "[green]PASS[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]INFO[/dim]"}[ok]
        out.print(f"{mark} {escape(message)}")  # messages quote paths and `[[keys]]`, not markup
    failed = sum(ok is False for ok, _ in lines)
    out.print("[green]all checks passed[/green]" if not failed else f"[bold red]{failed} check(s) failed[/bold red]")
    raise typer.Exit(1 if failed else 0)


@ranktable_app.command("generate")
def ranktable_generate(
    nodes: str = typer.Option(..., help="node IPs, comma-separated, the master first"),
    devices_per_node: int = typer.Option(8),
    device_ips: Optional[Path] = typer.Option(None, help="lines `NODE_IP CARD0_IP CARD1_IP ...` (hccn_tool's card IPs)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write here instead of stdout"),
):
    """Write a rank table: device ids local per node, rank ids global and contiguous, the master first."""
    from dsserve.ranktable.ranktable import generate, read_device_ips

    ips = read_device_ips(device_ips) if device_ips else None
    if ips is None:
        console.print("[yellow]no --device-ips: card IPs are set to the node IPs (enough for dsserve and torchrun; "
                      "MindIE needs the real card IPs)[/yellow]")
    text = json.dumps(generate([n.strip() for n in nodes.split(",") if n.strip()], devices_per_node, ips), indent=2)
    if output:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")
    else:
        print(text)


@ranktable_app.command("validate")
def ranktable_validate(path: Path = typer.Argument(..., help="rank table JSON")):
    """Check a rank table; print every error with its location; exit 1 if any."""
    from dsserve.ranktable.ranktable import load, validate

    errors = validate(load(path))
    out = Console(highlight=False, soft_wrap=True)
    for error in errors:
        out.print(f"[bold red]error[/bold red] {path}: {error}")
    if not errors:
        out.print(f"[green]valid[/green]: {path}")
    raise typer.Exit(1 if errors else 0)


@ranktable_app.command("env")
def ranktable_env(
    path: Path = typer.Argument(..., help="rank table JSON"),
    node: str = typer.Option(..., help="this node's IP (server_id or container_ip)"),
    master_port: int = typer.Option(29500),
):
    """The torch.distributed environment (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK) of each process here."""
    from dsserve.ranktable.ranktable import environment, load

    for variables in environment(load(path), node, master_port):
        print(" ".join(f"{k}={v}" for k, v in variables.items()))


@weights_app.command("verify")
def weights_verify(
    path: Path = typer.Argument(..., help="checkpoint folder"),
    manifest: Optional[Path] = typer.Option(None, help="check files against this sha256 manifest"),
    write_manifest: bool = typer.Option(False, help="write dsserve-manifest.json (sha256 of every file) into PATH"),
):
    """Check every shard, tensor, permission, symlink, the tokenizer and config.json; exit 1 on any failure."""
    from dsserve.weights.verify import verify

    report = verify(path, manifest, write_manifest)
    out = Console(highlight=False)
    for ok, message in report.lines:
        mark = {True: "[green]PASS[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]INFO[/dim]"}[ok]
        out.print(f"{mark} {message}")
    out.print("[green]verified[/green]" if report.passed else f"[bold red]{len(report.failures)} problem(s)[/bold red]")
    raise typer.Exit(0 if report.passed else 1)


@weights_app.command("convert")
def weights_convert(
    path: Path = typer.Argument(..., help="FP8 checkpoint folder (DeepSeek-V3/R1 as published)"),
    out: Path = typer.Argument(..., help="output folder (must not exist; OUT.partial holds work in progress)"),
    to: str = typer.Option("bf16", help="target dtype: bf16"),
):
    """FP8 block-wise -> BF16 on the CPU, shard by shard; resumable; the output appears only when complete."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from dsserve.weights.convert import convert_to_bf16

    if to not in ("bf16", "bfloat16"):
        raise typer.BadParameter("only --to bf16 is supported")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("converting", total=None)

        def progress(shard: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=shard)

        result = convert_to_bf16(path, out, progress)
    console.print(f"wrote {result}")


@app.command("eval")
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
    kv_cache_memory: Optional[str] = typer.Option(None),
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
        if not model:
            raise typer.BadParameter("with --base-url, --model names the served model")
        backend = HTTPBackend(base_url, model, api_key, concurrency, max_retries)
    else:
        from dsserve.llm import LLM

        backend = InProcessBackend(LLM(_resolve_model(model), kv_cache_memory=kv_cache_memory))
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        app()
    except DsserveError as e:
        from rich.markup import escape

        # soft_wrap: long paths stay whole for copy and paste (the terminal wraps them)
        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
