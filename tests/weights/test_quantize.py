"""`dsserve weights quantize` on tiny checkpoints the tests write: the folder read back with dsserve's own readers
(formats/quantized.py) holds exactly QuantScheme.quantize of the original weights, the rest is unchanged, the
config is one compressed-tensors' own parser accepts, and an interrupted run resumes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsserve.weights.quantize as quantize_module
from dsserve.errors import ConfigError
from dsserve.formats.quantized import detect_format
from dsserve.formats.quantization import QuantScheme
from dsserve.weights.quantize import quantize_checkpoint

SCHEMES = [QuantScheme(4, 32, False), QuantScheme(4, 64, True), QuantScheme(4, 128, False), QuantScheme.parse("int8"),
           QuantScheme.parse("w8a8")]


def _read(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _read_back(folder):
    """(quantized linears: prefix -> QuantizedWeight, every tensor) as dsserve's readers see the folder."""
    tensors = _read(folder)
    fmt = detect_format(json.loads((folder / "config.json").read_text()))
    linears = {prefix: fmt.convert({suffix: tensors[name] for suffix, name in group.items()}, prefix)
               for prefix, group in fmt.linears(tensors).items()}
    assert all(linear.input_order is None for linear in linears.values())
    return {prefix: linear.weight for prefix, linear in linears.items()}, tensors


def _assert_same(read, expected):
    assert read.scheme == expected.scheme and read.in_features == expected.in_features
    assert torch.equal(read.q, expected.q) and torch.equal(read.scales, expected.scales)
    assert (read.zeros is None) == (expected.zeros is None)
    assert read.zeros is None or torch.equal(read.zeros, expected.zeros)
    assert torch.equal(read.dequantize(), expected.dequantize())


