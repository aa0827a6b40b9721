"""`dsserve weights verify` and `convert` on tiny checkpoints the tests build (FP8 with partial edge blocks and
scales in another shard), and what they refuse to read or copy from outside the checkpoint folder."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsserve.weights.convert as convert_module
from dsserve.errors import WeightsError
from dsserve.weights.convert import convert_to_bf16
from dsserve.weights.verify import verify


def _quantize(w: torch.Tensor, block: int):
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, block, nc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nr * block, nc * block)[:rows, :cols]
    return q.contiguous(), scale


@pytest.fixture
def fp8_checkpoint(model_dir, tmp_path):
    """The tiny DeepSeek-V3 with 16x16 FP8 blocks (every projection has a partial edge block), 3 shards,
    all scales in the last shard."""
    src = model_dir("deepseek_v3")
    tensors = {}
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        for name in h.keys():
            tensors[name] = h.get_tensor(name)
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and "proj" in name:
            out[name], out[name + "_scale_inv"] = _quantize(t.float(), 16)
        else:
            out[name] = t
    folder = tmp_path / "fp8"
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    names = sorted(out)
    shard_of = {n: 2 if n.endswith("_scale_inv") else i % 2 for i, n in enumerate(names)}
    files = {s: f"model-{s + 1:05d}-of-00003.safetensors" for s in range(3)}
    for s, fname in files.items():
        save_file({n: out[n] for n in names if shard_of[n] == s}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: files[shard_of[n]] for n in names}}))
    return folder, out


def _tokenizer_json() -> str:
    from dsserve.assets.tiny_random import byte_level_tokenizer

    return byte_level_tokenizer().to_str()


def test_converted_weights_equal_the_formula(fp8_checkpoint, tmp_path):
    folder, fp8 = fp8_checkpoint
    assert verify(folder).passed
    out = convert_to_bf16(folder, tmp_path / "bf16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any(n.endswith("_scale_inv") for n in index["weight_map"])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as h:
            got = h.get_tensor(name)
        if name + "_scale_inv" in fp8:
            q, s = fp8[name], fp8[name + "_scale_inv"]
            expected = (q.float() * s.repeat_interleave(16, 0)[: q.shape[0]].repeat_interleave(16, 1)[:, : q.shape[1]])
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, expected.to(torch.bfloat16)), name
        else:
            assert torch.equal(got, fp8[name])
    assert verify(out).passed
    from dsserve import LLM, SamplingParams

    a = LLM(folder, num_kv_blocks=16, max_model_len=64, dtype="bfloat16")
    b = LLM(out, num_kv_blocks=16, max_model_len=64, dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    assert a.generate(prompt, params)[0].outputs[0].token_ids == b.generate(prompt, params)[0].outputs[0].token_ids


def test_interrupted_conversion_is_never_complete_looking_and_resumes(fp8_checkpoint, tmp_path, monkeypatch):
    folder, _ = fp8_checkpoint
    out = tmp_path / "bf16"
    real = convert_module._convert_shard
    calls = []

    def dies_on_second_shard(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(convert_module, "_convert_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_to_bf16(folder, out)
    assert not out.exists()
    partial = out.with_name("bf16.partial")
    assert not verify(out).passed and not verify(partial).passed
    monkeypatch.setattr(convert_module, "_convert_shard", real)
    resumed = []
    monkeypatch.setattr(convert_module, "_convert_shard", lambda *a: (resumed.append(a[1]), real(*a)))
    convert_to_bf16(folder, out)
    assert resumed == ["model-00002-of-00003.safetensors"]  # shard 1 was kept, shard 3 holds only scales
    assert verify(out).passed and not partial.exists()


@pytest.fixture
def sharded(fp8_checkpoint):
    return fp8_checkpoint[0]


def _failure(folder) -> str:
    report = verify(folder)
    assert not report.passed
    return " | ".join(report.failures)


def test_verify_names_a_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    assert "model-00002-of-00003.safetensors: missing" in _failure(sharded)


def test_verify_names_a_tensor_missing_from_its_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00003.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00001-of-00003.safetensors: lacks 1 tensor(s)" in _failure(sharded)


def test_verify_names_an_unreadable_file(sharded, monkeypatch):
    shard = sharded / "model-00001-of-00003.safetensors"
    os.chmod(shard, 0)
    real = os.access
    if os.geteuid() == 0:  # root reads anything: answer as the permission check would for another user
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(shard) else real(p, m))
    try:
        assert "not readable by this user (mode 0o0); fix with: chmod a+r" in _failure(sharded)
    finally:
        os.chmod(shard, 0o644)


def test_verify_names_a_broken_symlink(sharded, tmp_path):
    shard = sharded / "model-00003-of-00003.safetensors"
    shard.unlink()
    shard.symlink_to(tmp_path / "blobs" / "gone")
    assert "a broken symlink to" in _failure(sharded)


def test_verify_names_a_truncated_file(sharded):
    shard = sharded / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert "model-00002-of-00003.safetensors: not a valid safetensors file" in _failure(sharded)


def test_manifest_round_trip(sharded):
    assert verify(sharded, write_manifest=True).passed
    manifest = sharded / "dsserve-manifest.json"
    assert verify(sharded, manifest=manifest).passed
    shard = sharded / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert "sha256 differs" in _failure_with(sharded, manifest)


def _failure_with(folder, manifest) -> str:
    report = verify(folder, manifest=manifest)
    assert not report.passed
    return " | ".join(report.failures)


def test_cli_exit_codes(sharded, tmp_path):
    from typer.testing import CliRunner

    from dsserve.cli import app

    ok = CliRunner().invoke(app, ["weights", "verify", str(sharded)])
    assert ok.exit_code == 0 and "verified" in ok.output
    converted = CliRunner().invoke(app, ["weights", "convert", str(sharded), str(tmp_path / "out")])
    assert converted.exit_code == 0, converted.output
    (sharded / "model-00001-of-00003.safetensors").unlink()
    bad = CliRunner().invoke(app, ["weights", "verify", str(sharded)])
    assert bad.exit_code == 1 and "FAIL" in bad.output


def test_sigkill_midway_then_rerun(fp8_checkpoint, tmp_path):
    """A process killed (SIGKILL) while converting its second shard leaves nothing verify accepts; a re-run finishes."""
    import subprocess
    import sys
    import textwrap

    folder, _ = fp8_checkpoint
    out = tmp_path / "bf16"
    script = textwrap.dedent(f"""
        import os, signal
        import dsserve.weights.convert as c
        real, calls = c._convert_shard, []
        def killed(*args):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        c._convert_shard = killed
        c.convert_to_bf16({str(folder)!r}, {str(out)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9
    assert not out.exists()
    assert not verify(out).passed and not verify(out.with_name("bf16.partial")).passed
    convert_to_bf16(folder, out)
    assert verify(out).passed


def _point_shard_at(folder, shard: str, name: str) -> None:
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path, monkeypatch, where):
    """verify reports it without opening the file; convert refuses before writing anything."""
    evil = tmp_path / "evil.safetensors"
    shutil.copy(sharded / "model-00001-of-00003.safetensors", evil)
    name = "../evil.safetensors" if where == "relative" else str(evil)
    _point_shard_at(sharded, "model-00001-of-00003.safetensors", name)
    import dsserve.weights.verify as verify_module

    opened = []
    real_open = verify_module.safe_open
    monkeypatch.setattr(verify_module, "safe_open", lambda path, *a: (opened.append(path), real_open(path, *a))[1])
    failure = _failure(sharded)
    assert "model.safetensors.index.json names the file" in failure and "not a plain file name" in failure
    assert str(evil) not in opened
    out = tmp_path / "bf16"
    with pytest.raises(WeightsError, match="not a plain file name"):
        convert_to_bf16(sharded, out)
    assert not out.exists() and not out.with_name("bf16.partial").exists()


def test_a_manifest_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"../secret.txt": hashlib.sha256(b"hunter2").hexdigest()}))
    assert "names the file '../secret.txt', which is not a plain file name" in _failure_with(sharded, manifest)


