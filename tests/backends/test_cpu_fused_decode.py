"""Decode steps through every layer in one C call (backends/cpu/csrc/decode_layers.c: dense Llama / Qwen2 layers, DeepSeek's
MLA + MoE layers): the same kernels as the module path in the same order, so the same bits; prefill and mixed steps
keep the module path."""

import pytest
import torch

from dsserve import LLM, SamplingParams
from dsserve.backends.cpu import kernels as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.linear_f16_usable(), reason="needs the fp16 linear kernel (AVX2 + F16C)")

# Ragged prompts; 40 new tokens cross block boundaries (block size 16) at different steps for each sequence.
PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]


NEEDS_BF16 = pytest.mark.skipif(not cpu_kernels.linear_bf16_usable(), reason="needs the bf16 linear kernel (AMX + AVX512-BF16)")


NEEDS_QUANT = pytest.mark.skipif(not cpu_kernels.linear_quant_usable(), reason="needs the int8/int4 kernels (AVX-512)")


def _quantized(name, quantization, kv_cache_dtype="auto"):
    """--quantization (float32 compute): every linear and routed expert int8 / int4, read by linear_quant.c. DeepSeek
    with --weight-dtype float16, as a bf16 checkpoint resolves it: kv_b_proj (not quantized) gets the per-head fp16
    packing the fused MLA decoder reads (a float32 one keeps the module path)."""
    weight_dtype = "float16" if name.startswith("deepseek") else "auto"
    return pytest.param(name, weight_dtype, kv_cache_dtype, quantization, marks=NEEDS_QUANT,
                        id=f"{name}-{quantization}-{kv_cache_dtype}")


# DeepSeek: batch 3 x top-3 of 8 experts takes the sorted per-expert path, batch 1 the few-token experts kernel
# (quantized experts: moe.c's grouped kernel for both)
@pytest.mark.parametrize("name, weight_dtype, kv_cache_dtype, quantization", [
    ("qwen2_untied", "float16", "auto", None), ("llama_bias", "float16", "auto", None),
    ("qwen2_tied", "float16", "float16", None),
    pytest.param("qwen2_untied", "bfloat16", "auto", None, marks=NEEDS_BF16),
    ("deepseek_v3_rope16", "float16", "auto", None), ("deepseek_v3_rope16", "float16", "float16", None),
    ("deepseek_v3_rope16_no_q_lora", "float16", "auto", None),
    pytest.param("deepseek_v3_rope16", "bfloat16", "auto", None, marks=NEEDS_BF16),
    ("deepseek_v2_rope16", "float16", "auto", None), ("deepseek_v2_lite_rope16", "float16", "float16", None),
    _quantized("qwen2_untied", "int8"), _quantized("qwen2_untied", "int4"),
    _quantized("llama_bias", "int4-g64-zp", "float16"),
    _quantized("deepseek_v3_rope16", "int8"), _quantized("deepseek_v3_rope16", "int4"),
    _quantized("deepseek_v3_rope16_no_q_lora", "int4-g128-zp"), _quantized("deepseek_v2_rope16", "int4", "float16"),
])
def test_fused_decode_gives_the_module_paths_bits(model_dir, monkeypatch, name, weight_dtype, kv_cache_dtype,
                                                  quantization):
    # no prefix caching: the second run's prompts must be computed as the first's were
    llm = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, weight_dtype=weight_dtype,
              kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False, quantization=quantization)
    backend = llm.engine.runner.backend
    fused = backend.fused
    assert fused is not None and fused.step.weights_quant == (quantization is not None)
    calls = []
    monkeypatch.setattr(backend, "fused", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=3)
    for prompts in (PROMPTS, PROMPTS[:1]):  # a batch, and one sequence (attention split over heads)
        calls.clear()
        with_fused = llm.generate(prompts, params)
        assert calls and max(calls) == len(prompts)  # decode steps took it (prefill steps do not)
        monkeypatch.setattr(backend, "fused", None)
        plain = llm.generate(prompts, params)
        monkeypatch.setattr(backend, "fused", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
        for a, b in zip(with_fused, plain):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].logprobs == b.outputs[0].logprobs  # bit for bit