@pytest.fixture(scope="module")
def qwen2_bf16(tmp_path_factory):
    """A tiny Qwen2-named bf16 checkpoint in two shards (K of 64, 96, 128 and 160: each int4 group size divides some
    and not others, for 32 all), with tokenizer and generation files."""
    folder = tmp_path_factory.mktemp("qwen2")
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(50, 64), "model.norm.weight": w(64), "lm_head.weight": w(50, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": w(64), p + "post_attention_layernorm.weight": w(64),
            p + "self_attn.q_proj.weight": w(64, 128), p + "self_attn.q_proj.bias": w(64),
            p + "self_attn.k_proj.weight": w(32, 64), p + "self_attn.k_proj.bias": w(32),
            p + "self_attn.v_proj.weight": w(32, 64), p + "self_attn.v_proj.bias": w(32),
            p + "self_attn.o_proj.weight": w(64, 64),
            p + "mlp.gate_proj.weight": w(160, 128), p + "mlp.up_proj.weight": w(160, 64),
            p + "mlp.down_proj.weight": w(64, 160),
        })
    tensors["model.layers.1.mlp.down_proj.weight"] = w(64, 96)  # shapes need not be consistent here, only varied
    names = sorted(tensors)
    files = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    for file in set(files.values()):
        save_file({n: tensors[n] for n in names if files[n] == file}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                    "hidden_size": 64, "torch_dtype": "bfloat16"}))
    (folder / "tokenizer.json").write_text('{"model": {}}')
    (folder / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    (folder / "generation_config.json").write_text('{"temperature": 0.6}')
    return folder, tensors


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_quantized_folder_reads_back_as_quantize_of_the_original(qwen2_bf16, tmp_path, scheme):
    src, original = qwen2_bf16
    out = quantize_checkpoint(src, tmp_path / "out", scheme)
    linears, tensors = _read_back(out)
    expected_linears = {n.removesuffix(".weight") for n in original if n.endswith("proj.weight")
                        and (scheme.bits == 8 or original[n].shape[1] % scheme.group_size == 0)}
    assert set(linears) == expected_linears and len(linears) >= 4
    for prefix, read in linears.items():
        _assert_same(read, scheme.quantize(original[prefix + ".weight"].float()))
    kept = {n for n in original if n.removesuffix(".weight") not in linears}
    for name in kept:  # embeddings, norms, biases, lm_head and layers with a partial group, as they were
        assert torch.equal(tensors[name], original[name]) and tensors[name].dtype == original[name].dtype
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    partial = sorted(n.removesuffix(".weight") for n in kept if n.endswith("proj.weight"))
    assert quant["ignore"] == sorted(["lm_head", *partial])
    assert quant["format"] == ("int-quantized" if scheme.activations else "pack-quantized")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("scheme", [QuantScheme.parse("w8a8"), QuantScheme(4, 32, True)], ids=lambda s: s.name)
def test_deepseek_v3_experts_are_quantized_routers_and_kv_b_proj_kept(model_dir, tmp_path, scheme):
    """The tiny DeepSeek-V3 (transformers' own layout): routed and shared experts and MLA's projections quantized;
    routers, kv_b_proj and the LM head kept and named in `ignore`; int4 keeps q_b_proj (48 inputs) in float."""
    src = model_dir("deepseek_v3")
    with safe_open(str(src / "model.safetensors"), "pt") as handle:
        original = {name: handle.get_tensor(name) for name in handle.keys()}
    out = quantize_checkpoint(src, tmp_path / "out", scheme)
    linears, tensors = _read_back(out)
    assert {"model.layers.1.mlp.experts.7.down_proj", "model.layers.1.mlp.shared_experts.up_proj"} <= set(linears)
    assert ("model.layers.1.self_attn.q_b_proj" in linears) == (scheme.bits == 8)
    for prefix, read in linears.items():
        _assert_same(read, scheme.quantize(original[prefix + ".weight"].float()))
    kept = {"lm_head", "model.layers.1.mlp.gate", "model.layers.0.self_attn.kv_b_proj"}
    assert not kept & set(linears)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert kept <= set(ignore) and not set(ignore) & set(linears)
    for name, tensor in original.items():
        if name.removesuffix(".weight") not in linears:
            assert torch.equal(tensors[name], tensor)


def test_int4_with_group_128_keeps_layers_with_a_partial_group_in_float(qwen2_bf16, tmp_path):
    src, original = qwen2_bf16
    linears, tensors = _read_back(quantize_checkpoint(src, tmp_path / "out", QuantScheme(4, 128, False)))
    assert "model.layers.0.mlp.down_proj" not in linears  # K = 160
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def test_compressed_tensors_parses_the_config_and_decompresses_the_weights(qwen2_bf16, tmp_path):
    """Other engines read the folder through compressed-tensors: its own config parser accepts the config, and its
    own decompression of each layer gives dsserve's dequantized weight."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src, _ = qwen2_bf16
    for scheme in (QuantScheme(4, 32, False), QuantScheme(4, 32, True), QuantScheme.parse("w8a8")):
        out = quantize_checkpoint(src, tmp_path / scheme.name, scheme)
        parsed = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
        group = parsed.config_groups["group_0"]
        assert parsed.quant_method == "compressed-tensors" and parsed.ignore == ["lm_head"]
        assert group.weights.num_bits == scheme.bits and group.weights.symmetric == (not scheme.zero_point)
        assert (group.input_activations is not None) == scheme.activations
        if scheme.activations:
            assert group.input_activations.dynamic is True and group.input_activations.strategy == "token"
            continue
        linears, tensors = _read_back(out)
        prefix = "model.layers.0.mlp.gate_proj"
        state = {n.removeprefix(prefix + "."): t.float() if n.endswith("weight_scale") else t
                 for n, t in tensors.items() if n.startswith(prefix + ".")}
        own = PackedQuantizationCompressor.decompress(state, group)["weight"]
        assert torch.equal(own, linears[prefix].dequantize())


def test_fp8_source_is_dequantized_then_quantized(tmp_path):
    """A DeepSeek FP8 checkpoint: weights dequantized from their 128 x 128 blocks (scales in another shard), then
    quantized; the scales are dropped and the config's fp8 quantization_config replaced."""
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "fp8"
    folder.mkdir()
    weight = (torch.randn(160, 192, generator=g) * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, generator=g) + 0.5
    embed = torch.randn(20, 192, generator=g).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.up_proj.weight": weight, "model.embed_tokens.weight": embed},
              str(folder / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight_scale_inv": scale}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.mlp.up_proj.weight_scale_inv": "model-00002-of-00002.safetensors"}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))
    out = quantize_checkpoint(folder, tmp_path / "out", QuantScheme(4, 64, False))
    linears, tensors = _read_back(out)
    float_weight = weight.float() * scale.repeat_interleave(128, 0)[:160].repeat_interleave(128, 1)[:, :192]
    _assert_same(linears["model.layers.0.mlp.up_proj"], QuantScheme(4, 64, False).quantize(float_weight))
    assert torch.equal(tensors["model.embed_tokens.weight"], embed)
    assert not any(n.endswith("_scale_inv") for n in tensors)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"