@pytest.fixture
def secret(tmp_path):
    """A file the checkpoint's owner must never see copied: a stand-in for /etc/shadow or ~/.ssh/id_rsa."""
    path = tmp_path / "home" / ".ssh" / "id_rsa"
    path.parent.mkdir(parents=True)
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    return path


@pytest.mark.parametrize("side_file", ["tokenizer.json", "config.json", "id_rsa.pub"])
def test_convert_refuses_a_side_file_linking_outside_the_checkpoint(sharded, secret, tmp_path, side_file):
    link = sharded / side_file
    if side_file == "config.json":  # a JSON secret (cloud credentials, ~/.docker/config.json) would parse
        secret.write_text(json.dumps({"auths": {"registry": {"auth": "c2VjcmV0"}}}))
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    out = tmp_path / "bf16"
    with pytest.raises(WeightsError) as error:
        convert_to_bf16(sharded, out)
    assert f"{link} is a symlink to {secret}, outside the checkpoint" in str(error.value)
    assert not out.exists() and not out.with_name("bf16.partial").exists()  # refused before any shard was written


def test_convert_follows_links_inside_the_checkpoint_and_the_hf_cache_layout(sharded, tmp_path):
    """snapshots/REV/* -> ../../blobs/SHA (relative links, as huggingface_hub makes them), plus a side file linking
    to another inside the folder: converted, every side file copied as a regular file."""
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sharded.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blobs / digest)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (snapshot / "tokenizer.json").unlink()
    shutil.copy(sharded / "tokenizer.json", snapshot / "tokenizer.real.json")
    (snapshot / "tokenizer.json").symlink_to("tokenizer.real.json")
    out = convert_to_bf16(snapshot, tmp_path / "bf16")
    assert verify(out).passed
    assert not any(f.is_symlink() for f in out.iterdir())
    assert (out / "tokenizer.json").read_bytes() == (sharded / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_convert_fsyncs_the_index_config_and_folders(fp8_checkpoint, tmp_path, monkeypatch):
    folder, _ = fp8_checkpoint
    synced, real_fsync = [], os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the synced files")
    monkeypatch.setattr(convert_module.os, "fsync", spy)
    out = convert_to_bf16(folder, tmp_path / "bf16")
    partial = str(tmp_path / "bf16.partial")
    for name in ("model.safetensors.index.json.tmp", "config.json.tmp", "tokenizer.json.tmp"):
        assert f"{partial}/{name}" in synced, name
    assert synced[-2:] == [partial, str(out.parent)]  # the folder's entries, then the rename into place
