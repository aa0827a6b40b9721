"""The CPU backend's packed weights (dsserve fp16 / bf16, oneDNN, FBGEMM): the same greedy tokens and logprobs as the
torch reference backend on the same weights, and clean fallbacks."""

import pytest
import torch

from dsserve import LLM, SamplingParams
from dsserve.errors import ConfigError
from dsserve.backends.cpu.packing import Kind, pack_checked
from dsserve.backends.torch import TorchBackend
from dsserve.layers.linear import Linear
from dsserve.layers.moe import Experts

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_untied"])
def test_packed_equals_plain(model_dir, name):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    packed = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256)
    plain = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, backend="torch")
    model, packs = packed.engine.runner.model, packed.engine.runner.backend.packs
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert any(m in packs.linears and m.weight is None for m in linears)
    assert type(plain.engine.runner.backend) is TorchBackend
    assert all(m.weight is not None for m in plain.engine.runner.model.modules() if isinstance(m, Linear))
    if name == "deepseek_v3":  # attention reads kv_b_proj's weight: it must stay a plain weight
        assert all(layer.self_attn.kv_b_proj.weight is not None for layer in model.layers)
    for a, b in zip(packed.generate(PROMPTS, params), plain.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x == pytest.approx(y, abs=1e-4)


def representable_copy(src, dst, dtype=torch.float16):
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
    path = representable_copy(model_dir(name), tmp_path / name)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    half = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="float16")
    plain = LLM(path, num_kv_blocks=64, max_model_len=256, backend="torch")
    assert half.engine.config.weight_dtype == "float16"
    model, backend = half.engine.runner.model, half.engine.runner.backend
    backend.fused = None  # the module path's kernels here (test_cpu_fused_decode.py: the one-call decode)
    fp16 = {Kind.F16, Kind.FBGEMM_F16}
    assert backend.packs.linears and all(p.kind in fp16 for p in backend.packs.linears.values())
    assert backend.packs.linears[model.lm_head].kind in fp16
    if name == "deepseek_v3":  # routed experts: one packed pair per expert, the stacked weights dropped
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all(e in backend.packs.experts and all(m.w13 is None and m.w2 is None for m in e.mlps)
                               for e in experts)
        assert all(e in backend.packs.expert_tables for e in experts) == cpu_kernels.linear_f16_usable()
        absorbed = all(layer.self_attn in backend.packs.absorbed for layer in model.layers)
        assert absorbed == cpu_kernels.linear_f16_usable()
        # an untied LM head's plain weight is dropped; the embedding keeps its own
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
    packed = pack_checked(weight, bias, torch.float16)
    assert packed.kind is Kind.ONEDNN_F32
    assert "exceeds float16's range" in caplog.text
    x = torch.randn(4, 16)
    assert torch.allclose(packed(x), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-3)


def test_no_fbgemm_falls_back_to_fp32_packing(model_dir, monkeypatch, caplog):
    import dsserve.backends.cpu.kernels as cpu_kernels_module

    real = cpu_kernels_module.packed_weights_unavailable
    monkeypatch.setattr(cpu_kernels_module, "packed_weights_unavailable",
                        lambda dtype: "no FBGEMM here" if dtype == torch.float16 else real(dtype))
    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, weight_dtype="float16")
    packs = llm.engine.runner.backend.packs.linears
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(packs[m].kind is Kind.ONEDNN_F32 for m in linears)
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
@pytest.mark.parametrize("kernel", [Kind.BF16, Kind.ONEDNN_BF16])
def test_bf16_weights_track_float32(model_dir, tmp_path, monkeypatch, name, kernel):
    """bfloat16 weights through dsserve's AMX kernel or oneDNN's bf16 GEMM (activations rounded to bf16 for the
    matmul, fp32 elsewhere): the prompt's log-probabilities within bf16 rounding of the float32 model's on the
    same bf16 weights."""
    from dsserve.backends.cpu import kernels as cpu_kernels

    if kernel is Kind.BF16 and not cpu_kernels.linear_bf16_usable():
        pytest.skip("needs the bf16 linear kernel (AMX + AVX512-BF16)")
    if kernel is Kind.ONEDNN_BF16:
        monkeypatch.setattr(cpu_kernels, "linear_bf16_usable", lambda: False)
    path = representable_copy(model_dir(name), tmp_path / name, torch.bfloat16)
    bf16 = LLM(path, num_kv_blocks=64, max_model_len=256, weight_dtype="bfloat16")
    full = LLM(path, num_kv_blocks=64, max_model_len=256, backend="torch")
    packs = bf16.engine.runner.backend.packs
    assert packs.linears and all(p.kind is kernel for p in packs.linears.values())
    if name == "deepseek_v3":  # MLA's absorbed projections: per-head fp16 GEMVs with bf16 weights too
        layers = bf16.engine.runner.model.layers
        assert all(layer.self_attn in packs.absorbed for layer in layers) == cpu_kernels.linear_f16_usable()
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
    packs = llm.engine.runner.backend.packs.linears
    assert packs and all(p.kind in (Kind.F16, Kind.FBGEMM_F16) for p in packs.values())
    assert "bfloat16 weights unavailable (this CPU has no native bf16 matmul" in caplog.text


