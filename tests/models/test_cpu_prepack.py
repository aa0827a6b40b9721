"""Pre-packed CPU weights (oneDNN float32, FBGEMM float16): the same greedy tokens and logprobs as plain F.linear
on the same weights, and clean fallbacks."""

import pytest
import torch

from dsserve import LLM, SamplingParams
from dsserve.errors import ConfigError
from dsserve.layers.linear import Linear, VocabParallel, _pack_checked
from dsserve.layers.moe import Experts

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_untied"])
def test_packed_equals_plain(model_dir, name):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    packed = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256)
    plain = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, backend="torch")
    model = packed.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert any(m.packed is not None and m.weight is None for m in linears)
    assert all(m.packed is None for m in plain.engine.runner.model.modules() if isinstance(m, (Linear, VocabParallel)))
    if name == "deepseek_v3":  # attention reads kv_b_proj's weight: it must stay a plain weight
        assert all(layer.self_attn.kv_b_proj.weight is not None for layer in model.layers)
    for a, b in zip(packed.generate(PROMPTS, params), plain.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x == pytest.approx(y, abs=1e-4)


def _representable_copy(src, dst, dtype=torch.float16):
    """The checkpoint with every tensor rounded to `dtype` (still stored as float32): packing it as that is exact."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        save_file({k: v.to(dtype).float() if v.is_floating_point() else v for k, v in load_file(shard).items()}, shard,
                  metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_untied"])
def test_fp16_weights_equal_plain_on_fp16_exact_weights(model_dir, tmp_path, monkeypatch, name):
    from dsserve.backends.cpu import kernels as cpu_kernels

    few_token_calls = []
    real_moe = cpu_kernels.moe_f16
    monkeypatch.setattr(cpu_kernels, "moe_f16", lambda *a: few_token_calls.append(1) or real_moe(*a))
    path = _representable_copy(model_dir(name), tmp_path / name)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    half = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="float16")
    plain = LLM(path, num_kv_blocks=64, max_model_len=256, backend="torch")
    assert half.engine.config.weight_dtype == "float16"
    model = half.engine.runner.model
    model.fused_decode = None  # the module path's kernels here (test_fused_decode.py: the one-call decode)
    packed = [m.packed for m in model.modules() if isinstance(m, Linear) and m.packed is not None]
    assert packed and all(p.weight_dtype == torch.float16 for p in packed)
    assert model.lm_head.packed.weight_dtype == torch.float16
    if name == "deepseek_v3":  # routed experts: one packed pair per expert, the stacked weights dropped
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all(e.packed is not None and e.w13 is None and e.w2 is None for e in experts)
        assert all(e.table is not None for e in experts) == cpu_kernels.linear_f16_usable()
        assert all(layer.self_attn.absorbed is not None for layer in model.layers) == cpu_kernels.linear_f16_usable()  # an untied LM head's plain weight is dropped; the embedding keeps its own
        assert model.lm_head.weight is None and model.embed_tokens.weight is not None
    batches = [PROMPTS, PROMPTS[:1]]  # one sequence: its decode steps take the few-token experts kernel
    for prompts in batches:
        for a, b in zip(half.generate(prompts, params), plain.generate(prompts, params)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x == pytest.approx(y, abs=1e-4)
    if name == "deepseek_v3":
        assert bool(few_token_calls) == cpu_kernels.linear_f16_usable()


def test_weight_beyond_fp16_range_keeps_fp32(caplog):
    weight, bias = torch.randn(32, 16), torch.randn(32)
    weight[3, 5] = 1e6  # fp16 would saturate it to 65504
    packed = _pack_checked(weight, bias, torch.float16)
    assert packed.weight_dtype == torch.float32
    assert "exceeds float16's range" in caplog.text
    x = torch.randn(4, 16)
    assert torch.allclose(packed(x), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-3)


def test_no_fbgemm_falls_back_to_fp32_packing(model_dir, monkeypatch, caplog):
    import dsserve.backends.cpu.kernels as cpu_kernels_module

    real = cpu_kernels_module.packed_weights_unavailable
    monkeypatch.setattr(cpu_kernels_module, "packed_weights_unavailable",
                        lambda dtype: "no FBGEMM here" if dtype == torch.float16 else real(dtype))
    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, weight_dtype="float16")
    packed = [m.packed for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert packed and all(p is not None and p.weight_dtype == torch.float32 for p in packed)
    assert "float16 weights unavailable (no FBGEMM here)" in caplog.text
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_weight_dtype_resolution():
    from dsserve.config import resolve_weight_dtype

    assert resolve_weight_dtype("auto", "bfloat16", "cpu", "float32") == "float16"
    assert resolve_weight_dtype("auto", "float16", "cpu", "float32") == "float16"
    assert resolve_weight_dtype("auto", "float32", "cpu", "float32") == "float32"
    assert resolve_weight_dtype("float16", "float32", "cpu", "float32") == "float16"
    assert resolve_weight_dtype("float32", "bfloat16", "cpu", "float32") == "float32"
    assert resolve_weight_dtype("auto", "bfloat16", "cpu", "bfloat16") == "bfloat16"
    # a CPU with native bf16: a bf16 checkpoint keeps its own values; fp16 and fp32 checkpoints as before
    assert resolve_weight_dtype("auto", "bfloat16", "cpu", "float32", native_bf16=True) == "bfloat16"
    assert resolve_weight_dtype("auto", "float16", "cpu", "float32", native_bf16=True) == "float16"
    assert resolve_weight_dtype("auto", "float32", "cpu", "float32", native_bf16=True) == "float32"
    assert resolve_weight_dtype("bfloat16", "float32", "cpu", "float32") == "bfloat16"
    assert resolve_weight_dtype("auto", "bfloat16", "cuda", "bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="applies only on CPU with --dtype float32"):
        resolve_weight_dtype("float16", "bfloat16", "cuda", "bfloat16")
    with pytest.raises(ConfigError, match="is not one of auto, float32, float16"):
        resolve_weight_dtype("int8", "bfloat16", "cpu", "float32")


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_untied"])
def test_float16_kv_cache_tracks_float32(model_dir, name):
    """A float16 cache (kernel for decode, widened context for prefill): the same greedy tokens as float32 on these
    models, logprobs within fp16 rounding; half the bytes per block."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    full = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256)
    half = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, kv_cache_dtype="float16")
    assert half.engine.runner.kv_caches[0].dtype == torch.float16
    assert half.engine.runner.bytes_per_block * 2 == full.engine.runner.bytes_per_block
    for a, b in zip(half.generate(PROMPTS, params), full.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x == pytest.approx(y, abs=2e-3)


def test_kv_cache_dtype_resolution():
    from dsserve.config import resolve_kv_cache_dtype

    assert resolve_kv_cache_dtype("auto", "cpu", "float32") == "float32"
    assert resolve_kv_cache_dtype("float16", "cpu", "float32") == "float16"
    assert resolve_kv_cache_dtype("auto", "cuda", "bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="is not supported"):
        resolve_kv_cache_dtype("float16", "cuda", "bfloat16")
    with pytest.raises(ConfigError, match="is not one of"):
        resolve_kv_cache_dtype("fp8", "cpu", "float32")


@pytest.mark.skipif(not __import__("dsserve.backends.cpu.kernels", fromlist=["x"]).native_bf16(),
                    reason="needs a CPU with native bf16 (AMX or AVX512-BF16)")
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_untied"])
@pytest.mark.parametrize("kernel", ["dsserve-bf16", "onednn-bf16"])
def test_bf16_weights_track_float32(model_dir, tmp_path, monkeypatch, name, kernel):
    """bfloat16 weights through dsserve's AMX kernel or oneDNN's bf16 GEMM (activations rounded to bf16 for the
    matmul, fp32 elsewhere): the prompt's log-probabilities within bf16 rounding of the float32 model's on the
    same bf16 weights."""
    from dsserve.backends.cpu import kernels as cpu_kernels

    if kernel == "dsserve-bf16" and not cpu_kernels.linear_bf16_usable():
        pytest.skip("needs the bf16 linear kernel (AMX + AVX512-BF16)")
    if kernel == "onednn-bf16":
        monkeypatch.setattr(cpu_kernels, "linear_bf16_usable", lambda: False)
    path = _representable_copy(model_dir(name), tmp_path / name, torch.bfloat16)
    bf16 = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="bfloat16")
    full = LLM(path, num_kv_blocks=64, max_model_len=256, backend="torch")
    packed = [m.packed for m in bf16.engine.runner.model.modules() if isinstance(m, Linear) and m.packed is not None]
    assert packed and all(p.kind == kernel for p in packed)
    if name == "deepseek_v3":  # MLA's absorbed projections: per-head fp16 GEMVs with bf16 weights too
        layers = bf16.engine.runner.model.layers
        assert all(layer.self_attn.absorbed is not None for layer in layers) == cpu_kernels.linear_f16_usable()
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompt = PROMPTS[2] + PROMPTS[0] + PROMPTS[2]
    a, b = bf16.generate([prompt], params)[0], full.generate([prompt], params)[0]
    got = [entry[0] for entry in a.prompt_logprobs[1:]]
    want = [entry[0] for entry in b.prompt_logprobs[1:]]
    # bf16 activations may flip a near-tie (an expert choice on these random weights): most positions agree closely,
    # none is far off (a wrong kernel is off everywhere)
    errors = sorted(abs(x - y) for x, y in zip(got, want))
    assert errors[int(0.9 * len(errors))] < 0.05 and errors[-1] < 0.5, errors
    # and decode (the packed layers at one row per sequence) runs
    out = bf16.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


def test_bf16_weights_without_native_bf16_fall_back_to_fp16(model_dir, monkeypatch, caplog):
    import dsserve.backends.cpu.kernels as cpu_kernels_module

    monkeypatch.setattr(cpu_kernels_module, "native_bf16", lambda: False)
    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, weight_dtype="bfloat16")
    packed = [m.packed for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert packed and all(p is not None and p.weight_dtype == torch.float16 for p in packed)
    assert "bfloat16 weights unavailable (this CPU has no native bf16 matmul" in caplog.text
