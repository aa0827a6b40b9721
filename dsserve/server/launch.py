"""Start `dsserve serve`: logs to stderr and a rotating file, load the engine, serve, exit non-zero if it dies."""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import threading
import time
from pathlib import Path

import uvicorn

from dsserve.assets import DEMO_SERVED_NAME, demo_model_dir
from dsserve.config import ApiKey, is_loopback, log_dir, parse_memory
from dsserve.engine.async_engine import AsyncEngine
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.errors import ConfigError, ShuttingDownError
from dsserve.options import ServerArgs
from dsserve.reasoning import r1
from dsserve.runner.model_runner import freeze_startup_heap
from dsserve.server.app import create_app
from dsserve.server.direct import expose_send
from dsserve.server.keys import load_keys
from dsserve.server.state import ServerConfig
from dsserve.tool_parsers import detect_format
from dsserve.tool_parsers.deepseek import DSML

logger = logging.getLogger("dsserve")
TLS_OPTIONS = ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs")  # uvicorn's names (and vLLM's flags)


def setup_logging(port: int, level: str = "INFO") -> Path:
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dsserve-{port}.log"
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    for handler in (logging.StreamHandler(), logging.handlers.RotatingFileHandler(path, maxBytes=20 * 2**20, backupCount=5)):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    return path


def serve(model: str, args: ServerArgs, engine_options: dict) -> int:
    """Run until stopped; returns the process exit code (0 after a drain, 1 when the engine died).

    `engine_options`: options.EngineArgs fields as given (flags over the --config file)."""
    tls = _check_tls({name: getattr(args, name) for name in TLS_OPTIONS})
    api_keys = load_keys(args.api_key, args.api_key_file)  # before the model loads: a bad key file fails at once
    chat_template = _read_template(args.chat_template)
    log_path = setup_logging(args.port, args.log_level)
    logger.info("log file: %s", log_path)
    config = build_engine_config(model, **engine_options, **_parallel_options(args))
    if config.parallel.rank != 0:
        # A rank table's other nodes and torchrun's other ranks: compute only; rank 0 serves HTTP.
        from dsserve.runner.worker import run_worker

        logger.info("rank %d of %d (node %d): compute only; rank 0 at %s:%d serves HTTP", config.parallel.rank,
                    config.parallel.world_size, config.parallel.node_rank, config.parallel.master_addr,
                    config.parallel.master_port)
        return run_worker(config)
    engine = LLMEngine(config)
    config = engine.config  # max_model_len fitted to the KV cache
    server_config = server_config_from(args, model, api_keys, chat_template, engine.tokenizer,
                                       config.parallel.step_timeout_s)
    host, port = args.host, args.port
    _print_config(config, server_config, host, port, log_path)
    _inject_fault(engine)
    server: uvicorn.Server | None = None
    died = threading.Event()

    def on_death(error: BaseException) -> None:
        logger.error("engine died (%r): answering 503 on /health and shutting down", error)
        died.set()
        if server is not None:
            server.should_exit = True

    profiling = bool(os.environ.get("DSSERVE_PROFILE"))
    if profiling:  # where the serving steps' time goes, logged at exit (as `bench latency --profile` prints)
        from dsserve.profiling import PROFILER

        PROFILER.start()
    async_engine = AsyncEngine(engine, on_death=on_death, stream_interval=server_config.stream_interval)
    fastapi_app = create_app(async_engine, server_config)
    state = fastapi_app.state.dsserve
    # After the drain every request has ended; what is left are idle keep-alive connections.
    server = uvicorn.Server(uvicorn.Config(expose_send(fastapi_app), host=host, port=port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=2, **tls))
    url = f"{'https' if tls else 'http'}://{_url_host(host)}:{port}"
    if not server_config.api_keys and not is_loopback(host):
        logger.warning("listening on %s with no API key: anyone who can reach this address can use the server; set "
                       "--api-key-file (or --api-key), or bind 127.0.0.1 behind a proxy that authenticates", host)

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            logger.info("dsserve ready at %s", url)
            print(f"dsserve ready at {url}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    parent = os.environ.get("DSSERVE_PARENT_PID")
    if parent:  # a supervisor (or a test) that wants the server gone when it is gone
        threading.Thread(target=_exit_with_parent, args=(int(parent), server), daemon=True).start()

    signals = []

    def stop(signum, _frame) -> None:
        signals.append(signum)
        if len(signals) > 1:  # a second signal: no more waiting
            logger.warning("second signal (%s): exiting now", signal.Signals(signum).name)
            os._exit(1)
        logger.info("%s: draining (new requests get 503; running ones have %g s to finish; a second signal exits "
                    "at once)", signal.Signals(signum).name, server_config.shutdown_timeout_s)
        threading.Thread(target=_drain, args=(state, async_engine, server, server_config.shutdown_timeout_s),
                         name="dsserve-drain", daemon=True).start()

    def serve_http() -> None:
        try:
            server.run()
        finally:
            async_engine.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    http = threading.Thread(target=serve_http, name="dsserve-http")
    # The engine thread and the HTTP thread share the GIL at Python's default 5 ms switch interval. (It was 0.5 ms
    # while every chunk woke its handler and each step's burst of writes held the GIL for milliseconds; with a step's
    # chunks written from one callback (server/direct.py) the shorter interval only interrupts the engine's Python:
    # 1-2% slower at 64 streams, docs/benchmarks.md.)
    freeze_startup_heap()
    http.start()
    try:
        async_engine.run()  # on this thread, which loaded the model: see AsyncEngine.run
    finally:
        server.should_exit = True
        http.join()
        engine.shutdown()
        if profiling:
            _log_profile()
    if died.is_set():
        return 1
    return 0 if server.started else 1


def _drain(state, async_engine: AsyncEngine, server: uvicorn.Server, timeout_s: float) -> None:
    """Stop admitting (Guard answers 503, /health 503), let running requests finish for `timeout_s`, end the rest
    with an error (streams: an error event, then [DONE]), then stop the HTTP server (the engine loop follows)."""
    state.draining = True
    deadline = time.monotonic() + timeout_s
    while state.open_requests > 0 and time.monotonic() < deadline and not server.should_exit:
        time.sleep(0.05)
    if state.open_requests > 0:
        ended = async_engine.end_all(ShuttingDownError(
            f"The server is shutting down and its shutdown timeout ({timeout_s:g} s) has passed; this request was "
            "ended before it finished. Retry it on another replica."))
        logger.warning("shutdown timeout (%g s) passed: ended %d running request(s)", timeout_s, ended)
        deadline = time.monotonic() + 5.0
        while state.open_requests > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    logger.info("drained: stopping")
    server.should_exit = True


def _check_tls(tls: dict) -> dict:
    """uvicorn's TLS options, refusing half a configuration (which would serve plain HTTP or fail late)."""
    tls = {k: v for k, v in tls.items() if v is not None}
    if not tls:
        return {}
    if not (tls.get("ssl_keyfile") and tls.get("ssl_certfile")):
        raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile (the other TLS options need them too); "
                          "`dsserve doctor --config FILE` checks the files")
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        if name in tls and not os.access(tls[name], os.R_OK):
            raise ConfigError(f"--{name.replace('_', '-')} {tls[name]} cannot be read")
    reqs = tls.get("ssl_cert_reqs")
    if reqs is not None and reqs not in (0, 1, 2):
        raise ConfigError(f"--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), got {reqs!r}")
    if reqs in (1, 2) and not tls.get("ssl_ca_certs"):
        raise ConfigError("--ssl-cert-reqs 1 or 2 verifies client certificates: give the CA with --ssl-ca-certs")
    return tls


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def asgi_app(async_engine: AsyncEngine, server_config: ServerConfig):
    """The app uvicorn serves: the FastAPI app, with the server's own `send` in each scope so that streams can write
    a step's chunks from the callback that delivers it (server/direct.py)."""
    return expose_send(create_app(async_engine, server_config))


