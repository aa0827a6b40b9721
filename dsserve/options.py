"""Every option of the engine and the server, declared once: CLI flags, `--config` TOML keys and `LLM(**options)`
derive from these fields.

A field's metadata says where the option shows: `cli` (a flag of the commands that take it) and `config` (a TOML
key and an `LLM` keyword; False only for what the code itself passes, e.g. a rank table's topology). Values stay
unresolved here ("auto", None); engine/engine.py's `build_engine_config` resolves `EngineArgs` into the frozen
`EngineConfig`, server/launch.py resolves `ServerArgs` into the frozen `ServerConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsserve.config import DTYPE_NAMES, WEIGHT_DTYPE_NAMES
from dsserve.errors import ConfigError

BACKEND_NAMES = ("auto", "cpu", "torch")
REASONING_PARSER_NAMES = ("auto", "deepseek_r1", "none")
TOOL_CALL_PARSER_NAMES = ("auto", "deepseek_v3", "deepseek_v31", "deepseek_v32", "none")


def option(default: Any, help: str = "", *, cli: bool = True, config: bool = True, short: str | None = None,
           envvar: str | None = None, cli_type: Any = None) -> Any:
    """A field of EngineArgs / ServerArgs. `cli_type`: the flag's type where the field's is a union (a memory size
    is `str | int`: the flag takes the string)."""
    return field(default=default, metadata=dict(help=help, cli=cli, config=config, short=short, envvar=envvar,
                                                cli_type=cli_type))


@dataclass(frozen=True)
class EngineArgs:
    """The engine's options as given (unresolved): `LLM(model, **options)`, `dsserve generate|serve|bench` flags,
    the TOML keys of `dsserve serve --config`."""

    dtype: str = option("auto", "compute dtype: " + "|".join(DTYPE_NAMES))
    weight_dtype: str = option(
        "auto", "CPU, float32 compute: how linear weights are stored, " + "|".join(WEIGHT_DTYPE_NAMES) + " (16-bit "
        "halves the bytes each token reads; bfloat16 runs batched matmuls on AMX tiles where the CPU has them; auto: "
        "bfloat16 for a bf16 checkpoint on such a CPU, else float16 for a 16-bit checkpoint, float32 for a float32 one)")
    kv_cache_dtype: str = option(
        "auto", "auto (the compute dtype) or, on CPU with float32 compute, float16: half the KV cache's memory and of "
        "the bytes decode attention reads (llama.cpp's default f16 cache)")
    quantization: str | None = option(
        None, "quantize the linear weights as they load (vLLM's flag): int8 (per output channel, W8A16) or int4 "
        "(group 32, symmetric; int4-g64 / int4-g128 for larger groups, a -zp suffix for zero points); the LM head "
        "goes int8 either way. CPU backend, float32 compute (docs/quantization.md)")
    backend: str = option(
        "auto", "kernels: cpu = dsserve's C kernels with packed weights, torch = the plain-torch reference (slower); "
        "auto = cpu on a CPU device")
    device: str | None = option(None, "cpu or cuda; default cuda when available", cli=False)
    block_size: int = option(16, "tokens per KV cache block (MindIE's cacheBlockSize is 128)")
    kv_cache_memory: str | int | None = option(None, "KV cache size, e.g. 4GiB; default a share of free memory",
                                               cli_type=str)
    kv_cache_fraction: float = option(0.5, "share of free memory the KV cache takes without --kv-cache-memory",
                                      cli=False)
    num_kv_blocks: int | None = option(None, "exact KV block count (tests force preemption with it)", cli=False)
    enable_prefix_caching: bool = option(True, "share the KV blocks of common prompt prefixes")
    max_num_seqs: int = option(256, "requests in one engine step")
    max_num_batched_tokens: int | None = option(None, "tokens computed in one step; default 2048")
    max_model_len: int | None = option(
        None, "prompt + output tokens per request; default the model's context, lowered to what the KV cache holds")
    enable_chunked_prefill: bool = option(True, "split long prompts over steps", cli=False)
    num_threads: int | None = option(None, "torch threads on CPU; default all cores given")
    seed: int = option(0, "seed of unseeded sampling", cli=False)
    tokenizer: str | None = option(None, "folder with tokenizer.json; default the model folder", cli=False)
    tensor_parallel_size: int | None = option(None, "ranks (devices) to split the model over; this node starts them",
                                              short="-tp")
    enable_expert_parallel: bool = option(False, "MoE: whole experts per rank")
    master_port: int | None = option(None, "multi-node: rank 0's rendezvous port (default 29500)")
    dist_backend: str | None = option(None, "torch.distributed backend (default gloo/nccl/hccl by device)")
    connect_timeout: float = option(120.0, "seconds for every rank to join and agree")
    step_timeout: float = option(
        60.0, "seconds before a dead or stalled rank fails the step, and a step stuck this long makes /health "
        "answer 503")
    # Passed by the code, not by an operator: a rank table's ranks (server/launch.py), torchrun's variables.
    topology: dict[str, Any] | None = option(None, cli=False, config=False)
    from_env: bool = option(False, cli=False, config=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKEND_NAMES)}")

    @classmethod
    def from_options(cls, options: dict[str, Any], where: str = "engine option") -> "EngineArgs":
        check_option_names(options, names(cls, config_only=False), where)
        return cls(**options)


@dataclass(frozen=True)
class ServerArgs:
    """`dsserve serve`'s HTTP-side options as given, checked; server/launch.py turns them into a ServerConfig."""

    model: str | None = option(None, "checkpoint folder; default: the built-in demo model", cli=False)
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 exposes it)")
    port: int = option(8000, "port to listen on")
    served_model_name: str | None = option(None, "the `model` clients send; default the folder name")
    api_key: str | list[str] | None = option(
        None, "require `Authorization: Bearer KEY`; repeat for several keys (a key given here shows in `ps`: prefer "
        "--api-key-file or the DSSERVE_API_KEY variable)", envvar="DSSERVE_API_KEY", cli_type=list[str])
    api_key_file: str | None = option(
        None, "TOML with [[keys]] tables: name, key, optional requests_per_minute and max_concurrent")
    max_queued_requests: int = option(1024, "beyond max_num_seqs + this, requests get 503")
    stream_interval: int = option(
        1, "engine steps between a stream's chunks (1: every token; the first token and the end are always sent at "
        "once); larger sends fewer, bigger chunks, for less HTTP work per token")
    direct_writes: bool = option(
        True, "write streamed chunks straight to uvicorn's transport (faster); --no-direct-writes streams through "
        "plain ASGI")
    reasoning_parser: str = option("auto", "|".join(REASONING_PARSER_NAMES) + " (auto: deepseek_r1 when the "
                                   "tokenizer knows R1's </think>)")
    tool_call_parser: str = option("auto", "|".join(TOOL_CALL_PARSER_NAMES) + " (auto: the format the chat template "
                                   "writes tool calls in; none: requests with tools get 400)")
    strict_reasoning_history: bool = option(
        False, "reject reasoning_content in input messages with 400, as DeepSeek's API does (default: drop it)")
    chat_template: str | None = option(None, "a Jinja file replacing the tokenizer's chat template")
    max_input_len: int | None = option(None, "longest prompt accepted (MindIE maxInputTokenLen)")
    truncate_input: bool = option(False, "cut longer prompts to --max-input-len instead of refusing")
    log_level: str = option("INFO", "DEBUG|INFO|WARNING|ERROR")
    rank_table: str | None = option(None, "multi-node: the MindIE rank table (same file on every node)")
    node_rank: int | None = option(None, "multi-node: this node's index in the rank table's server_list")
    # exposure: TLS, keys, audit, drain (docs/serving.md "Running it on a network")
    ssl_keyfile: str | None = option(None, "TLS: the server's private key (PEM)")
    ssl_certfile: str | None = option(None, "TLS: the server's certificate chain (PEM)")
    ssl_ca_certs: str | None = option(None, "TLS: CA certificates to verify clients with")
    ssl_cert_reqs: int | None = option(None, "TLS client certificates: 0 none (default), 1 optional, 2 required "
                                       "(with --ssl-ca-certs)")
    audit_log: str | None = option(None, "write one JSON line per request here (key names, never keys)")
    audit_log_content: bool = option(False, "also write prompt and completion text to the audit log")
    audit_log_max_bytes: str | int = option("100MiB", "rotate the audit log past this size", cli_type=str)
    shutdown_timeout: float = option(
        30.0, "SIGTERM/SIGINT: seconds running requests get to finish before they are ended; a second signal exits "
        "at once")
    # per-request caps
    max_messages: int = option(2048, "chat messages per request")
    max_prompt_chars: int = option(2_000_000, "characters of messages or prompts per request, before templating")
    max_stop: int = option(16, "stop strings per request")
    max_stop_chars: int = option(256, "characters per stop string")
    max_prompts: int = option(256, "prompts per /v1/completions request")
    max_request_tokens: int = option(262_144, "tokens one request may generate in all: n x max_tokens x prompts")
    max_tokens_default: int | None = option(
        None, "max_tokens of a request that gives none (default: what fits the context; 16 on /v1/completions)")

    def __post_init__(self) -> None:
        for name in ("max_messages", "max_prompt_chars", "max_stop", "max_stop_chars", "max_prompts",
                     "max_request_tokens", "max_tokens_default", "stream_interval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"--{_flag(name)} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.shutdown_timeout, (int, float)) or self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout!r}")
        if self.reasoning_parser not in REASONING_PARSER_NAMES:
            raise ConfigError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSER_NAMES)}, got "
                              f"{self.reasoning_parser!r}")
        if self.tool_call_parser not in TOOL_CALL_PARSER_NAMES:
            raise ConfigError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSER_NAMES)}, got "
                              f"{self.tool_call_parser!r}")
        if self.node_rank is not None and self.rank_table is None:
            raise ConfigError("--node-rank needs --rank-table (or start the ranks with torchrun)")

    @classmethod
    def from_options(cls, options: dict[str, Any], where: str = "server option") -> "ServerArgs":
        check_option_names(options, names(cls), where)
        return cls(**options)


def names(cls: type, *, config_only: bool = True, cli_only: bool = False) -> tuple[str, ...]:
    """The option names of EngineArgs or ServerArgs: TOML keys (config_only), or flags (cli_only)."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if (f.metadata["config"] or not config_only) and (f.metadata["cli"] or not cli_only))


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, its flag's type) of every CLI-visible option: where the commands build their flags from."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata["cli"]:
            kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
            out.append((f, f.metadata["cli_type"] or kinds[0]))
    return out


def split_options(options: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`dsserve serve`'s options (TOML keys or flags) -> (engine options, server options); unknown ones are an error."""
    engine_names = names(EngineArgs)
    check_option_names(options, engine_names + names(ServerArgs), where)
    engine = {k: v for k, v in options.items() if k in engine_names}
    return engine, {k: v for k, v in options.items() if k not in engine_names}


def check_option_names(options: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A `dsserve serve --config` file: the flags' names with underscores or dashes, e.g. `max_model_len = 8192`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    check_option_names(data, names(EngineArgs) + names(ServerArgs), f"--config {path}")
    return data


def _flag(name: str) -> str:
    return name.replace("_", "-")