@pytest.mark.parametrize("name", ["qwen2_untied", "deepseek_v3_rope16"])
def test_not_fused_where_a_layer_is_not_in_the_fp16_kernel(model_dir, name):
    """float32 weights (oneDNN-packed) or no packing at all: decode keeps the module path."""
    assert LLM(model_dir(name), num_kv_blocks=16, max_model_len=64).engine.runner.backend.fused is None
    plain = LLM(model_dir(name), num_kv_blocks=16, max_model_len=64, weight_dtype="float16", backend="torch")
    assert not hasattr(plain.engine.runner.backend, "fused")


def test_not_fused_with_a_router_without_a_c_kernel(model_dir, tmp_path):
    """A sigmoid router without noaux_tc (no C kernel for it): decode keeps the module path."""
    import json
    import shutil

    path = tmp_path / "sigmoid_greedy"
    shutil.copytree(model_dir("deepseek_v3_rope16"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "topk_method": "greedy"}))
    llm = LLM(path, num_kv_blocks=16, max_model_len=64, weight_dtype="float16")
    assert llm.engine.runner.backend.fused is None


@pytest.mark.parametrize("name", ["deepseek_v3_rope16", "deepseek_v2_rope16"])
def test_fused_mla_decode_tracks_transformers(model_dir, tmp_path, name):
    """DeepSeek V3 and V2 on fp16-exact weights through the one-call decode: transformers' greedy tokens."""
    from tiny_models import hf_greedy
    from test_cpu_packing import representable_copy

    path = representable_copy(model_dir(name), tmp_path / name)
    llm = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="float16")
    assert isinstance(llm.engine.runner.backend.fused, cpu_kernels.MLADecoder)
    prompt = [7, 8, 9, 10, 11, 200, 3]
    expected, _ = hf_greedy(path, prompt, 24)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected


def test_fused_decode_tracks_transformers(model_dir, tmp_path):
    """On fp16-exact weights the fused path is the float32 model: transformers' greedy tokens."""
    from tiny_models import hf_greedy
    from test_cpu_packing import representable_copy

    path = representable_copy(model_dir("llama3"), tmp_path / "llama3")
    llm = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="float16")
    assert llm.engine.runner.backend.fused is not None
    prompt = [7, 8, 9, 10, 11, 200, 3]
    expected, _ = hf_greedy(path, prompt, 24)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected


def test_profile_shows_the_fused_call(model_dir):
    from dsserve.profiling import PROFILER, profile_rows

    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=32, max_model_len=128, weight_dtype="float16")
    PROFILER.start()
    try:
        llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        PROFILER.stop()
    rows = {label.strip(): ms for label, ms, _ in profile_rows()}
    assert 0 < rows["of which all layers in one C call"] < rows["model forward"]


def test_fused_decoder_refuses_caches_it_was_not_built_over(model_dir):
    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, weight_dtype="float16")
    fused = llm.engine.runner.backend.fused
    other = [cache.clone() for cache in llm.engine.runner.kv_caches]
    x = torch.zeros(1, llm.engine.runner.model.config.hidden_size)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="built over other KV caches"):
        fused(x, one, one, one.view(1, 1), one + 1, other)


@pytest.mark.parametrize("projection", ["kv_a_proj_with_mqa", "q_b_proj", "o_proj"])
def test_a_linear_left_on_another_kernel_refuses_the_fused_decode(model_dir, tmp_path, caplog, projection):
    """One linear of one DeepSeek layer kept in float32 (a weight beyond float16's range): the fused MLA decoder
    would read a NULL pointer for it, so it is refused; decode takes the module path and gives the torch
    reference's tokens."""
    from safetensors.torch import load_file, save_file
    from test_cpu_packing import representable_copy

    path = representable_copy(model_dir("deepseek_v3_rope16"), tmp_path / "model")
    name = f"model.layers.1.self_attn.{projection}.weight"
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name][0, 0] = 70000.0  # beyond float16's 65504: that linear keeps float32 (oneDNN)
            save_file(tensors, shard, metadata={"format": "pt"})
    llm = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="float16")
    assert "exceeds float16's range" in caplog.text
    assert llm.engine.runner.backend.fused is None
    reference = LLM(path, num_kv_blocks=64, max_model_len=256, backend="torch")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    for a, b in zip(llm.generate(PROMPTS, params), reference.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x == pytest.approx(y, abs=1e-3)