def server_config_from(args: ServerArgs, model_path: str, api_keys: tuple[ApiKey, ...], chat_template: str | None,
                       tokenizer, step_timeout_s: float) -> ServerConfig:
    """The frozen ServerConfig of `dsserve serve`'s options, with "auto" resolved against the loaded tokenizer."""
    tool_call_parser = resolve_tool_call_parser(args.tool_call_parser, tokenizer, chat_template)
    return ServerConfig(
        served_model_name=args.served_model_name or default_served_name(model_path),
        api_keys=api_keys,
        max_queued_requests=args.max_queued_requests,
        stream_interval=args.stream_interval,
        direct_writes=args.direct_writes,
        reasoning_parser=resolve_reasoning_parser(args.reasoning_parser, tokenizer, chat_template),
        tool_call_parser=tool_call_parser,
        chat_encoder=resolve_chat_encoder(tool_call_parser, tokenizer, chat_template),
        strict_reasoning_history=args.strict_reasoning_history,
        chat_template=chat_template,
        max_input_len=args.max_input_len,
        truncate_input=args.truncate_input,
        audit_log=args.audit_log,
        audit_log_content=bool(args.audit_log_content),
        audit_log_max_bytes=parse_memory(args.audit_log_max_bytes),
        shutdown_timeout_s=float(args.shutdown_timeout),
        step_timeout_s=step_timeout_s,
        max_messages=args.max_messages,
        max_prompt_chars=args.max_prompt_chars,
        max_stop=args.max_stop,
        max_stop_chars=args.max_stop_chars,
        max_prompts=args.max_prompts,
        max_request_tokens=args.max_request_tokens,
        max_tokens_default=args.max_tokens_default,
    )


def resolve_reasoning_parser(requested: str, tokenizer, chat_template: str | None = None) -> str:
    """`auto`: deepseek_r1 when the chat template or the vocabulary has R1's `</think>`, else none."""
    if requested != "auto":
        return requested
    return "deepseek_r1" if r1.uses_think(tokenizer, chat_template) else "none"


