"""Capacity planning from first principles: parameters from config.json, bytes per dtype, KV bytes per token,
and the smallest valid device count that holds the weights plus the KV cache for the asked concurrency."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsserve.config import ModelConfig
from dsserve.errors import ConfigError
from dsserve.plan.presets import DEVICES, PRESETS

GiB = 2**30
# bf16 / fp8 / w8a8: the checkpoint formats as engines that keep them hold them; int8 / int4*: what dsserve's CPU
# backend holds with `--quantization` of that name (docs/quantization.md)
WEIGHT_DTYPES = ("bf16", "fp8", "w8a8", "int8", "int4", "int4-g64", "int4-g128", "int4-zp", "int4-g64-zp",
                 "int4-g128-zp")


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter of the main model (no MTP layer)
    active: int  # parameters one token passes through (routed experts: top-k of them)
    linear: int  # parameters in the quantizable linear layers (attention, MLPs, experts)
    linear_blocks: int  # 128x128 blocks of those linears (one FP8 scale each)
    linear_rows: int  # output rows of those linears (one W8A8 per-channel scale each)
    replicated_linear: int = 0  # linears every tensor-parallel rank holds whole (MLA's q_a / kv_a down-projections)
    replicated_other: int = 0  # norms, also held whole by every rank
    routers: int = 0  # MoE router weights and biases: whole on every rank, float32 in the engine
    head: int = 0  # the LM head's parameters (vocab x hidden; the embedding's own when tied)
    head_rows: int = 0  # its rows (the vocabulary)
    tied: bool = False  # the LM head is the input embedding


def count_params(c: ModelConfig) -> ParamCount:
    h = c.hidden_size
    linears: list[tuple[int, int, int]] = []  # (out, in, count)
    other = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h  # embeddings, head, final norm
    active_linear = 0
    replicated_linear, replicated_other, routers = 0, h, 0
    for layer in range(c.num_hidden_layers):
        other += 2 * h
        replicated_other += 2 * h
        if c.is_mla:
            qk = c.num_attention_heads * c.qk_head_dim
            if c.q_lora_rank:
                attn = [(c.q_lora_rank, h), (qk, c.q_lora_rank)]
                other += c.q_lora_rank
                replicated_linear += c.q_lora_rank * h
                replicated_other += c.q_lora_rank
            else:
                attn = [(qk, h)]
            replicated_linear += (c.kv_lora_rank + c.qk_rope_head_dim) * h
            replicated_other += c.kv_lora_rank
            attn += [(c.kv_lora_rank + c.qk_rope_head_dim, h),
                     (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                     (h, c.num_attention_heads * c.v_head_dim)]
            other += c.kv_lora_rank
        else:
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            attn = [(q, h), (kv, h), (kv, h), (h, q)]
            if c.qkv_bias:
                other += q + 2 * kv
        mlp: list[tuple[int, int, int]] = []
        if c.is_moe_layer(layer):
            inter = c.moe_intermediate_size
            mlp += [(inter, h, c.n_routed_experts * 2), (h, inter, c.n_routed_experts)]
            if c.n_shared_experts:
                shared = inter * c.n_shared_experts
                mlp += [(shared, h, 2), (h, shared, 1)]
            router = c.n_routed_experts * h + (c.n_routed_experts if c.topk_method == "noaux_tc" else 0)
            other += router
            routers += router
            active_linear += 3 * h * inter * c.num_experts_per_tok + 3 * h * inter * c.n_shared_experts
        else:
            mlp += [(c.intermediate_size, h, 2), (h, c.intermediate_size, 1)]
            active_linear += 3 * h * c.intermediate_size
        for out, inp, n in [(o, i, 1) for o, i in attn] + mlp:
            linears.append((out, inp, n))
        active_linear += sum(o * i for o, i in attn)
    linear = sum(o * i * n for o, i, n in linears)
    blocks = sum(-(-o // 128) * -(-i // 128) * n for o, i, n in linears)
    rows = sum(o * n for o, _, n in linears)
    return ParamCount(total=linear + other, active=active_linear + other, linear=linear,
                      linear_blocks=blocks, linear_rows=rows, replicated_linear=replicated_linear,
                      replicated_other=replicated_other, routers=routers, head=c.vocab_size * h, head_rows=c.vocab_size,
                      tied=bool(c.tie_word_embeddings))


def is_dsserve_quantization(dtype: str) -> bool:
    """A form dsserve's CPU backend holds with `--quantization` (int8, int4...), not a checkpoint format."""
    return dtype == "int8" or dtype.startswith("int4")


