"""`dsserve weights convert`: FP8 block-quantized -> BF16 on the CPU, shard by shard, safe to interrupt.

Output goes to `OUT.partial/` and is renamed to `OUT` only when every shard, the side files and the index
(written last) are in place, so an interrupted run never leaves a complete-looking folder. A re-run resumes:
shards already converted (renamed into place after being fully written) are kept. Memory holds one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsserve.errors import ConfigError, WeightsError
from dsserve.models.loader import INDEX_FILE, checkpoint_files, dequantize_fp8_blocks

Progress = Callable[[str, int, int], None]  # (shard, bytes done, bytes total)


def convert_to_bf16(src: str | os.PathLike, out: str | os.PathLike, progress: Progress | None = None) -> Path:
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output folder")
    config = json.loads((src / "config.json").read_text())
    block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    shards = checkpoint_files(src)
    if len(shards) == 1 and not next(iter(shards.values())):
        only = next(iter(shards))
        with safe_open(str(src / only), "pt") as handle:
            shards = {only: list(handle.keys())}
    scale_home = {name: shard for shard, names in shards.items() for name in names if name.endswith("_scale_inv")}
    _check_disk(src, out, shards)
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    total = sum((src / s).stat().st_size for s in shards)
    done_bytes = 0
    weight_map: dict[str, str] = {}
    for shard in sorted(shards):
        names = [n for n in shards[shard] if not n.endswith("_scale_inv")]
        weight_map.update({n: shard for n in names})
        if names and not (staging / shard).exists():  # resume: a shard is renamed into place only once complete
            _convert_shard(src, shard, names, scale_home, block, staging)
        done_bytes += (src / shard).stat().st_size
        if progress:
            progress(shard, done_bytes, total)
    _copy_side_files(src, staging)
    index = {"metadata": {"total_size": sum((staging / s).stat().st_size for s in set(weight_map.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    _write_atomic(staging / INDEX_FILE, json.dumps(index, indent=1))
    staging.rename(out)
    return out


def _convert_shard(src: Path, shard: str, names: list[str], scale_home: dict[str, str], block, staging: Path) -> None:
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
            tensor = dequantize_fp8_blocks(tensor, scale, block, torch.bfloat16)
        tensors[name] = tensor.contiguous()
    tmp = staging / (shard + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(staging / shard)


def _copy_side_files(src: Path, staging: Path) -> None:
    """config.json without quantization_config (else engines expect FP8), tokenizer and generation files."""
    for file in src.iterdir():
        if file.suffix == ".safetensors" or file.name == INDEX_FILE or not file.is_file():
            continue
        if file.name == "config.json":
            config = json.loads(file.read_text())
            config.pop("quantization_config", None)
            config["torch_dtype"] = "bfloat16"
            _write_atomic(staging / "config.json", json.dumps(config, indent=2))
        else:
            shutil.copyfile(file, staging / file.name)


def _check_disk(src: Path, out: Path, shards: dict[str, list[str]]) -> None:
    """BF16 is about twice the FP8 bytes; refuse to start when the output's disk cannot hold that."""
    needed = 2 * sum((src / s).stat().st_size for s in shards)
    parent = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(f"{parent} has {free / 2**30:.1f} GiB free but the BF16 output needs about "
                          f"{needed / 2**30:.1f} GiB; free space or choose another folder")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)
