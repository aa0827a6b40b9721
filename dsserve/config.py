"""Frozen configuration: the model (from config.json), the KV cache, the scheduler, the engine."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsserve.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
WEIGHT_DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_scaling` (old) or `rope_parameters` (new)."""

    theta: float  # base of the inverse frequencies
    rope_type: str  # "default", "yarn", "llama3", "linear"
    factor: float = 1.0  # context extension factor
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0  # YaRN: fast rotation bound
    beta_slow: float = 1.0  # YaRN: slow rotation bound
    mscale: float = 1.0  # YaRN: numerator of the cos/sin scale
    mscale_all_dim: float = 0.0  # YaRN: scale of the attention softmax (DeepSeek)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs from a checkpoint's config.json, with defaults as transformers applies them."""

    path: str  # the checkpoint folder
    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # per-head width for MHA/GQA models
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 projections carry a bias
    checkpoint_dtype: str  # dtype the checkpoint declares ("bfloat16", ...)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # MLA (DeepSeek); zero for other models
    q_lora_rank: int | None = None  # None: plain q_proj (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # DeepSeek's rope dims are interleaved pairs
    # DeepSeekMoE; n_routed_experts 0 means a dense model
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    scoring_func: str = "softmax"  # softmax (V2) | sigmoid (V3)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # FP8 block quantization, e.g. (128, 128); None for unquantized checkpoints
    fp8_block_size: tuple[int, int] | None = None
    # Another tool's quantization (compressed-tensors, AWQ, GPTQ, w8a8_int8): config.json's quantization_config, which
    # models/loader.py checkpoint_reader reads (and refuses where no reader holds it); None otherwise
    quantization_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    o_proj_bias: bool = False  # Llama with attention_bias: o_proj has a bias too (Qwen2's does not)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule (HF remote code): MoE from `first_k_dense_replace` on, every `moe_layer_freq` layers."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def kv_cache_entry_shape(self) -> tuple[int, ...]:
        """Per token per layer: MLA keeps the normalized latent + rope key; MHA/GQA keeps K and V per KV head."""
        if self.is_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim,)
        return (2, self.num_key_value_heads, self.head_dim)

    @property
    def kv_cache_elements_per_token(self) -> int:
        return math.prod(self.kv_cache_entry_shape) * self.num_hidden_layers

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "ModelConfig":
        folder = Path(path)
        if not folder.exists():
            raise ConfigError(f"model path {folder} does not exist; pass a local checkpoint folder")
        if not folder.is_dir():
            raise ConfigError(f"model path {folder} is not a directory; pass the checkpoint folder, not a file")
        config_file = folder / "config.json"
        if not config_file.exists():
            raise ConfigError(f"{config_file} is missing; a Hugging Face checkpoint folder needs its config.json")
        try:
            raw = json.loads(config_file.read_text())
        except PermissionError as e:
            raise ConfigError(f"{config_file} is not readable ({e.strerror}); fix with: chmod a+r {config_file}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file} is not valid JSON (line {e.lineno}: {e.msg})") from e
        return cls.from_dict(raw, str(folder))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json model_type {model_type!r} is not supported; "
                f"dsserve runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json in {path or '<dict>'} lacks required field {key!r} for {model_type}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        common: dict[str, Any] = dict(
            path=path,
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            o_proj_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
            checkpoint_dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act {raw.get('hidden_act')!r} is not supported; dsserve implements silu")
        quant = raw.get("quantization_config")
        if quant and quant.get("quant_method") == "fp8":
            if "weight_block_size" not in quant:
                raise ConfigError(
                    f"config.json quantization_config {quant} is not supported; dsserve loads FP8 block-quantized "
                    "checkpoints (quant_method 'fp8' with weight_block_size)"
                )
            common["fp8_block_size"] = tuple(int(x) for x in quant["weight_block_size"])
        elif quant:
            common["quantization_config"] = dict(quant)
        if model_type in ("deepseek_v2", "deepseek_v3"):
            is_v3 = model_type == "deepseek_v3"
            common.update(
                q_lora_rank=raw.get("q_lora_rank"),
                kv_lora_rank=int(need("kv_lora_rank")),
                qk_nope_head_dim=int(need("qk_nope_head_dim")),
                qk_rope_head_dim=int(need("qk_rope_head_dim")),
                v_head_dim=int(need("v_head_dim")),
                rope_interleave=bool(raw.get("rope_interleave", True)),
                n_routed_experts=int(raw.get("n_routed_experts") or 0),
                n_shared_experts=int(raw.get("n_shared_experts") or 0),
                num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
                moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
                n_group=int(raw.get("n_group") or 1),
                topk_group=int(raw.get("topk_group") or 1),
                topk_method=raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy"),
                scoring_func=raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax"),
                norm_topk_prob=bool(raw.get("norm_topk_prob", is_v3)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5 if is_v3 else 1.0)),
                first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
                moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
            )
            if common["topk_method"] not in ("greedy", "group_limited_greedy", "noaux_tc"):
                raise ConfigError(f"config.json topk_method {common['topk_method']!r} is not supported")
            if common["scoring_func"] not in ("softmax", "sigmoid"):
                raise ConfigError(f"config.json scoring_func {common['scoring_func']!r} is not supported")
            if common["n_routed_experts"] and common["n_routed_experts"] % common["n_group"]:
                raise ConfigError("config.json n_routed_experts must be a multiple of n_group")
        return cls(**common)


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    """Accept both the checkpoint's `rope_theta` + `rope_scaling` and newer transformers' `rope_parameters`."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in ("default", "yarn", "llama3", "linear"):
        raise ConfigError(f"config.json rope type {rope_type!r} is not supported; dsserve implements default, yarn, llama3, linear")
    orig = merged.get("original_max_position_embeddings")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(merged.get("factor") or 1.0),
        original_max_position_embeddings=int(orig) if orig else None,
        beta_fast=float(merged.get("beta_fast") or 32),
        beta_slow=float(merged.get("beta_slow") or 1),
        mscale=float(merged.get("mscale") or 1.0),
        mscale_all_dim=float(merged.get("mscale_all_dim") or 0.0),
        low_freq_factor=float(merged.get("low_freq_factor") or 1.0),
        high_freq_factor=float(merged.get("high_freq_factor") or 4.0),
    )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache, resolved (the options and their defaults: options.EngineArgs)."""

    block_size: int  # tokens per block (MindIE uses 128)
    kv_cache_memory: int | None  # bytes for the cache; None: a fraction of free memory
    kv_cache_fraction: float  # share of free memory taken when kv_cache_memory is None
    num_blocks: int | None  # exact block count (tests force preemption with a tiny cache)
    enable_prefix_caching: bool  # share full blocks by chained hash


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets, resolved (the options and their defaults: options.EngineArgs)."""

    max_num_seqs: int  # requests in one step
    max_num_batched_tokens: int  # tokens computed in one step
    max_model_len: int  # prompt + output tokens per request
    enable_chunked_prefill: bool  # split long prompts over steps
    fit_max_model_len: bool  # the engine lowers max_model_len to what the KV cache holds (it was defaulted)


@dataclass(frozen=True)
class ParallelConfig:
    """Where this process sits in a tensor/expert-parallel deployment: one process per device rank.

    Rank 0 schedules, samples and (under `dsserve serve`) serves HTTP; every other rank only computes.
    The first process of each node starts that node's other ranks itself (`spawn`), except under torchrun,
    which starts every rank.
    """

    world_size: int = 1  # = --tensor-parallel-size: ranks in the deployment, over every node
    enable_expert_parallel: bool = False  # MoE: whole experts per rank (E / world_size each)
    rank: int = 0  # this process's global rank
    local_rank: int = 0  # its index on this node (selects the device)
    node_rank: int = 0
    node_ranks: tuple[int, ...] = (0,)  # the global ranks on this node, in local order
    spawn: bool = True  # this process starts the node's other ranks
    master_addr: str = "127.0.0.1"  # where rank 0 listens for the others (the rank table's first node)
    master_port: int = 0  # 0: a free port (only when every rank is on this node)
    node_addr: str | None = None  # this node's IP from the rank table: picks the network interface
    backend: str | None = None  # torch.distributed backend; None: gloo on CPU, nccl on CUDA, hccl on Ascend
    connect_timeout_s: float = 120.0  # for every rank to join and agree, before weights load
    step_timeout_s: float = 60.0  # for any collective once running: a dead or stalled rank fails within it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def check(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"--tensor-parallel-size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside [0, {self.world_size}); the rank table or RANK is wrong")
        if self.connect_timeout_s <= 0 or self.step_timeout_s <= 0:
            raise ConfigError("--connect-timeout and --step-timeout must be > 0 seconds")
        if self.enabled and self.master_port == 0 and len(self.node_ranks) != self.world_size:
            raise ConfigError("a deployment over several nodes needs --master-port (the same on every node)")

    def parallel_checks(self, model: "ModelConfig") -> None:
        """The model's dimensions that must divide by the number of ranks, checked before anything starts."""
        n = self.world_size
        if n == 1:
            return
        what = [("num_attention_heads", model.num_attention_heads)]
        kv = model.num_key_value_heads
        if not model.is_mla and kv % n and n % kv:
            raise ConfigError(f"--tensor-parallel-size {n} and num_key_value_heads = {kv} do not divide one another; "
                              "choose a size that divides the KV heads or is a multiple of them")
        if model.intermediate_size:
            what.append(("intermediate_size", model.intermediate_size))
        if model.n_routed_experts:
            if self.enable_expert_parallel:
                what.append(("n_routed_experts", model.n_routed_experts))
                if model.n_shared_experts:
                    what.append(("the shared experts' intermediate size",
                                 model.moe_intermediate_size * model.n_shared_experts))
            else:
                what.append(("moe_intermediate_size", model.moe_intermediate_size))
        bad = [f"{name} = {value}" for name, value in what if value % n]
        if bad:
            hint = "" if self.enable_expert_parallel or not model.n_routed_experts else (
                "; with --enable-expert-parallel the experts are split instead of their intermediate size")
            raise ConfigError(f"--tensor-parallel-size {n} does not divide {', '.join(bad)}; choose a size that "
                              f"divides them{hint}")


