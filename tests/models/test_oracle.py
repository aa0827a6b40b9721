"""Every architecture against transformers: greedy tokens identical and logprobs close at every step,
alone and in mixed batches, with chunked prefill, prefix-cache hits, preemption, and block sizes 16 and 128."""

import random

import pytest
import torch

import tiny_models
from dsserve import LLM, SamplingParams

MODELS = ["deepseek_v3", "deepseek_v2", "qwen2_tied", "qwen2_untied", "llama3"]
NUM_NEW = 32
TOP = 8  # logprob alternatives compared per step

_REFERENCE: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[torch.Tensor]]] = {}


def _reference(model_dir, name: str, prompt: list[int]):
    key = (name, tuple(prompt))
    if key not in _REFERENCE:
        _REFERENCE[key] = tiny_models.hf_greedy(model_dir(name), prompt, NUM_NEW)
    return _REFERENCE[key]


def _prompts(count: int, seed: int, shared_prefix: int = 0, extra_len: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(2, tiny_models.VOCAB) for _ in range(shared_prefix)]
    lengths = [5, 40, 13, 1, 27, 64, 9, 33, 17, 50][:count]
    return [prefix + [rng.randrange(2, tiny_models.VOCAB) for _ in range(n + extra_len)] for n in lengths]


def _check(model_dir, name: str, llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=TOP)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        ref_tokens, ref_logits = _reference(model_dir, name, prompt)
        completion = output.outputs[0]
        assert completion.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged"
        for step, ((_, alternatives), logits) in enumerate(zip(completion.logprobs, ref_logits)):
            ref_logprobs = logits.log_softmax(-1)
            ids = list(alternatives)
            got = torch.tensor([alternatives[i] for i in ids])
            torch.testing.assert_close(got, ref_logprobs[ids], atol=2e-4, rtol=1e-4, msg=f"step {step}")
    return outputs


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("name", [*MODELS, "llama_bias"])
def test_alone(model_dir, name, block_size):
    llm = LLM(model_dir(name), num_kv_blocks=1024 // block_size, block_size=block_size, max_model_len=512)
    _check(model_dir, name, llm, _prompts(1, seed=1))


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("name", MODELS)
def test_mixed_batch(model_dir, name, block_size):
    llm = LLM(model_dir(name), num_kv_blocks=4096 // block_size, block_size=block_size, max_model_len=512)
    _check(model_dir, name, llm, _prompts(10, seed=2))


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill(model_dir, name, block_size):
    # 7 tokens per step: every prompt above 7 tokens is split, and chunks share steps with decodes.
    llm = LLM(model_dir(name), num_kv_blocks=4096 // block_size, block_size=block_size, max_model_len=512,
              max_num_batched_tokens=7)
    _check(model_dir, name, llm, _prompts(8, seed=3))


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("name", MODELS)
def test_prefix_cache_hits(model_dir, name, block_size):
    llm = LLM(model_dir(name), num_kv_blocks=4096 // block_size, block_size=block_size, max_model_len=512)
    prompts = _prompts(8, seed=4, shared_prefix=150)
    first = _check(model_dir, name, llm, prompts[:1])
    assert first[0].num_cached_tokens == 0
    outputs = _check(model_dir, name, llm, prompts)
    assert all(o.num_cached_tokens >= block_size for o in outputs), [o.num_cached_tokens for o in outputs]


@pytest.mark.parametrize("block_size,num_blocks,extra_len", [(16, 14, 0), (128, 4, 70)])
@pytest.mark.parametrize("name", MODELS)
def test_preemption(model_dir, name, block_size, num_blocks, extra_len):
    # The cache holds a fraction of the batch: running requests that need a new block preempt the newest.
    llm = LLM(model_dir(name), num_kv_blocks=num_blocks, block_size=block_size,
              max_model_len=min(256, num_blocks * block_size))
    _check(model_dir, name, llm, _prompts(8, seed=5, extra_len=extra_len))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_cache.pool.num_free == num_blocks
