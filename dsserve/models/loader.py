"""Read a checkpoint folder's safetensors (one file or index + shards), dequantize FP8 blocks, convert other
pre-quantized linears (formats/quantized.py), name every failure."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from dsserve.config import ModelConfig
from dsserve.errors import WeightsError
from dsserve.formats.quantization import QuantizedWeight
from dsserve.formats.quantized import ConvertedLinear, checkpoint_reader, convert_slice, fp8_block_weight

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# safetensors maps a whole shard; every page read through the mapping stays in this process's resident set until the
# file is closed, so a 5 GB shard read to the end would add 5 GB to the peak while the weights are being copied out.
# Reopening the shard after this many bytes bounds that to about this much (the tensors are copies, not views).
_REMAP_BYTES = 256 * 2**20
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Map each shard file name to the tensor names it must hold (from the index), or list a lone file's tensors."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        return read_index(index)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"no *.safetensors files in {folder}; download the checkpoint's weights there "
            "(.bin / .pth checkpoints are not supported: convert them to safetensors first)"
        )
    if len(files) > 1:
        raise WeightsError(
            f"{folder} has {len(files)} .safetensors files but no {INDEX_FILE}; restore the index file from the "
            "original checkpoint so dsserve knows which shard holds which tensor"
        )
    return {files[0]: []}


def read_index(index: Path) -> dict[str, list[str]]:
    """Shard file name -> tensor names, from a `model.safetensors.index.json`.

    Every shard name must be a plain file name beside the index: a crafted `../x` or `/etc/x` would make the
    loader read, and `weights convert` write, outside the checkpoint folder. Symlinked shards are fine (the
    Hugging Face cache links each file into blobs/): the check is on the names, not on where links lead.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except PermissionError as e:
        raise WeightsError(f"{index} is not readable ({e.strerror}); fix with: chmod a+r {index}") from e
    except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bad UTF-8
        raise WeightsError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e}") from e
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index} is not a valid safetensors index: 'weight_map' must map tensor names to "
                           f"shard file names, not be a {type(weight_map).__name__}")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(plain_file_name(index, shard), []).append(name)
    return shards


def plain_file_name(listing: Path, name: object) -> str:
    """`name` if it is a plain file name (no folder part), else a WeightsError naming `listing`, the file that
    lists it."""
    if isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0"):
        return name
    raise WeightsError(
        f"{listing} names the file {name!r}, which is not a plain file name (it is empty, '..', an absolute path "
        "or has a path separator) and dsserve reads only files directly in the checkpoint folder; restore "
        f"{listing.name} from the original checkpoint, or fix that entry to the file's bare name"
    )