def weight_bytes(p: ParamCount, dtype: str) -> int:
    """Linears in `dtype` with their scales; embeddings, LM head, norms and routers stay BF16, except under dsserve's
    int8 / int4, where the LM head is int8 with a float32 scale per row (a tied head: an int8 copy beside the bf16
    embedding). MLA's kv_b_proj is counted with the linears; dsserve keeps it at 16 bits (0.15% of V3's weights)."""
    return linear_bytes(p, dtype) + _other_bytes(p, dtype)


def linear_bytes(p: ParamCount, dtype: str) -> int:
    """The quantizable linears' bytes in `dtype`, scales (and zero points) included."""
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if dtype == "bf16":
        return 2 * p.linear
    if dtype == "fp8":  # 1 byte + a float32 scale per 128x128 block
        return p.linear + 4 * p.linear_blocks
    if dtype in ("w8a8", "int8"):  # int8 + a float32 scale per output channel
        return p.linear + 4 * p.linear_rows
    # int4: 4 bits + a float16 scale (and a uint8 zero point with -zp) per group
    group = int(dtype.split("-g")[1].split("-")[0]) if "-g" in dtype else 32
    return p.linear // 2 + (3 if dtype.endswith("-zp") else 2) * (p.linear // group)


def _other_bytes(p: ParamCount, dtype: str) -> int:
    other = 2 * (p.total - p.linear)
    if is_dsserve_quantization(dtype):
        other += p.head + 4 * p.head_rows - (0 if p.tied else 2 * p.head)
    return other


def weight_bytes_per_device(p: ParamCount, dtype: str, n: int) -> float:
    """What one of `n` tensor-parallel ranks holds: its share of the split weights plus the parts every rank
    keeps whole (MLA's down-projections, norms, MoE routers in float32, as dsserve's engine loads them)."""
    total = weight_bytes(p, dtype)
    per_linear = linear_bytes(p, dtype) / max(p.linear, 1)  # bytes per linear weight, scales included
    replicated = p.replicated_linear * per_linear + 2 * (p.replicated_other + p.routers)  # as counted in `total`
    return (total - replicated) / n + replicated + 2 * p.routers  # + the routers' float32 upgrade


