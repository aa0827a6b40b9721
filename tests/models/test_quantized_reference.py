"""`--quantization` on the torch backend: the weights held quantized, every product through the plain-torch reference
(formats/quantization.py reference_linear). It is what runs on a GPU until the CUDA backend exists, and the twin the
CPU kernels' model path is checked against here."""

import pytest
import torch

from dsserve import LLM, SamplingParams
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.errors import ConfigError
from dsserve.layers.linear import Linear
from dsserve.formats.quantization import QuantizedWeight

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
OPTIONS = dict(num_kv_blocks=64, max_model_len=256)


def _run(llm):
    outs = llm.generate(PROMPTS, PARAMS)
    return [o.outputs[0].token_ids for o in outs], [[e[0] for e in o.outputs[0].logprobs] for o in outs]


@pytest.mark.parametrize("name", ["qwen2_tied", "deepseek_v3"])
@pytest.mark.parametrize("quantization", ["int8", "int4-g64-zp", "w8a8", "fp8"])
def test_torch_backend_holds_quantized_weights(model_dir, name, quantization):
    llm = LLM(model_dir(name), backend="torch", quantization=quantization, **OPTIONS)
    backend, model = llm.engine.runner.backend, llm.engine.runner.model
    assert "quantized " + quantization in backend.describe()
    linears = [m for m in model.modules() if isinstance(m, Linear) and m in backend._quantized]
    assert linears and all(m.weight is None and backend._quantized[m].scheme.name == quantization for m in linears)
    head = backend._quantized[model.lm_head]
    assert isinstance(head, QuantizedWeight) and head.scheme.name == ("w8a8" if quantization == "w8a8" else "int8")
    tokens, logprobs = _run(llm)
    float_tokens, float_logprobs = _run(LLM(model_dir(name), backend="torch", **OPTIONS))
    # a tiny random model's logits are close together: quantization moves them a little, not far
    worst = max(abs(a - b) for got, want in zip(logprobs, float_logprobs) for a, b in zip(got[:1], want[:1]))
    assert worst < 0.5
    assert all(len(t) == 8 for t in tokens)


@pytest.mark.skipif(not cpu_kernels.linear_quant_usable(), reason="the quantized linears need AVX-512")
@pytest.mark.parametrize("name", ["qwen2_untied", "deepseek_v3"])
@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g128-zp"])
def test_cpu_kernels_equal_the_torch_reference(model_dir, name, quantization):
    cpu = _run(LLM(model_dir(name), quantization=quantization, **OPTIONS))
    reference = _run(LLM(model_dir(name), backend="torch", quantization=quantization, **OPTIONS))
    assert cpu[0] == reference[0]
    for got, want in zip(cpu[1], reference[1]):
        assert got == pytest.approx(want, abs=1e-4)


def test_the_cpu_backend_computes_quantized_models_in_float32(model_dir):
    with pytest.raises(ConfigError, match="--quantization int8 on the cpu backend computes in float32"):
        LLM(model_dir("qwen2_tied"), dtype="bfloat16", quantization="int8", **OPTIONS)
    llm = LLM(model_dir("qwen2_tied"), dtype="bfloat16", backend="torch", quantization="int8", **OPTIONS)
    tokens, _ = _run(llm)
    assert all(len(t) == 8 for t in tokens) and llm.engine.config.quantization == "int8"
    assert torch.bfloat16 in {p.dtype for p in llm.engine.runner.model.parameters()}