def parallel_from_env(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) as
    ParallelConfig fields, or None when this process was not started by torchrun."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        port = int(env.get("MASTER_PORT", "29500"))
    except ValueError as e:
        raise ConfigError(f"a torchrun variable is not an integer ({e}); check RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT") from e
    first = rank - local_rank
    return dict(world_size=world, rank=rank, local_rank=local_rank, node_rank=first // max(local_world, 1),
                node_ranks=tuple(range(first, first + local_world)), spawn=False,
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port)


def config_hash(path: str | os.PathLike) -> str:
    """sha256 of config.json's content (key order and whitespace ignored): ranks must all load the same model."""
    raw = json.loads((Path(path) / "config.json").read_text())
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLM(...)` and `dsserve serve` resolve before starting the engine."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    dtype: str  # resolved compute dtype: bfloat16 | float16 | float32
    weight_dtype: str  # how linear weights are stored: the compute dtype, or float16 on a float32 CPU
    kv_cache_dtype: str  # how K/V (or MLA latents) are cached: the compute dtype, or float16 on a float32 CPU
    device: str  # "cpu" or "cuda"
    num_threads: int  # torch intra-op threads on CPU
    backend: str  # kernels: "cpu" (dsserve's C kernels, packed weights) or "torch" (the plain-torch reference)
    quantization: str | None = None  # int8 / int4 weights quantized at load (formats/quantization.py names), or None
    # the form a pre-quantized checkpoint's linears load as (formats/quantized.py checkpoint_reader), e.g.
    # "int4-g128-zp"
    checkpoint_quantization: str | None = None
    seed: int = 0  # default seed of unseeded sampling
    tokenizer_path: str | None = None  # folder with tokenizer.json; default the model folder
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_json(self) -> str:
        """The resolved settings as JSON: how a node's first process hands them to the ranks it starts."""
        from dataclasses import asdict

        d = {f: getattr(self, f) for f in ("dtype", "weight_dtype", "kv_cache_dtype", "backend", "quantization",
                                           "checkpoint_quantization", "device", "num_threads", "seed",
                                           "tokenizer_path")}
        d.update(model=self.model.path, cache=asdict(self.cache), scheduler=asdict(self.scheduler),
                 parallel=asdict(self.parallel))
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        d = json.loads(text)
        parallel = d.pop("parallel")
        parallel["node_ranks"] = tuple(parallel["node_ranks"])
        return cls(model=ModelConfig.from_path(d.pop("model")), cache=CacheConfig(**d.pop("cache")),
                   scheduler=SchedulerConfig(**d.pop("scheduler")), parallel=ParallelConfig(**parallel), **d)


def log_dir() -> Path:
    """Where `dsserve serve` writes its log: $DSSERVE_LOG_DIR, else $XDG_STATE_HOME/dsserve/logs,
    else ~/.local/state/dsserve/logs."""
    if os.environ.get("DSSERVE_LOG_DIR"):
        return Path(os.environ["DSSERVE_LOG_DIR"])
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return state / "dsserve" / "logs"


def resolve_dtype(requested: str, checkpoint_dtype: str, device: str) -> str:
    """`auto` takes the checkpoint's dtype, except on a CPU where bf16/fp16 matmuls are slower than fp32."""
    if requested not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {requested!r} is not one of {', '.join(DTYPE_NAMES)}")
    if requested != "auto":
        return requested
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(
        checkpoint_dtype, checkpoint_dtype
    )
    if name not in ("bfloat16", "float16", "float32"):
        name = "bfloat16"  # FP8 checkpoints declare bfloat16; anything exotic computes in bf16
    if device == "cpu" and name != "float32":
        return "float32"
    return name


def resolve_weight_dtype(requested: str, checkpoint_dtype: str, device: str, dtype: str,
                         native_bf16: bool = False) -> str:
    """How linear-layer weights are stored. Only a CPU computing in float32 stores them apart from the compute
    dtype: float16 or bfloat16 there (packed for dsserve's kernels, widened to fp32 inside them) halves the bytes
    every decode step reads and is faster than fp32 at every batch size measured. `auto` keeps float32 weights
    for a float32 checkpoint (ask for float16 / bfloat16 to trade that precision for speed, as llama.cpp's f16
    does). For a 16-bit checkpoint it takes bfloat16 where the CPU multiplies bf16 natively (`native_bf16`: AMX
    or AVX512-BF16; the matmuls of several rows then run on the tile unit, 4-7x faster than fp16 weights there)
    and the checkpoint is bf16 (its own values), else float16 (bf16 -> fp16 is exact for every weight in fp16's
    normal range)."""
    if requested not in WEIGHT_DTYPE_NAMES:
        raise ConfigError(f"--weight-dtype {requested!r} is not one of {', '.join(WEIGHT_DTYPE_NAMES)}")
    if device != "cpu" or dtype != "float32":
        if requested not in ("auto", dtype):
            raise ConfigError(
                f"--weight-dtype {requested} applies only on CPU with --dtype float32 (here {device}, {dtype}): "
                "weights are stored in the compute dtype; drop --weight-dtype"
            )
        return dtype
    if requested != "auto":
        return requested
    if native_bf16 and checkpoint_dtype in ("bf16", "bfloat16"):
        return "bfloat16"
    sixteen_bit = {"bf16", "bfloat16", "fp16", "float16", "half"}
    return "float16" if checkpoint_dtype in sixteen_bit else "float32"


def resolve_kv_cache_dtype(requested: str, device: str, dtype: str) -> str:
    """How the KV cache is stored: `auto` is the compute dtype. A CPU computing in float32 may cache float16
    (`--kv-cache-dtype float16`, as llama.cpp's default f16 cache): half the cache's memory and half the bytes
    decode attention reads; the CPU kernel widens the values as it loads them."""
    if requested not in KV_CACHE_DTYPE_NAMES:
        raise ConfigError(f"--kv-cache-dtype {requested!r} is not one of {', '.join(KV_CACHE_DTYPE_NAMES)}")
    if requested in ("auto", dtype):
        return dtype
    if device == "cpu" and dtype == "float32" and requested == "float16":
        return requested
    raise ConfigError(
        f"--kv-cache-dtype {requested} with --dtype {dtype} on {device} is not supported: the cache is stored in the "
        "compute dtype, or float16 on a CPU computing in float32; drop --kv-cache-dtype"
    )


def resolve_backend(requested: str, device: str) -> str:
    """`auto`: dsserve's C kernels ("cpu") on a CPU device, the plain-torch reference ("torch") elsewhere."""
    if requested == "auto":
        return "cpu" if device == "cpu" else "torch"
    if requested == "cpu" and device != "cpu":
        raise ConfigError(f"--backend cpu runs dsserve's CPU kernels, not on device {device}; use --backend auto or torch")
    if requested not in ("cpu", "torch"):
        raise ConfigError(f"--backend {requested!r} is not one of auto, cpu, torch")
    return requested


def parse_memory(value: str | int | None) -> int | None:
    """'4GiB', '512MB', '1e9' or a plain byte count -> bytes."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, mult = text, 1
    try:
        result = int(float(number) * mult)
    except ValueError:
        raise ConfigError(f"memory size {value!r} is not understood; write e.g. 4GiB, 512MiB or a byte count") from None
    if result <= 0:
        raise ConfigError(f"memory size {value!r} must be positive")
    return result


# ---- exposure: the bind address and API keys (read by `serve` and checked by `doctor`) ------------------

def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, "", a name, a LAN address) reaches the network."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiKey:
    """One API key of `dsserve serve`: the name is what logs, metrics and the audit log show; the key never is."""

    name: str
    key: str = field(repr=False)
    requests_per_minute: int | None = None  # a bucket of this many requests, refilled at this rate
    max_concurrent: int | None = None  # requests in flight at once
    source: str = field(default="", compare=False)  # where it was given (for messages): "--api-key-file entry 2"


API_KEY_FIELDS = ("name", "key", "requests_per_minute", "max_concurrent")


def read_api_keys(cli_keys: Any, key_file: str | os.PathLike | None,
                  cli_source: str = "--api-key") -> tuple[tuple[ApiKey, ...], list[str]]:
    """The keys of `--api-key` (a string or a list; named api-key-1, api-key-2, ...) and of `--api-key-file` (TOML
    `[[keys]]` tables: name, key, optional requests_per_minute and max_concurrent), and every problem found: empty
    or duplicate names and keys, bad limits, unknown fields. Messages name entries, never quote a key or the file."""
    problems: list[str] = []
    keys: list[ApiKey] = []
    if cli_keys is not None:
        values = cli_keys if isinstance(cli_keys, (list, tuple)) else [cli_keys]
        bad = [i for i, v in enumerate(values, 1) if not isinstance(v, str) or not v]
        if not values or bad:
            where = cli_source if not isinstance(cli_keys, (list, tuple)) else \
                f"{cli_source} entry {', '.join(map(str, bad)) or '(none)'}"
            problems.append(f"{where} must be a non-empty string (or a list of them): an empty key asks clients for "
                            "nothing")
        else:
            keys += [ApiKey(f"api-key-{i}", v, source=cli_source if len(values) == 1 else f"{cli_source} entry {i}")
                     for i, v in enumerate(values, 1)]
    if key_file is not None:
        keys += _read_key_file(str(key_file), problems)
    by_name: dict[str, list[str]] = {}
    by_secret: dict[str, list[str]] = {}
    for k in keys:
        by_name.setdefault(k.name, []).append(k.source)
        by_secret.setdefault(k.key, []).append(f"{k.name!r} ({k.source})")
    for name, wheres in by_name.items():
        if len(wheres) > 1:
            problems.append(f"API key name {name!r} is given {len(wheres)} times ({', '.join(wheres)}); names must be "
                            "unique (they label metrics and audit lines)")
    for named in by_secret.values():
        if len(named) > 1:
            problems.append(f"API keys {' and '.join(named)} are the same key; give each its own")
    return tuple(keys), problems


def _read_key_file(path: str, problems: list[str]) -> list[ApiKey]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    label = f"--api-key-file {path}"
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{label} does not exist")
        return []
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{label} cannot be read ({getattr(e, 'strerror', None) or 'not UTF-8 text'}); let the user "
                        "running dsserve read it")
        return []
    except tomllib.TOMLDecodeError as e:  # the problem and its line/column, never the text (it holds keys)
        problems.append(f"{label} is not valid TOML: {e}")
        return []
    entries, unknown = data.get("keys"), sorted(set(data) - {"keys"})
    if unknown or not isinstance(entries, list) or not entries:
        problems.append(f"{label} must hold [[keys]] tables (name = \"...\", key = \"...\", optional "
                        "requests_per_minute and max_concurrent)"
                        + (f"; unknown top-level key(s): {', '.join(unknown)}" if unknown else ""))
        return []
    keys = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            problems.append(f"{label}: entry {i} is not a table")
            continue
        name, key = entry.get("name"), entry.get("key")
        has_name = isinstance(name, str) and bool(name.strip())
        where = f"{label}: entry {i}" + (f" ({name.strip()!r})" if has_name else "")
        if not has_name:
            problems.append(f"{where} needs a non-empty `name` (it labels metrics and audit lines)")
        if not isinstance(key, str) or not key:
            problems.append(f"{where} needs a non-empty `key`")
        limits = {}
        for limit_name in ("requests_per_minute", "max_concurrent"):
            limit = entry.get(limit_name)
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                problems.append(f"{where}: {limit_name} must be a whole number >= 1, got {limit!r}")
                limit = None
            limits[limit_name] = limit
        extra = sorted(set(entry) - set(API_KEY_FIELDS))
        if extra:
            problems.append(f"{where} has unknown field(s) {', '.join(extra)}; known: {', '.join(API_KEY_FIELDS)}")
        if has_name and isinstance(key, str) and key:  # kept for the duplicate checks even beside other problems
            keys.append(ApiKey(name.strip(), key, source=f"--api-key-file entry {i}", **limits))
    return keys