def resolve_tool_call_parser(requested: str, tokenizer, chat_template: str | None = None) -> str:
    """`auto`: the DeepSeek format the chat template writes assistant tool calls in, else none."""
    if requested != "auto":
        return requested
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    if template is None and tokenizer is not None and tokenizer.token_to_id(DSML) is not None:
        return "deepseek_v32"  # V3.2 ships no template; its vocabulary has the ｜DSML｜ token
    return detect_format(template) or "none"


def resolve_chat_encoder(tool_call_parser: str, tokenizer, chat_template: str | None = None) -> str | None:
    """V3.2's Python encoder (server/encoding_dsv32.py) for a checkpoint in its format that ships no chat template."""
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    return "deepseek_v32" if template is None and tool_call_parser == "deepseek_v32" else None


def default_served_name(model_path: str) -> str:
    return DEMO_SERVED_NAME if Path(model_path) == demo_model_dir() else Path(model_path).name


def _parallel_options(args: ServerArgs) -> dict:
    """The engine's parallel options a server adds: a rank table's topology, and torchrun's RANK / WORLD_SIZE / ...
    (`from_env`) starting a multi-rank deployment."""
    if args.rank_table is None:
        return {"from_env": True}
    from dsserve.mindie.ranktable import load, topology

    return {"from_env": True, "topology": topology(load(args.rank_table), args.node_rank or 0)}


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--chat-template {path} cannot be read ({e.strerror})") from None


def _print_config(config, server_config: ServerConfig, host: str, port: int, log_path: Path) -> None:
    m, c, s = config.model, config.cache, config.scheduler
    lines = [
        f"model: {m.path} ({m.model_type}, {m.num_hidden_layers} layers, vocab {m.vocab_size}"
        + (f", FP8 blocks {m.fp8_block_size}" if m.fp8_block_size else "")
        + (f", quantized checkpoint: {m.quantization_config['quant_method']} as {config.checkpoint_quantization}"
           if config.checkpoint_quantization else "") + ")",
        f"served model name: {server_config.served_model_name}",
        f"device: {config.device}, dtype: {config.dtype}, weights: {config.weight_dtype}, threads: {config.num_threads}"
        + (f", tensor parallel: {config.parallel.world_size} ranks"
           + (" (expert parallel)" if config.parallel.enable_expert_parallel else "") if config.parallel.enabled else ""),
        f"max_model_len: {s.max_model_len}, max_num_seqs: {s.max_num_seqs}, "
        f"max_num_batched_tokens: {s.max_num_batched_tokens}, chunked prefill: {s.enable_chunked_prefill}",
        f"block_size: {c.block_size}, prefix caching: {c.enable_prefix_caching}, "
        f"kv_cache_memory: {c.kv_cache_memory or f'{c.kv_cache_fraction:.0%} of free memory'}",
        f"api keys: {len(server_config.api_keys) or 'none'}, audit log: {server_config.audit_log or 'off'}"
        f"{' (with content)' if server_config.audit_log_content else ''}, shutdown timeout: "
        f"{server_config.shutdown_timeout_s:g} s, "
        f"max queued requests: {server_config.max_queued_requests}, stream interval: {server_config.stream_interval}",
        f"listen: {host}:{port}",
        f"log file: {log_path}",
    ]
    for line in lines:
        logger.info("config: %s", line)


def _log_profile() -> None:
    from dsserve.profiling import PROFILER, profile_rows

    PROFILER.stop()
    logger.info("profile of %d engine steps (DSSERVE_PROFILE): %s", PROFILER.steps, "; ".join(
        f"{label.strip()} {ms:.2f} ms ({share:.0%})" for label, ms, share in profile_rows()))


def _exit_with_parent(pid: int, server: uvicorn.Server) -> None:
    while not server.should_exit:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.warning("parent process %d is gone: shutting down", pid)
            server.should_exit = True
            return
        time.sleep(1.0)


def _inject_fault(engine: LLMEngine) -> None:
    """Fault injection, how the tests prove what a failure does to the server:
    DSSERVE_FAULT_AFTER_STEPS=N makes step N+1 raise (the engine dies, the process exits non-zero);
    DSSERVE_FAULT_STEP_DELAY_S=S makes every step take S seconds longer (long streams, a stalled engine)."""
    steps = os.environ.get("DSSERVE_FAULT_AFTER_STEPS")
    delay_s = float(os.environ.get("DSSERVE_FAULT_STEP_DELAY_S") or 0)
    if not steps and not delay_s:
        return
    remaining = [int(steps)] if steps else None
    real_step = engine.step

    def faulty_step():
        if remaining is not None:
            if remaining[0] <= 0:
                raise RuntimeError("injected engine fault (DSSERVE_FAULT_AFTER_STEPS)")
            remaining[0] -= 1
        if delay_s:
            time.sleep(delay_s)
        return real_step()

    engine.step = faulty_step
    logger.warning("fault injection on: %s", f"the engine fails after {steps} steps" if steps else
                   f"every step takes {delay_s:g} s longer")