def test_a_bf16_exact_embedding_is_kept_in_bf16(model_dir, tmp_path, monkeypatch):
    """An untied input embedding whose values are exactly bf16 (a bf16 checkpoint) is held in bf16, half its float32
    bytes, and every row looked up is the float32 row bit for bit; other tables stay float32. With bf16 weights it
    is loaded straight into bf16 (never a float32 copy of the table)."""
    from safetensors.torch import load_file

    from dsserve.backends.cpu.packing import Packer

    arrived = []
    real_pack = Packer._pack

    def pack(self, module, weight_dtype):
        if module is self.embedding:
            arrived.append((module.weight.dtype, weight_dtype))
        real_pack(self, module, weight_dtype)

    monkeypatch.setattr(Packer, "_pack", pack)
    path = representable_copy(model_dir("qwen2_untied"), tmp_path / "bf16", torch.bfloat16)
    llm = LLM(path, num_kv_blocks=16, max_model_len=64)
    backend, model = llm.engine.runner.backend, llm.engine.runner.model
    assert len(arrived) == 1 and (arrived[0][1] != torch.bfloat16 or arrived[0][0] == torch.bfloat16)
    table = backend.packs.embeddings[model.embed_tokens]
    assert table.dtype == torch.bfloat16 and model.embed_tokens.weight is None
    weights = {k: v for shard in path.glob("*.safetensors") for k, v in load_file(shard).items()}
    ids = torch.tensor([0, 5, 17, model.config.vocab_size - 1])
    want = torch.nn.functional.embedding(ids, weights["model.embed_tokens.weight"].float())
    assert torch.equal(model.embed_tokens.embed(ids), want)
    plain = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64)  # float32 values: kept as they are
    assert not plain.engine.runner.backend.packs.embeddings and plain.engine.runner.model.embed_tokens.weight is not None


@pytest.mark.skipif(not __import__("dsserve.backends.cpu.kernels", fromlist=["x"]).native_bf16(),
                    reason="needs a CPU with native bf16 (AMX or AVX512-BF16)")
def test_bf16_packed_weights_are_loaded_straight_into_bf16(model_dir, monkeypatch):
    """With bf16 weights, every weight that is packed is staged in bf16 while it loads (half its float32 bytes):
    the packed layers equal those packed from the float32 staging, and MLA's kv_b_proj stays float32."""
    from dsserve.backends.cpu.packing import Packer

    seen = []
    real_pack = Packer._pack

    def pack(self, module, weight_dtype):
        seen.extend(p.dtype for p in module.parameters(recurse=False) if id(p) in self.staged)
        real_pack(self, module, weight_dtype)

    monkeypatch.setattr(Packer, "_pack", pack)
    staged = LLM(model_dir("deepseek_v3"), num_kv_blocks=16, max_model_len=64, weight_dtype="bfloat16")
    assert seen and set(seen) == {torch.bfloat16}
    model = staged.engine.runner.model
    assert all(layer.self_attn.kv_b_proj.weight.dtype == torch.float32 for layer in model.layers)
    monkeypatch.setattr(Packer, "_stage_in_bf16", lambda self, model: None)
    plain = LLM(model_dir("deepseek_v3"), num_kv_blocks=16, max_model_len=64, weight_dtype="bfloat16")
    for (la, a), (lb, b) in zip(staged.engine.runner.backend.packs.linears.items(),
                                plain.engine.runner.backend.packs.linears.items()):
        assert a.kind is b.kind and torch.equal(a.data, b.data)


@pytest.mark.skipif(not __import__("dsserve.backends.cpu.kernels", fromlist=["x"]).native_bf16(),
                    reason="needs a CPU with native bf16 (AMX or AVX512-BF16)")
def test_a_packing_failure_widens_the_staged_weights_back_to_float32(model_dir, monkeypatch, caplog):
    from dsserve.backends.cpu import packing

    calls = []

    def failing(weight, bias, weight_dtype, scheme=None):
        calls.append(1)
        raise packing.PackingFailed("a kernel that disagrees")

    monkeypatch.setattr(packing, "pack_checked", failing)
    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, weight_dtype="bfloat16")
    assert calls and "the remaining linear layers stay on F.linear" in caplog.text
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears + [model.lm_head])
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4  # on F.linear, over the bf16-rounded weights