def iter_checkpoint(
    config: ModelConfig, dtype: torch.dtype | None, slices: dict[str, tuple] | None = None,
    keep_quantized: bool = False,
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight | ConvertedLinear]]:
    """Yield (name, tensor) for every weight in the checkpoint, in `dtype`; None: float tensors as stored (the
    model's loader converts each into its parameter: a bf16 table loaded into a bf16 parameter never passes through
    a float32 copy of itself).

    With `slices` (name -> index, as a model's `checkpoint_slices()` gives), only those tensors are read
    and only their slice (safetensors reads just those bytes): a tensor-parallel rank never loads what
    belongs to another rank. FP8 weights (`float8_e4m3fn` with a `*_scale_inv` beside them, possibly in
    another shard) come out dequantized (then sliced); with `keep_quantized`, as a `QuantizedWeight` of the
    stored bytes and scales instead where they can (formats/quantized.py `fp8_block_weight`): the model's loader
    hands those to the backend as they are (models/base.py). The multi-token-prediction layers (index >=
    num_hidden_layers) are skipped.

    A checkpoint another tool quantized (formats/quantized.py `checkpoint_reader`: compressed-tensors, AWQ, GPTQ,
    w8a8_int8) holds each quantized linear as several tensors (e.g. `qweight`, `qzeros`, `scales`): they come out
    as one `<prefix>.weight`, converted to a QuantizedWeight (its slice cut on the format's own boundaries before
    converting), or a ConvertedLinear where the layer must reorder its inputs (GPTQ desc_act), whatever
    `keep_quantized` says; the model's loader keeps or dequantizes it as it does FP8 weights.
    """
    folder = Path(config.path)
    shards = checkpoint_files(folder)
    reader = checkpoint_reader(config.quantization_config)
    linears: dict[str, dict[str, str]] = {}  # a quantized linear's prefix -> {suffix: tensor name}
    member_of: dict[str, str] = {}  # each tensor of a quantized linear -> its prefix
    locations: dict[str, str] = {}  # tensor name -> shard
    if reader is not None:
        for shard in shards:
            if not shards[shard]:  # a lone file: its tensors are listed by the file itself
                shards[shard] = sorted(_open_shard(folder / shard).keys())
            locations.update((name, shard) for name in shards[shard])
        linears = reader.linears(locations)
        member_of = {name: prefix for prefix, group in linears.items() for name in group.values()}
    scale_locations = {
        name: shard for shard, names in shards.items() for name in names if name.endswith("_scale_inv")
    }
    open_files: dict[str, object] = {}
    skipped: list[str] = []
    try:
        for shard in sorted(shards):
            handle = _open_shard(folder / shard)
            open_files[shard] = handle
            mapped = 0  # bytes read through this mapping of the shard
            present = set(handle.keys())
            expected = shards[shard] or sorted(present)
            for name in expected:
                if name not in present:
                    raise WeightsError(
                        f"tensor {name} is listed in {folder / INDEX_FILE} under {shard} but that file does not "
                        "contain it; the shard is incomplete or from another revision: download it again"
                    )
                if name.endswith("_scale_inv") or _is_mtp(name, config):
                    continue
                if name in member_of:  # read with the rest of its linear, when its marker tensor comes
                    prefix = member_of[name]
                    target = f"{prefix}.weight"
                    if not name.endswith("." + reader.marker):
                        continue
                    if slices is not None and target not in slices:
                        skipped.append(target)
                        continue
                    parts = {}
                    for suffix, part in linears[prefix].items():
                        if locations[part] not in open_files:
                            open_files[locations[part]] = _open_shard(folder / locations[part])
                        parts[suffix] = _get_tensor(open_files[locations[part]], part, folder / locations[part])
                        mapped += parts[suffix].nbytes if locations[part] == shard else 0
                    if mapped > _REMAP_BYTES:  # (see _REMAP_BYTES)
                        handle = open_files[shard] = _open_shard(folder / shard)
                        mapped = 0
                    yield target, convert_slice(reader, prefix, parts, slices.get(target, ()) if slices else ())
                    del parts
                    continue
                if slices is not None and name not in slices:
                    skipped.append(name)
                    continue
                index = slices.get(name, ()) if slices is not None else ()
                tensor = _get_tensor(handle, name, folder / shard, index)
                mapped += tensor.nbytes
                if mapped > _REMAP_BYTES:  # let go of the pages read so far (see _REMAP_BYTES)
                    handle = open_files[shard] = _open_shard(folder / shard)
                    mapped = 0
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_name = name + "_scale_inv"
                    scale_shard = scale_locations.get(scale_name, shard if scale_name in present else None)
                    if scale_shard is None:
                        raise WeightsError(
                            f"FP8 tensor {name} in {shard} has no {scale_name}; the checkpoint is incomplete: "
                            "download the shard holding the scales again"
                        )
                    if scale_shard not in open_files:
                        open_files[scale_shard] = _open_shard(folder / scale_shard)
                    scale = _get_tensor(open_files[scale_shard], scale_name, folder / scale_shard)
                    block = config.fp8_block_size or (128, 128)
                    kept = fp8_block_weight(tensor, scale, block, index) if keep_quantized else None
                    if kept is not None:
                        yield name, kept
                        continue
                    tensor = dequantize_fp8_blocks(tensor, scale, block, dtype or torch.float32)
                    tensor = tensor[index] if index else tensor
                yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    finally:
        open_files.clear()
    if skipped:
        logger.info("skipped %d checkpoint tensors this rank does not use (e.g. %s)", len(skipped),
                    ", ".join(skipped[:3]))


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """W[i, j] = q[i, j] * scale_inv[i // bm, j // bn]; edge blocks may be partial (e.g. 576 rows / 128)."""
    rows, cols = weight.shape
    bm, bn = block
    expected = (-(-rows // bm), -(-cols // bn))
    if tuple(scale_inv.shape) != expected:
        raise WeightsError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} with "
            f"{bm}x{bn} blocks (expected {expected}); the checkpoint is inconsistent"
        )
    scale = scale_inv.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]  # (rows, cols)
    return (weight.float() * scale).to(dtype)


def _is_mtp(name: str, config: ModelConfig) -> bool:
    match = _LAYER_RE.match(name)
    return match is not None and int(match.group(1)) >= config.num_hidden_layers


def _open_shard(path: Path):
    if not path.exists():
        target = f" (a symlink to {os.readlink(path)}, which is missing)" if path.is_symlink() else ""
        raise WeightsError(f"checkpoint shard {path} is missing{target}; download it or fix the link")
    if not os.access(path, os.R_OK):
        raise WeightsError(
            f"checkpoint shard {path.resolve()} is not readable by this user; fix with: chmod a+r {path.resolve()}"
        )
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"checkpoint shard {path} is not a valid safetensors file ({e}); download it again") from e


def _get_tensor(handle, name: str, path: Path, index: tuple = ()) -> torch.Tensor:
    """The tensor, or only its `index` slice (FP8 tensors are read whole: their scales cover blocks)."""
    try:
        if index and handle.get_slice(name).get_dtype() not in ("F8_E4M3", "F8_E5M2"):
            return handle.get_slice(name)[index]
        return handle.get_tensor(name)
    except Exception as e:
        raise WeightsError(f"tensor {name} in {path} cannot be read ({e}); the file is truncated: download it again") from e
