"""`quantization="int8" | "int4..." | "w8a8"` at load: the CPU backend quantizes every linear, routed expert and the
LM head (int8) as they load and runs them through csrc/linear_quant.c (w8a8: csrc/linear_w8a8.c); greedy tokens and
logprobs equal the plain-torch reference run on the checkpoint quantized and dequantized the same way (w8a8: the
torch backend holding the same quantized weights, each product through `reference_linear`)."""

import shutil

import pytest

from dsserve import LLM, SamplingParams
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.packing import Kind
from dsserve.errors import ConfigError
from dsserve.layers.linear import Linear
from dsserve.layers.moe import Experts
from dsserve.formats.quantization import QuantScheme

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]
# the checkpoint tensors the packer quantizes: every projection but MLA's kv_b_proj (attention reads it as is)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj", "q_b_proj",
               "kv_a_proj_with_mqa")

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_quant_usable(), reason="the quantized linears need AVX-512")
needs_w8a8 = pytest.mark.skipif(not cpu_kernels.linear_w8a8_usable(), reason="the w8a8 linear needs AVX512-VNNI")


def dequantized_copy(src, dst, scheme: QuantScheme):
    """The checkpoint with each weight the packer quantizes replaced by its quantized-then-dequantized values (the
    LM head by int8's). Merged q/k/v, gate/up and expert stacks quantize row by row, so quantizing the parts alone
    gives the same values."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if name == "lm_head.weight":
                tensors[name] = QuantScheme(8).quantize(tensor).dequantize()
            elif name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                tensors[name] = scheme.quantize(tensor).dequantize()
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@needs_kernel
@pytest.mark.parametrize("name", ["qwen2_untied", "deepseek_v3"])
@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g128-zp"])
def test_quantized_equals_reference_on_dequantized_weights(model_dir, tmp_path, name, quantization):
    scheme = QuantScheme.parse(quantization)
    quantized = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, quantization=quantization)
    reference = LLM(dequantized_copy(model_dir(name), tmp_path / name, scheme), num_kv_blocks=64, max_model_len=256,
                    backend="torch")
    assert quantized.engine.config.quantization == quantization
    model, backend = quantized.engine.runner.model, quantized.engine.runner.backend
    kind = Kind.INT8 if scheme.bits == 8 else Kind.INT4
    linears = [m for m in model.modules() if isinstance(m, Linear) and backend.packs.linears.get(m) is not None]
    assert linears and all(backend.packs.linears[m].kind is kind and m.weight is None for m in linears)
    assert backend.packs.linears[model.lm_head].kind is Kind.INT8 and model.lm_head.weight is None
    # decode steps read the quantized panels in one C call (decode_layers.c); DeepSeek's from this float32 checkpoint
    # keep the module path: the fused MLA decoder reads kv_b_proj (not quantized) packed per head in fp16, which only
    # 16-bit weight dtypes pack (tests/backends/test_cpu_fused_decode.py runs it quantized with float16)
    assert (backend.fused is not None) == (name != "deepseek_v3")
    if name == "deepseek_v3":
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all(p.kind is kind for e in experts for pair in backend.packs.experts[e] for p in pair)
        assert all(backend.packs.expert_tables[e].quantized for e in experts)  # moe.c's grouped kernel runs them
        assert all(layer.self_attn.kv_b_proj.weight is not None for layer in model.layers)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    for prompts in (PROMPTS, PROMPTS[:1]):  # several rows per linear, and one (the GEMV)
        for a, b in zip(quantized.generate(prompts, params), reference.generate(prompts, params)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x == pytest.approx(y, abs=1e-4)


@needs_kernel
def test_quantized_model_differs_from_the_float_one(model_dir):
    """The comparison above is not vacuous: int4 changes this model's logprobs."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompt = PROMPTS[2] + PROMPTS[0]
    full = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, backend="torch")
    int4 = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, quantization="int4")
    got = [e[0] for e in int4.generate([prompt], params)[0].prompt_logprobs[1:]]
    want = [e[0] for e in full.generate([prompt], params)[0].prompt_logprobs[1:]]
    assert max(abs(x - y) for x, y in zip(got, want)) > 1e-3


@pytest.mark.parametrize("options,message", [
    (dict(quantization="int3"), "--quantization 'int3' is not supported: the forms are int8, w8a8, fp8, int4"),
    (dict(quantization="int8", dtype="bfloat16"), "--quantization int8 on the cpu backend computes in float32"),
])
def test_unsupported_quantization_is_refused(model_dir, options, message):
    with pytest.raises(ConfigError, match=message):
        LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, **options)


@needs_w8a8
@pytest.mark.parametrize("name", ["qwen2_untied", "deepseek_v3"])
def test_w8a8_equals_reference(model_dir, name):
    """W8A8 end to end (routed experts included, expert by expert): the same greedy tokens and logprobs as the torch
    backend holding the same quantized weights (every product through `reference_linear`), alone and in a batch
    (each token's activations are quantized alone, so the batch does not change them)."""
    quantized = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, quantization="w8a8")
    reference = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, backend="torch", quantization="w8a8")
    model, backend = quantized.engine.runner.model, quantized.engine.runner.backend
    linears = [m for m in model.modules() if isinstance(m, Linear) and backend.packs.linears.get(m) is not None]
    assert linears and all(backend.packs.linears[m].kind is Kind.W8A8 for m in linears)
    assert backend.packs.linears[model.lm_head].kind is Kind.W8A8  # QuantScheme.head
    if name == "deepseek_v3":
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all(p.kind is Kind.W8A8 for e in experts for pair in backend.packs.experts[e] for p in pair)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    for prompts in (PROMPTS, PROMPTS[:1]):  # the AMX tiles (prompts, 5+ rows) and VNNI (decode rows)
        for a, b in zip(quantized.generate(prompts, params), reference.generate(prompts, params)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x == pytest.approx(y, abs=1e-4)


def test_backend_refuses_quantization_without_the_kernels(model_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "linear_quant_usable", lambda: False)
    with pytest.raises(ConfigError, match="--quantization int8 needs dsserve's int8/int4 CPU kernels"):
        LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, quantization="int8")


@needs_kernel
def test_quantization_round_trips_through_the_engine_config(model_dir):
    from dsserve.config import EngineConfig

    llm = LLM(model_dir("qwen2_untied"), num_kv_blocks=16, max_model_len=64, quantization="int4-g64")
    assert EngineConfig.from_json(llm.engine.config.to_json()).quantization == "int4-g64"


@needs_kernel
@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g64-zp"])
def test_plan_sizes_what_the_packer_holds(model_dir, quantization):
    """`dsserve plan --dtype int8|int4...`: the quantized linears' and the int8 LM head's bytes are what the packer
    holds (this model's row counts are whole pairs of 16-row panels and its K whole groups: no padding)."""
    from dsserve.config import ModelConfig
    from dsserve.plan.planner import linear_bytes, count_params

    path = model_dir("qwen2_untied")
    llm = LLM(path, num_kv_blocks=16, max_model_len=64, quantization=quantization)
    model, packs = llm.engine.runner.model, llm.engine.runner.backend.packs
    params = count_params(ModelConfig.from_path(path))
    held = sum(p.data.nbytes for m, p in packs.linears.items() if m is not model.lm_head)
    assert held == linear_bytes(params, quantization)
    assert packs.linears[model.lm_head].data.nbytes == params.head + 4 * params.head_rows
