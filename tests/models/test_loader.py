"""Checkpoint loading: shards + index, symlinks, FP8 block dequantization, MTP skipping, and named failures."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models
from dsserve import LLM, SamplingParams
from dsserve.config import ModelConfig
from dsserve.errors import ConfigError, WeightsError
from dsserve.models.loader import dequantize_fp8_blocks

PROMPT = {"prompt_token_ids": [5, 17, 33, 2, 90, 41, 7, 250, 12]}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _greedy(path, **options):
    return LLM(path, num_kv_blocks=32, max_model_len=256, **options).generate(PROMPT, GREEDY)[0].outputs[0].token_ids


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _copy_side_files(src, dst):
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def _write_sharded(tensors: dict, folder, num_shards: int, placement=None):
    """Write tensors over num_shards files with an index; `placement(name) -> shard` overrides round-robin."""
    names = sorted(tensors)
    shard_of = {n: (placement(n) if placement else i % num_shards) for i, n in enumerate(names)}
    files = {s: f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors" for s in range(num_shards)}
    for s, fname in files.items():
        save_file({n: tensors[n].contiguous() for n in names if shard_of[n] == s}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {n: files[shard_of[n]] for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_index_and_symlinks_load_identically(model_dir, tmp_path):
    src = model_dir("qwen2_untied")
    expected = tiny_models.hf_greedy(src, PROMPT["prompt_token_ids"], 16)[0]
    assert _greedy(src) == expected
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _copy_side_files(src, sharded)
    _write_sharded(_tensors(src), sharded, 4)
    assert _greedy(sharded) == expected
    linked = tmp_path / "linked"  # the Hugging Face cache layout: every file a symlink into blobs/
    linked.mkdir()
    for f in sharded.iterdir():
        (linked / f.name).symlink_to(f)
    assert _greedy(linked) == expected


def test_fp8_block_dequant_matches_manual_edges():
    torch.manual_seed(0)
    weight = (torch.randn(300, 200) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2) + 0.5
    got = dequantize_fp8_blocks(weight, scale, (128, 128), torch.float32)
    expected = torch.empty(300, 200)
    row_block = torch.arange(300) // 128
    for j in range(200):  # column by column, straight from the definition
        expected[:, j] = weight[:, j].float() * scale[row_block, j // 128]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(WeightsError, match="does not match"):
        dequantize_fp8_blocks(weight, torch.ones(2, 2), (128, 128), torch.float32)


def _quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization: per block amax/448, padded edge blocks."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, block, nc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0  # (nr, nc)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nr * block, nc * block)[:rows, :cols]
    return q.contiguous(), scale


@pytest.mark.parametrize("block", [128, 16])
def test_fp8_checkpoint_equals_its_dequantized_twin(model_dir, tmp_path, block):
    """FP8 weights + scales (some in another shard) + an MTP layer load as the dequantized checkpoint does in HF."""
    src = model_dir("deepseek_v3")
    tensors = _tensors(src)
    fp8, dequantized = {}, {}
    for name, t in tensors.items():
        is_linear = t.dim() == 2 and "proj" in name
        if is_linear:
            q, s = _quantize(t.float(), block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequantized[name] = dequantize_fp8_blocks(q, s, (block, block), torch.float32)
        else:
            fp8[name] = dequantized[name] = t
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "self_attn.kv_b_proj.weight"):
        fp8[f"model.layers.3.{name}"] = torch.randn(7, 5)  # MTP layer: must be skipped, whatever its shape
    config = json.loads((src / "config.json").read_text())
    fp8_dir, twin_dir = tmp_path / "fp8", tmp_path / "twin"
    for folder in (fp8_dir, twin_dir):
        folder.mkdir()
        _copy_side_files(src, folder)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [block, block]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    _write_sharded(fp8, fp8_dir, 3, placement=lambda n: 2 if n.endswith("_scale_inv") else hash(n) % 2)
    save_file(dequantized, str(twin_dir / "model.safetensors"))
    expected = tiny_models.hf_greedy(twin_dir, PROMPT["prompt_token_ids"], 16)[0]
    assert _greedy(fp8_dir) == expected
    assert _greedy(fp8_dir, dtype="bfloat16")  # dequantizes straight to the compute dtype


@pytest.fixture
def broken(model_dir, tmp_path):
    """A sharded copy of a tiny Llama, to break in each test."""
    src = model_dir("llama3")
    folder = tmp_path / "broken"
    folder.mkdir()
    _copy_side_files(src, folder)
    _write_sharded(_tensors(src), folder, 3)
    return folder


def test_missing_shard_is_named(broken):
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model-00002-of-00003.safetensors is missing"):
        _greedy(broken)


def test_dangling_symlink_is_named(broken, tmp_path):
    shard = broken / "model-00001-of-00003.safetensors"
    target = tmp_path / "elsewhere.safetensors"
    shard.rename(target)
    shard.symlink_to(target)
    target.unlink()
    with pytest.raises(WeightsError, match="a symlink to .*elsewhere.safetensors, which is missing"):
        _greedy(broken)


def test_unreadable_shard_names_the_fix(broken, monkeypatch):
    shard = broken / "model-00003-of-00003.safetensors"
    real_access = os.access
    # Tests may run as root, which reads any file: simulate the permission check's answer.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(shard) else real_access(p, mode))
    with pytest.raises(WeightsError, match=r"not readable by this user; fix with: chmod a\+r"):
        _greedy(broken)


def test_tensor_listed_but_absent_is_named(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00003.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"model.layers.0.mlp.extra.weight is listed .* does not contain it"):
        _greedy(broken)


def test_tensor_missing_everywhere_is_named(model_dir, tmp_path):
    src = model_dir("llama3")
    folder = tmp_path / "missing"
    folder.mkdir()
    _copy_side_files(src, folder)
    tensors = _tensors(src)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"lacks 1 tensor\(s\) the model needs: model.layers.1.self_attn.k_proj.weight"):
        _greedy(folder)


def test_corrupt_shard_is_named(broken):
    (broken / "model-00001-of-00003.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="model-00001-of-00003.safetensors is not a valid safetensors file"):
        _greedy(broken)


def test_shape_mismatch_blames_the_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="config.json implies"):
        _greedy(broken)


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="'mixtral' is not supported; dsserve runs deepseek_v3, deepseek_v2, qwen2, llama"):
        ModelConfig.from_path(tmp_path)


def test_not_a_folder_and_no_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_path(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json is missing"):
        ModelConfig.from_path(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_path(tmp_path)


def test_no_weights_at_all(tmp_path, model_dir):
    _copy_side_files(model_dir("llama3"), tmp_path)
    with pytest.raises(WeightsError, match="no \\*.safetensors files"):
        _greedy(tmp_path)


def test_real_deepseek_config_fields_are_read():
    """The R1 config.json as published (old `rope_scaling` keys, FP8 quantization_config)."""
    raw = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
        "moe_layer_freq": 1, "rope_theta": 10000, "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    }
    c = ModelConfig.from_dict(raw)
    from dsserve.layers.rotary import attention_scale

    assert c.fp8_block_size == (128, 128) and c.rope.rope_type == "yarn" and c.rope.factor == 40
    assert attention_scale(c.qk_head_dim, c.rope) == pytest.approx(0.135234, abs=1e-6)
    assert c.kv_cache_elements_per_token == 576 * 61
    assert [c.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]


@pytest.mark.parametrize("where", ["../evil.safetensors", "absolute"])
def test_shard_names_leaving_the_folder_are_refused_before_any_read(broken, tmp_path, monkeypatch, where):
    """An index naming a shard outside its folder (a valid safetensors file waits there) is refused: nothing is read."""
    index_file = broken / "model.safetensors.index.json"
    evil = tmp_path / "evil.safetensors"
    shutil.copy(broken / "model-00001-of-00003.safetensors", evil)
    name = "../evil.safetensors" if where == "../evil.safetensors" else str(evil)
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: name if v == "model-00001-of-00003.safetensors" else v
                           for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    import dsserve.models.loader as loader

    opened = []
    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda path, *a, **k: (opened.append(path), real_open(path, *a, **k))[1])
    with pytest.raises(WeightsError) as error:
        _greedy(broken)
    message = str(error.value)
    assert str(index_file) in message and repr(name) in message and "not a plain file name" in message
    assert "restore model.safetensors.index.json" in message
    assert opened == []


@pytest.mark.parametrize("name", [
    pytest.param("", id="empty"), pytest.param(".", id="dot"), pytest.param("..", id="dotdot"),
    pytest.param("sub/model.safetensors", id="separator"), pytest.param("..\\model.safetensors", id="backslash"),
    pytest.param("/etc/passwd", id="absolute"), pytest.param(None, id="not-a-string"),
])
def test_index_shard_name_must_be_a_plain_file_name(tmp_path, name):
    from dsserve.models.loader import checkpoint_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(WeightsError, match="not a plain file name"):
        checkpoint_files(tmp_path)


def test_index_plain_names_through_symlinks_still_load(tmp_path):
    """The check is on names: a folder symlink and shard symlinks (the Hugging Face cache) pass."""
    from dsserve.models.loader import checkpoint_files

    blobs, real = tmp_path / "blobs", tmp_path / "real"
    blobs.mkdir()
    real.mkdir()
    (blobs / "abc123").write_bytes(b"")
    (real / "model-1.safetensors").symlink_to("../blobs/abc123")
    (real / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    (tmp_path / "linked").symlink_to(real)
    assert checkpoint_files(tmp_path / "linked") == {"model-1.safetensors": ["w"]}


def test_each_module_is_reported_once_when_its_weights_are_complete(model_dir):
    """load_weights calls on_loaded(module) once per module holding weights, right after its last tensor: a backend
    packs it then, so loading holds one layer's float32 weights at a time."""
    from dsserve.models.loader import iter_checkpoint
    from dsserve.models.registry import model_class

    config = ModelConfig.from_path(model_dir("deepseek_v3"))
    model = model_class(config)(config, 64, torch.float32)
    seen, complete = [], []

    def on_loaded(module):
        params = [p for p in module.parameters(recurse=False) if getattr(p, "sources", None)]
        complete.append(all(not torch.equal(p, torch.full_like(p, -7.0)) for p in params))
        seen.append(module)

    for p in model.parameters():
        p.data.fill_(-7.0)  # what a parameter holds until its tensors arrive
    model.load_weights(iter_checkpoint(config, torch.float32, model.checkpoint_slices()), on_loaded=on_loaded)
    holders = [m for m in model.modules() if any(getattr(p, "sources", None) for p in m.parameters(recurse=False))]
    assert len(seen) == len(set(seen)) == len(holders) and set(seen) == set(holders)
    assert all(complete)


def test_reading_in_small_mappings_gives_the_same_model(model_dir, monkeypatch):
    """The loader reopens a shard every few hundred MB so that the pages it read leave the resident set; with a
    reopen after every tensor the model is the same."""
    from dsserve.models import loader

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    prompt = [[5, 17, 33, 9, 100, 7]]
    want = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64).generate(prompt, params)[0].outputs[0]
    monkeypatch.setattr(loader, "_REMAP_BYTES", 1)
    got = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64).generate(prompt, params)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