def test_an_interrupted_run_resumes_after_the_shards_already_written(qwen2_bf16, tmp_path, monkeypatch):
    src, original = qwen2_bf16
    real, written = quantize_module._quantize_shard, []

    def dies_on_second_shard(*args):
        if written:
            raise KeyboardInterrupt
        written.append(args[1])
        real(*args)

    monkeypatch.setattr(quantize_module, "_quantize_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "out", QuantScheme.parse("int8"))
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / written[0]).exists()
    resumed = []
    monkeypatch.setattr(quantize_module, "_quantize_shard", lambda *a: (resumed.append(a[1]), real(*a)))
    out = quantize_checkpoint(src, tmp_path / "out", QuantScheme.parse("int8"))
    assert resumed == [s for s in sorted({p.name for p in src.glob("*.safetensors")}) if s != written[0]]
    linears, _ = _read_back(out)
    for prefix, read in linears.items():
        _assert_same(read, QuantScheme.parse("int8").quantize(original[prefix + ".weight"].float()))
    assert not (out / "dsserve-quantize-run.json").exists()


def test_a_resume_with_another_form_is_refused(qwen2_bf16, tmp_path, monkeypatch):
    src, _ = qwen2_bf16

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_module, "_quantize_shard", dies)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "out", QuantScheme.parse("int8"))
    with pytest.raises(ConfigError, match="interrupted run quantizing to int8, not int4-g64"):
        quantize_checkpoint(src, tmp_path / "out", QuantScheme(4, 64, False))


def test_refuses_an_existing_output_and_an_already_quantized_source(qwen2_bf16, tmp_path):
    src, _ = qwen2_bf16
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        quantize_checkpoint(src, tmp_path / "exists", QuantScheme.parse("int8"))
    quantized = quantize_checkpoint(src, tmp_path / "q", QuantScheme.parse("int8"))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(quantized, tmp_path / "again", QuantScheme.parse("int8"))
    shutil.rmtree(quantized)


@pytest.mark.parametrize("args, written", [
    pytest.param(["--to", "int4", "--group-size", "64", "--zero-points"], QuantScheme(4, 64, True), id="int4-g64-zp"),
    pytest.param(["--to", "w8a8"], QuantScheme.parse("w8a8"), id="w8a8"),
    pytest.param(["--to", "int4", "--group-size", "48"], None, id="bad-group"),
    pytest.param(["--to", "int8", "--zero-points"], None, id="zero-points-on-int8"),
    pytest.param(["--to", "fp8"], None, id="fp8"),
])
def test_cli(qwen2_bf16, tmp_path, args, written):
    from typer.testing import CliRunner

    from dsserve.cli import app

    result = CliRunner().invoke(app, ["weights", "quantize", str(qwen2_bf16[0]), str(tmp_path / "out"), *args])
    if written is None:
        assert result.exit_code == 2 and not (tmp_path / "out").exists()
        return
    assert result.exit_code == 0, result.output
    linears, _ = _read_back(tmp_path / "out")
    assert {w.scheme for w in linears.values()} == {written}
