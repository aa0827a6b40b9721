"""`dsserve weights quantize`: a bf16 / fp16 / fp32 (or FP8 block-quantized, dequantized first) checkpoint -> a
compressed-tensors folder holding dsserve's int4, int8 or w8a8 weights, shard by shard, safe to interrupt.

What is written, per quantized linear (the layout vLLM and dsserve's readers, formats/quantized.py, read):
- int4 (`pack-quantized`, W4A16, group 32 / 64 / 128): weight_packed int32 (N, K/8), eight 4-bit values per int32,
  the first input in the low bits (dsserve's q, 0..15, is compressed-tensors' signed q + 8); weight_scale float16
  (N, K/g);
  weight_shape int64 [N, K]; with zero points also weight_zero_point int32 (N/8 rounded up, K/g), eight rows' zero
  points per int32. compressed-tensors holds whole groups: a linear whose K is not a multiple of the group stays in
  float (logged, and named in `ignore`).
- int8 (`pack-quantized`, W8A16, per channel): weight_packed int32 (N, K/4) of q + 128, weight_scale float32 (N, 1),
  weight_shape.
- w8a8 (`int-quantized`, per-channel int8 weights, dynamic per-token int8 activations): weight int8 (N, K),
  weight_scale float32 (N, 1).
The values are QuantScheme.quantize's, the same integers `--quantization` holds. Quantized: the linears dsserve
quantizes (attention and MLP projections, shared and routed experts). Kept as they are (FP8 ones dequantized to
bf16): embeddings, norms, MoE routers, MLA's kv_b_proj and the LM head, which the config's `ignore` list names.

Output goes to `OUT.partial/` and is renamed to `OUT` when complete; a re-run resumes after the shards already
written (the same machinery as `weights convert`). Memory holds one shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsserve.errors import ConfigError, WeightsError
from dsserve.formats.quantization import QuantizedWeight, QuantScheme
from dsserve.models.loader import INDEX_FILE, checkpoint_files, dequantize_fp8_blocks
from dsserve.weights.convert import Progress, fsync_dir, side_files, write_atomic

# The linears dsserve's models quantize, by the last part of their module name (experts' and shared experts'
# projections included); every other 2-D weight stays as it is.
QUANTIZED_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj",
                     "q_b_proj", "kv_a_proj_with_mqa"}
# Linears kept in float: MoE routers (`mlp.gate`), MLA's kv_b_proj, the LM head (and DeepSeek-V3's MTP head).
KEPT_LINEARS = {"gate", "kv_b_proj", "lm_head", "head", "eh_proj"}
_WEIGHT = re.compile(r"^(?P<prefix>.+)\.weight$")
_RUN_FILE = "dsserve-quantize-run.json"  # in OUT.partial: the form its shards hold, so a resume cannot mix forms

logger = logging.getLogger(__name__)


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, scheme: QuantScheme,
                        progress: Progress | None = None) -> Path:
    """Write `src` quantized as `scheme` (int4 with any group and zero points, int8 or w8a8) to the folder `out`."""
    src, out = Path(src), Path(out)
    if scheme.float8:
        raise ConfigError("--to fp8 is not a target of `weights quantize`; the forms are int4, int8 and w8a8")
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output folder")
    shards = checkpoint_files(src)
    files = side_files(src, shards)
    if "config.json" not in files:
        raise ConfigError(f"{src / 'config.json'} is missing; copy the checkpoint's config.json there")
    config = json.loads(files["config.json"].read_text())
    source_quant = config.get("quantization_config") or {}
    if source_quant and source_quant.get("quant_method") != "fp8":
        raise ConfigError(f"{src} is already quantized ({source_quant.get('quant_method')}); `weights quantize` "
                          "reads bf16 / fp16 / fp32 checkpoints and DeepSeek's FP8 ones")
    block = tuple(source_quant.get("weight_block_size") or (128, 128))
    if len(shards) == 1 and not next(iter(shards.values())):
        only = next(iter(shards))
        with safe_open(str(src / only), "pt") as handle:
            shards = {only: list(handle.keys())}
    scale_home = {name: shard for shard, names in shards.items() for name in names if name.endswith("_scale_inv")}
    partial = _partial_groups(src, shards, scheme)
    _check_disk(src, out, shards)
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    _claim(staging, scheme)
    total = sum((src / s).stat().st_size for s in shards)
    done_bytes = 0
    weight_map: dict[str, str] = {}
    for shard in sorted(shards):
        names = [n for n in shards[shard] if not n.endswith("_scale_inv")]
        if names and not (staging / shard).exists():  # resume: a shard is renamed into place only once complete
            _quantize_shard(src, shard, names, scale_home, block, scheme, partial, staging)
        if names:
            with safe_open(str(staging / shard), "pt") as handle:
                weight_map.update({n: shard for n in handle.keys()})
        done_bytes += (src / shard).stat().st_size
        if progress:
            progress(shard, done_bytes, total)
    all_names = [n for names in shards.values() for n in names]
    for name, file in files.items():
        if name == "config.json":
            config.pop("quantization_config", None)
            if source_quant:  # FP8 weights kept in float were written in bf16
                config["torch_dtype"] = "bfloat16"
            ignore = sorted({*_kept_linears(all_names), *(_WEIGHT.match(n).group("prefix") for n in partial)})
            config["quantization_config"] = compressed_tensors_config(scheme, ignore)
            write_atomic(staging / "config.json", json.dumps(config, indent=2))
        else:
            write_atomic(staging / name, file)
    index = {"metadata": {"total_size": sum((staging / s).stat().st_size for s in set(weight_map.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(staging / INDEX_FILE, json.dumps(index, indent=1))
    (staging / _RUN_FILE).unlink()
    fsync_dir(staging)  # every entry durable before the rename makes the folder look complete
    staging.rename(out)
    fsync_dir(out.parent)
    return out


def compressed_tensors_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for `scheme`, as compressed-tensors writes it (one config group over
    every Linear, `ignore` naming the linears kept in float)."""
    if scheme.bits == 4:
        weights = {"num_bits": 4, "type": "int", "symmetric": not scheme.zero_point, "strategy": "group",
                   "group_size": scheme.group_size, "dynamic": False, "actorder": None}
    else:
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                   "dynamic": False}
    activations = None
    if scheme.activations:
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
                       "dynamic": True}
    fmt = "int-quantized" if scheme.activations else "pack-quantized"
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations, "output_activations": None,
             "format": fmt}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None}


