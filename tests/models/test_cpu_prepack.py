"""oneDNN pre-packed weights on CPU: the same greedy tokens and logprobs as plain F.linear, and a clean fallback."""

import pytest

from dsserve import LLM, SamplingParams
from dsserve.layers.linear import Linear, VocabParallel

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_untied"])
def test_packed_equals_plain(model_dir, name):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    packed = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256)
    plain = LLM(model_dir(name), num_kv_blocks=64, max_model_len=256, cpu_prepack=False)
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
