"""Offline throughput: N random-token prompts of exact input length, exactly `output_len` tokens each (EOS ignored)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class ThroughputResult:
    num_prompts: int
    input_len: int
    output_len: int
    elapsed_s: float
    num_output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_output_tokens + self.num_prompts * self.input_len) / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_prompts / self.elapsed_s


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    # Ids from 10 upward avoid the special tokens at the start of every DeepSeek/Qwen/Llama vocabulary.
    low = min(10, vocab_size - 1)
    return [{"prompt_token_ids": [rng.randrange(low, vocab_size) for _ in range(input_len)]} for _ in range(num_prompts)]


def run_throughput(llm, num_prompts: int, input_len: int, output_len: int, seed: int = 0, warmup: bool = True) -> ThroughputResult:
    from dsserve.engine.request import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=output_len, ignore_eos=True, seed=None)
    prompts = random_prompts(num_prompts, input_len, llm.engine.model_config.vocab_size, seed)
    if warmup:
        llm.generate(prompts[: min(4, num_prompts)], SamplingParams(max_tokens=4, ignore_eos=True))
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return ThroughputResult(num_prompts, input_len, output_len, elapsed, num_out)
