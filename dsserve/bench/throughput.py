"""Offline throughput: N random-token prompts of exact input length, exactly `output_len` tokens each (EOS ignored),
scheduled by continuous batching; timed by the shared core in timing.py."""

from __future__ import annotations

from dataclasses import dataclass

from dsserve.bench.timing import time_batch


@dataclass
class ThroughputResult:
    num_prompts: int
    input_len: int
    output_len: int
    elapsed_s: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_prompts * self.output_len / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return self.num_prompts * (self.output_len + self.input_len) / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_prompts / self.elapsed_s


def run_throughput(engine, num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                   warmup: bool = True) -> ThroughputResult:
    """Sampled at temperature 1.0 (no top-k / top-p), as vLLM's throughput benchmark does."""
    if warmup:
        time_batch(engine, min(4, num_prompts), min(8, input_len), 4, seed + 1)
    timing = time_batch(engine, num_prompts, input_len, output_len, seed, temperature=1.0)
    return ThroughputResult(num_prompts, input_len, output_len, timing.total_s)