def compressed_tensors_tensors(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors (suffixes in place of `weight`) in compressed-tensors' layout."""
    scheme, rows, cols = weight.scheme, weight.q.shape[0], weight.in_features
    if scheme.activations:
        return {"weight": weight.q.contiguous(), "weight_scale": weight.scales.float().view(rows, 1).clone()}
    shape = torch.tensor([rows, cols], dtype=torch.int64)
    if scheme.bits == 8:
        unsigned = weight.q.to(torch.int32) + 128  # compressed-tensors stores q + 2^(bits-1)
        return {"weight_packed": _pack(unsigned, 8, dim=1), "weight_scale": weight.scales.float().view(rows, 1).clone(),
                "weight_shape": shape}
    tensors = {"weight_packed": _pack(weight.q[:, :cols].to(torch.int32), 4, dim=1),  # dsserve's q is q + 8 already
               "weight_scale": weight.scales.contiguous(), "weight_shape": shape}
    if scheme.zero_point:  # signed zero point z - 8, stored + 8: dsserve's z, packed along the rows
        tensors["weight_zero_point"] = _pack(weight.zeros.to(torch.int32), 4, dim=0)
    return tensors


def _quantize_shard(src: Path, shard: str, names: list[str], scale_home: dict[str, str], block, scheme: QuantScheme,
                    partial: set[str], staging: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    handles: dict[str, object] = {}

    def handle_of(name: str):
        if name not in handles:
            handles[name] = safe_open(str(src / name), "pt")
        return handles[name]

    for name in names:
        tensor = handle_of(shard).get_tensor(name)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = name + "_scale_inv"
            if scale_name not in scale_home:
                raise WeightsError(f"FP8 tensor {name} in {shard} has no {scale_name}; the checkpoint is incomplete")
            scale = handle_of(scale_home[scale_name]).get_tensor(scale_name)
            tensor = dequantize_fp8_blocks(tensor, scale, block, torch.float32)
            if not _is_quantized(name, tensor):
                tensor = tensor.to(torch.bfloat16)
        if not _is_quantized(name, tensor) or name in partial:
            tensors[name] = tensor.contiguous()
            continue
        prefix = _WEIGHT.match(name).group("prefix")
        try:
            quantized = scheme.quantize(tensor.float())
        except ValueError as e:  # an int4 scale beyond float16
            raise WeightsError(f"{name}: {e}; quantize this checkpoint to int8 instead") from e
        tensors.update({f"{prefix}.{suffix}": t for suffix, t in compressed_tensors_tensors(quantized).items()})
    tmp = staging / (shard + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover from a killed run, or a link: replaced, never written through
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(staging / shard)


def _claim(staging: Path, scheme: QuantScheme) -> None:
    """Record the form this run writes in the staging folder, or check that a run being resumed wrote the same."""
    run = staging / _RUN_FILE
    if run.exists():
        earlier = json.loads(run.read_text()).get("to")
        if earlier != scheme.name:
            raise ConfigError(f"{staging} holds an interrupted run quantizing to {earlier}, not {scheme.name}; "
                              f"resume it with the same --to / --group-size / --zero-points, or delete {staging}")
        return
    if any(staging.iterdir()):
        raise ConfigError(f"{staging} holds files of another command (no {_RUN_FILE}); delete it and run again")
    write_atomic(run, json.dumps({"to": scheme.name}))


def _partial_groups(src: Path, shards: dict[str, list[str]], scheme: QuantScheme) -> set[str]:
    """int4: the weights to quantize whose inputs are not a multiple of the group (read from the shards' headers);
    they stay in float."""
    if scheme.bits != 4:
        return set()
    partial = set()
    for shard, names in shards.items():
        with safe_open(str(src / shard), "pt") as handle:
            for name in names:
                match = _WEIGHT.match(name)
                if match and match.group("prefix").rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
                    shape = handle.get_slice(name).get_shape()
                    if len(shape) == 2 and shape[1] % scheme.group_size:
                        partial.add(name)
    if partial:
        logger.info("%d linears have inputs that are not a multiple of --group-size %d (e.g. %s); compressed-tensors "
                    "holds whole groups, so they stay in float", len(partial), scheme.group_size, min(partial))
    return partial


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    match = _WEIGHT.match(name)
    return (match is not None and tensor.dim() == 2 and tensor.is_floating_point()
            and match.group("prefix").rsplit(".", 1)[-1] in QUANTIZED_LINEARS)


def _kept_linears(names: list[str]) -> list[str]:
    """The linears left in float, for the config's `ignore` list (compressed-tensors' readers expect every other
    Linear quantized)."""
    kept = set()
    for name in names:
        match = _WEIGHT.match(name)
        if match and match.group("prefix").rsplit(".", 1)[-1] in KEPT_LINEARS:
            kept.add(match.group("prefix"))
    return sorted(kept)


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-wide values (int32, 2-D) packed 32 / bits to an int32 along `dim`, the first in the low bits
    (compressed-tensors' pack_to_int32 on values already offset); a partial last int32 is zero-filled."""
    per_int = 32 // bits
    if dim == 0:
        return _pack(values.t(), bits, 1).t().contiguous()
    rows, cols = values.shape
    padded = torch.nn.functional.pad(values, (0, -cols % per_int)).view(rows, -1, per_int)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # int32 sums wrap like the bitwise OR of the shifted fields (fields do not overlap; the top one may set the sign)
    return (padded << shifts).sum(dim=2, dtype=torch.int32)


def _check_disk(src: Path, out: Path, shards: dict[str, list[str]]) -> None:
    """The output is at most about the input's size (int8 of FP8 weights, with bf16 embeddings); refuse to start
    when the output's disk cannot hold that."""
    needed = sum((src / s).stat().st_size for s in shards)
    parent = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(f"{parent} has {free / 2**30:.1f} GiB free but the quantized output needs up to "
                          f"{needed / 2**30:.1f} GiB; free space or choose another folder")