def kv_bytes_per_token(c: ModelConfig, tp: int = 1, kv_bytes: int = 2) -> int:
    """Per device. MLA keeps one latent per token per layer that tensor parallelism cannot split (each rank holds
    it all); MHA/GQA keeps K and V per KV head, split over ranks down to one head per rank."""
    if c.is_mla:
        return (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * kv_bytes
    heads = max(1, -(-c.num_key_value_heads // tp))
    return 2 * heads * c.head_dim * c.num_hidden_layers * kv_bytes


@dataclass
class Plan:
    model: str
    device: str
    device_memory_gib: float
    dtype: str
    params_total: int
    params_active: int
    weight_gib: float
    kv_bytes_per_token: int  # one device, BF16 cache
    max_model_len: int
    concurrency: int
    fits: bool
    devices: int = 0
    nodes: int = 0
    weight_gib_per_device: float = 0.0
    kv_gib_per_device: float = 0.0
    max_concurrent_sequences: int = 0
    reasons: list[str] = field(default_factory=list)  # why each smaller device count fails
    launch: str = ""  # the dsserve serve flags that deploy it
    # CPU: the resident peak while loading, per rank. Layers are packed as they load, so the peak is the weights plus
    # the largest layer staged before packing: the LM head, vocab / ranks x hidden values, in bf16 where the CPU has
    # native bf16 (AMX / AVX512-BF16: 2 bytes each; elsewhere weights pack as fp16 from float32 staging: 4 bytes).
    load_peak_gib: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def load_model_config(source: str) -> tuple[str, ModelConfig]:
    """A preset name, a checkpoint folder or a config.json file."""
    if source.lower() in PRESETS:
        return source.lower(), ModelConfig.from_dict(PRESETS[source.lower()], source.lower())
    path = Path(source)
    if path.is_dir():
        return path.name, ModelConfig.from_path(path)
    if path.is_file():
        try:
            return path.parent.name or path.name, ModelConfig.from_dict(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    raise ConfigError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder or config.json")


def device_memory_gib(device: str) -> float:
    if device == "cpu":
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {', '.join([*DEVICES, 'cpu'])}")
    return DEVICES[device]


def plan(source: str, device: str = "910b-64g", devices_per_node: int = 8, dtype: str = "bf16",
         max_model_len: int = 4096, concurrency: int = 1, memory_fraction: float = 0.9,
         max_nodes: int = 64) -> Plan:
    name, c = load_model_config(source)
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"--memory-fraction {memory_fraction} must be in (0, 1]")
    memory = device_memory_gib(device)
    params = count_params(c)
    weights = weight_bytes(params, dtype)
    result = Plan(name, device, round(memory, 1), dtype, params.total, params.active, round(weights / GiB, 1),
                  kv_bytes_per_token(c), max_model_len, concurrency, fits=False)
    usable = memory * GiB * memory_fraction
    workspace = max(GiB, 0.05 * memory * GiB)  # activations, communication buffers, graphs
    candidates = [n for n in (1, 2, 4, 8, 16) if n <= devices_per_node]
    candidates += [devices_per_node * k for k in range(2, max_nodes + 1)]
    for n in sorted(set(candidates)):
        if n > 1 and (c.num_attention_heads % n or (c.n_routed_experts and c.n_routed_experts % n
                                                        and c.moe_intermediate_size % n)):
            result.reasons.append(f"{n} devices: {n} divides neither the {c.num_attention_heads} attention heads "
                                  f"(split over the ranks) nor the experts (expert parallel)")
            continue
        per_device = weight_bytes_per_device(params, dtype, n)
        free = usable - workspace - per_device
        kv_token = kv_bytes_per_token(c, n)
        if free <= 0:
            result.reasons.append(f"{n} devices: {per_device / GiB:.1f} GiB of weights per device exceed the "
                                  f"{(usable - workspace) / GiB:.1f} GiB usable ({memory_fraction:.0%} of "
                                  f"{memory:.1f} GiB minus {workspace / GiB:.1f} GiB workspace)")
            continue
        seqs = int(free // (kv_token * max_model_len))
        if seqs < concurrency:
            result.reasons.append(f"{n} devices: {free / GiB:.1f} GiB left for KV hold {seqs} sequence(s) of "
                                  f"{max_model_len} tokens at {kv_token / 1024:.1f} KiB/token, fewer than {concurrency}")
            continue
        result.fits = True
        result.devices, result.nodes = n, -(-n // devices_per_node)
        result.weight_gib_per_device = round(per_device / GiB, 1)
        result.kv_gib_per_device = round(free / GiB, 1)
        result.max_concurrent_sequences = seqs
        result.launch = _launch_hint(c, n, devices_per_node)
        if device == "cpu" and is_dsserve_quantization(dtype):  # dsserve holds these on CPU only
            result.launch += f" --quantization {dtype}"
        if device == "cpu":
            vocab_rows = -(-c.vocab_size // n) * c.hidden_size
            result.load_peak_gib = round((per_device + vocab_rows * 2) / GiB, 1)
        return result
    return result



def _launch_hint(c: ModelConfig, n: int, devices_per_node: int) -> str:
    if n == 1:
        return "dsserve serve MODEL"
    ep = " --enable-expert-parallel" if c.n_routed_experts and c.n_routed_experts % n == 0 else ""
    if n <= devices_per_node:
        return f"dsserve serve MODEL -tp {n}{ep}"
    nodes = -(-n // devices_per_node)
    return (f"dsserve ranktable generate --nodes IP0,...,IP{nodes - 1} --devices-per-node {devices_per_node} -o rt.json; "
            f"on node K: dsserve serve MODEL --rank-table rt.json --node-rank K{ep}")
