"""`dsserve weights verify`: check a checkpoint folder before anyone starts a server on it.

Every shard the index names exists, is readable and has a sane safetensors header; every tensor the index
lists is in its shard; no shard is missing or extra; symlinks are followed and reported; dtypes and FP8
quantization are detected; the tokenizer loads; `model_type` is recognised; an optional sha256 manifest is
written or checked. Each failure names the file and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from dsserve.config import ModelConfig
from dsserve.errors import DsserveError, WeightsError
from dsserve.formats.quantized import checkpoint_reader
from dsserve.models.loader import INDEX_FILE, plain_file_name, read_index

MANIFEST_FILE = "dsserve-manifest.json"


@dataclass
class Report:
    """Lines of the check, in order: (ok, message). `ok` is None for information."""

    lines: list[tuple[bool | None, str]] = field(default_factory=list)

    def ok(self, message: str) -> None:
        self.lines.append((True, message))

    def fail(self, message: str) -> None:
        self.lines.append((False, message))

    def info(self, message: str) -> None:
        self.lines.append((None, message))

    @property
    def passed(self) -> bool:
        return all(ok is not False for ok, _ in self.lines)

    @property
    def failures(self) -> list[str]:
        return [m for ok, m in self.lines if ok is False]


def verify(path: str | os.PathLike, manifest: str | os.PathLike | None = None, write_manifest: bool = False) -> Report:
    report = Report()
    folder = Path(path)
    if not folder.is_dir():
        report.fail(f"{folder} is not a directory; pass the checkpoint folder")
        return report
    quantized = None  # how the config says the weights are quantized, for the tensor summary
    try:
        config = ModelConfig.from_path(folder)
        quant = f", FP8 blocks {config.fp8_block_size}" if config.fp8_block_size else ""
        reader = checkpoint_reader(config.quantization_config)
        if reader is not None:
            quantized = f"{config.quantization_config['quant_method']} quantized (loads as {reader.scheme.name})"
            quant = f", {quantized}"
        report.ok(f"config.json: model_type {config.model_type}, {config.num_hidden_layers} layers{quant}")
    except DsserveError as e:
        report.fail(str(e))
    shards = _expected_shards(folder, report)
    dtypes: Counter[str] = Counter()
    total_bytes = 0
    for shard, names in sorted(shards.items()):
        file = folder / shard
        if not _readable(file, report):
            continue
        total_bytes += file.stat().st_size
        try:
            with safe_open(str(file), "pt") as handle:
                present = set(handle.keys())
                for name in present:
                    dtypes[str(handle.get_slice(name).get_dtype())] += 1
        except Exception as e:
            report.fail(f"{file}: not a valid safetensors file ({e}); the download is truncated or corrupt: fetch it again")
            continue
        missing = sorted(set(names) - present)
        extra = sorted(present - set(names)) if names else []
        if missing:
            report.fail(f"{file}: lacks {len(missing)} tensor(s) the index places there, e.g. {missing[0]}; "
                        "the shard is incomplete or from another revision: download it again")
        elif extra:
            report.fail(f"{file}: holds {len(extra)} tensor(s) the index does not list, e.g. {extra[0]}; "
                        f"the index and the shards are from different revisions")
        else:
            report.ok(f"{shard}: {len(present)} tensors, {file.stat().st_size / 2**20:.1f} MiB")
    if dtypes:
        fp8 = dtypes.get("F8_E4M3", 0)
        summary = ", ".join(f"{n} {d}" for d, n in dtypes.most_common())
        quantized = quantized or ("FP8 block-quantized" if fp8 else "not quantized")
        report.info(f"tensors: {summary}; {quantized}; "
                    f"{total_bytes / 2**30:.2f} GiB in {len(shards)} file(s)")
    _check_tokenizer(folder, report)
    files = sorted(set(shards) | {p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".safetensors"})
    if write_manifest:
        (folder / MANIFEST_FILE).write_text(json.dumps({f: _sha256(folder / f) for f in files if f != MANIFEST_FILE},
                                                       indent=1))
        report.ok(f"wrote {folder / MANIFEST_FILE}")
    if manifest:
        _check_manifest(folder, Path(manifest), report)
    return report


def _expected_shards(folder: Path, report: Report) -> dict[str, list[str]]:
    index = folder / INDEX_FILE
    on_disk = {p.name for p in folder.glob("*.safetensors")} | {p.name for p in folder.iterdir() if p.is_symlink()
                                                                and p.name.endswith(".safetensors")}
    if not index.exists():
        if len(on_disk) == 1:
            return {next(iter(on_disk)): []}
        report.fail(f"{folder} has {len(on_disk)} .safetensors files and no {INDEX_FILE}; "
                    + ("download the weights" if not on_disk else "restore the index from the original checkpoint"))
        return {}
    if not _readable(index, report):
        return {}
    try:
        shards = read_index(index)
    except WeightsError as e:
        report.fail(str(e))
        return {}
    report.ok(f"{INDEX_FILE}: {sum(map(len, shards.values()))} tensors in {len(shards)} shards")
    for extra in sorted(on_disk - set(shards)):
        report.fail(f"{folder / extra}: a shard the index does not name; remove it or restore the matching index")
    return shards


def _readable(file: Path, report: Report) -> bool:
    if file.is_symlink():
        target = Path(os.readlink(file))
        if not file.exists():
            report.fail(f"{file}: a broken symlink to {target}; download the file again or fix the link")
            return False
        report.info(f"{file.name} is a symlink to {file.resolve()}")
    if not file.exists():
        report.fail(f"{file}: missing; download it (the index names it)")
        return False
    if not os.access(file, os.R_OK):
        mode = oct(file.stat().st_mode & 0o777)
        report.fail(f"{file.resolve()}: not readable by this user (mode {mode}); fix with: chmod a+r {file.resolve()}")
        return False
    return True


def _check_tokenizer(folder: Path, report: Report) -> None:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        report.fail(f"{tokenizer_file}: missing; copy the checkpoint's tokenizer files (text prompts need them)")
        return
    try:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
        template = ""
        config_file = folder / "tokenizer_config.json"
        if (folder / "chat_template.jinja").exists() or (
                config_file.exists() and "chat_template" in json.loads(config_file.read_text())):
            template = ", chat template found"
        report.ok(f"tokenizer.json loads: {vocab} tokens{template}")
    except Exception as e:
        report.fail(f"{tokenizer_file}: does not load ({e}); download it again")


def _check_manifest(folder: Path, manifest: Path, report: Report) -> None:
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        report.fail(f"manifest {manifest}: cannot be read ({e})")
        return
    if not isinstance(expected, dict):
        report.fail(f"manifest {manifest}: not a {{file name: sha256}} object; write it again with --write-manifest")
        return
    try:
        for name in expected:
            plain_file_name(manifest, name)  # a manifest lists files in the checkpoint folder, nothing beyond
    except WeightsError as e:
        report.fail(str(e))
        return
    bad = [name for name, digest in expected.items() if not (folder / name).exists() or _sha256(folder / name) != digest]
    if bad:
        report.fail(f"sha256 differs from {manifest} for {len(bad)} file(s), e.g. {bad[0]}; download them again")
    else:
        report.ok(f"sha256 of {len(expected)} file(s) match {manifest}")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
