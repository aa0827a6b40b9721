"""Reduced-precision compute: bf16 and fp16 run every architecture and stay close to fp32."""

import pytest
import torch

from dsserve import LLM, SamplingParams

PROMPT = {"prompt_token_ids": [5, 17, 33, 2, 90, 41, 7, 250, 12, 77, 3]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "qwen2_untied", "llama3"])
def test_low_precision_tracks_fp32(model_dir, name, dtype):
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    ref = LLM(model_dir(name), dtype="float32", num_kv_blocks=16, max_model_len=128).generate(PROMPT, params)[0]
    low = LLM(model_dir(name), dtype=dtype, num_kv_blocks=16, max_model_len=128)
    assert low.engine.runner.kv_caches[0].dtype == getattr(torch, dtype)
    out = low.generate(PROMPT, params)[0]
    ref_alts = ref.outputs[0].logprobs[0][1]
    low_alts = out.outputs[0].logprobs[0][1]
    for token in set(ref_alts) & set(low_alts):
        assert low_alts[token] == pytest.approx(ref_alts[token], abs=0.1)
    many = low.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert len(many.outputs[0].token_ids) == 24


def test_auto_dtype_is_fp32_on_cpu_for_bf16_checkpoints():
    from dsserve.config import resolve_dtype

    assert resolve_dtype("auto", "bfloat16", "cpu") == "float32"
    assert resolve_dtype("auto", "bfloat16", "cuda") == "bfloat16"
    assert resolve_dtype("float16", "bfloat16", "cpu") == "float16"
