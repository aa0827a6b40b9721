"""`dsserve weights convert`: FP8 block-quantized -> BF16 on the CPU, shard by shard, safe to interrupt.

Output goes to `OUT.partial/` and is renamed to `OUT` only when every shard, the side files and the index
(written last) are in place and fsynced, so an interrupted run (or a power cut) never leaves a complete-looking
folder. A re-run resumes: shards already converted (renamed into place after being fully written) are kept.
Memory holds one shard.

Side files (config.json, tokenizer, generation config...) are copied only from inside the checkpoint: a side
file that is a symlink is followed only when its final target (every link resolved) lies within the source
folder, or directly in a folder that holds the resolved index or a resolved shard. The Hugging Face cache layout
(snapshots/REV/* linking to ../../blobs/, where the index and shards are too) and a folder of links to another
copy of the checkpoint pass; `tokenizer.json -> /etc/shadow` or `-> ~/.ssh/id_rsa` stops the conversion before
any shard is written, naming the link, so no such file lands in an output meant to be shared.
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
    shards = checkpoint_files(src)
    files = side_files(src, shards)
    if "config.json" not in files:
        raise ConfigError(f"{src / 'config.json'} is missing; copy the checkpoint's config.json there")
    config = json.loads(files["config.json"].read_text())
    block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
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
    _copy_side_files(files, staging)
    index = {"metadata": {"total_size": sum((staging / s).stat().st_size for s in set(weight_map.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(staging / INDEX_FILE, json.dumps(index, indent=1))
    fsync_dir(staging)  # every entry durable before the rename makes the folder look complete
    staging.rename(out)
    fsync_dir(out.parent)
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
    tmp.unlink(missing_ok=True)  # a leftover from a killed run, or a link: replaced, never written through
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(staging / shard)


def side_files(src: Path, shards: dict[str, list[str]]) -> dict[str, Path]:
    """File name -> the real file to copy, for every side file; a link leading outside the checkpoint (see the
    module docstring) is a WeightsError naming it."""
    root = src.resolve()
    homes = {(src / name).resolve().parent for name in [*shards, INDEX_FILE] if (src / name).exists()}
    files: dict[str, Path] = {}
    for file in sorted(src.iterdir()):
        if file.suffix == ".safetensors" or file.name == INDEX_FILE or not file.is_file():
            continue
        target = file.resolve()
        if not (target.is_relative_to(root) or target.parent in homes):
            raise WeightsError(
                f"{file} is a symlink to {target}, outside the checkpoint ({root}, or where its index and shards "
                "are); dsserve does not copy it into the converted folder. If that file really belongs to the "
                f"checkpoint, replace the link with a copy of it (cp --remove-destination {target} {file}); "
                "otherwise delete the link"
            )
        files[file.name] = target  # copy what was checked, not the link (which could change meanwhile)
    return files


def _copy_side_files(side_files: dict[str, Path], staging: Path) -> None:
    """config.json without quantization_config (else engines expect FP8), tokenizer and generation files."""
    for name, file in side_files.items():
        if name == "config.json":
            config = json.loads(file.read_text())
            config.pop("quantization_config", None)
            config["torch_dtype"] = "bfloat16"
            write_atomic(staging / "config.json", json.dumps(config, indent=2))
        else:
            write_atomic(staging / name, file)


def _check_disk(src: Path, out: Path, shards: dict[str, list[str]]) -> None:
    """BF16 is about twice the FP8 bytes; refuse to start when the output's disk cannot hold that."""
    needed = 2 * sum((src / s).stat().st_size for s in shards)
    parent = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(f"{parent} has {free / 2**30:.1f} GiB free but the BF16 output needs about "
                          f"{needed / 2**30:.1f} GiB; free space or choose another folder")


def write_atomic(path: Path, data: str | Path) -> None:
    """All of `data` (a text, or a file's bytes) at `path`, or nothing: written beside it, fsynced, renamed over
    it. A leftover `.tmp` or a link planted in the staging folder is removed or replaced, never written through."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
        if isinstance(data, Path):
            with open(data, "rb") as source:
                shutil.copyfileobj(source, f, 1 << 24)
        else:
            f.write(data.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
