"""One timing core for `bench perf`, `bench latency` and `bench throughput`: run a batch of exact-length requests
through the in-process engine and time every step (mindie/perf_csv.py turns the timings into MindIE's CSV)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from dsserve.profiling import PROFILER


@dataclass
class BatchTiming:
    batch_size: int
    input_len: int
    output_len: int
    total_s: float
    first_token_s: float  # from start until every request of the batch has its first token (the prefill)
    decode_steps_s: list[float]  # every later step

    @property
    def decode_step_s(self) -> float:
        return sum(self.decode_steps_s) / len(self.decode_steps_s) if self.decode_steps_s else 0.0


def time_batch(engine, batch_size: int, input_len: int, output_len: int, seed: int = 0,
               temperature: float = 0.0, profile: bool = False) -> BatchTiming:
    """`batch_size` random prompts of exactly `input_len` tokens, exactly `output_len` new tokens each (EOS ignored).

    Ids start at 10, above the special tokens at the start of every DeepSeek/Qwen/Llama vocabulary.
    `profile`: collect the decode steps' sections in `dsserve.profiling.PROFILER` (see `profile_rows`)."""
    from dsserve.engine.request import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    low = min(10, vocab - 1)
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_tokens=output_len, ignore_eos=True)
    ids = [f"bench-{seed}-{i}" for i in range(batch_size)]
    for request_id in ids:
        prompt = [rng.randrange(low, vocab) for _ in range(input_len)]
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    started = time.perf_counter()
    first_token_at = None
    steps: list[float] = []
    have_first: set[str] = set()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        if first_token_at is None:
            have_first.update(o.request_id for o in outputs if o.outputs[0].token_ids)
            if len(have_first) == batch_size:
                first_token_at = now
                if profile:
                    PROFILER.start(_synchronizer(engine))
        else:
            steps.append(now - step_start)
    total = time.perf_counter() - started
    PROFILER.stop()
    return BatchTiming(batch_size, input_len, output_len, total, (first_token_at or started) - started, steps)


def _synchronizer(engine):
    device = getattr(engine.runner, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        return lambda: torch.cuda.synchronize(device)
    return None
