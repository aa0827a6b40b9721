"""One engine's run of compare.py's legs (`--shape`), in a fresh process of that engine's own interpreter.

    python benchmarks/legs_probe.py dsserve|vllm CHECKPOINT SPEC.json SPAWNED_AT

SPEC.json holds the engine's options and the token ids of every leg (compare.py writes it); SPAWNED_AT is the
parent's time.time() just before it started this process. The probe loads the engine, serves a 1-token request
(start-up to the first token), runs a short warm-up, then the legs in order: batch 1 (prefill and decode timed
apart), a batch of prompts decoded together, one long prompt's prefill. Every leg drives the engine's own
add_request / step loop and notes when each request's first token and its last one arrive.

Lines to the parent start with "@legs " and carry JSON. After the "loaded" line and after the "done" line the
probe waits for a line on stdin, so that the parent can read the peak RSS of the probe's processes while they are
alive (and reset it after loading, so the run's peak is the run's own). vLLM runs this file as its main module in
spawned workers too, hence the __main__ guard; the file imports neither dsserve nor compare at module level.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass


@dataclass
class Timing:
    started: float  # perf_counter() when the requests were added
    first_tokens: list[float]  # perf_counter() when each request's first output token arrived
    finished: float  # perf_counter() when the last request finished

    @property
    def all_first_token_s(self) -> float:
        """From the start until every request has its first token: the batch's prefill."""
        return max(self.first_tokens) - self.started

    @property
    def total_s(self) -> float:
        return self.finished - self.started


class DsserveEngine:
    def __init__(self, path: str, options: dict):
        from dsserve import LLM, SamplingParams

        self._params = SamplingParams
        self.llm = LLM(path, **options)
        engine = self.llm.engine
        self.num_kv_tokens = engine.kv_cache.num_blocks * engine.kv_cache.block_size

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self._params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.llm.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    def step(self) -> list[tuple[str, int, bool]]:
        """(request id, output tokens so far, finished) of every request that moved."""
        return [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in self.llm.engine.step()]

    def has_unfinished(self) -> bool:
        return self.llm.engine.has_unfinished_requests()


class VllmEngine:
    def __init__(self, path: str, options: dict):
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._params = SamplingParams
        self._delta = RequestOutputKind.DELTA  # each step's new tokens, as a stream gets them
        self.llm = LLM(model=path, skip_tokenizer_init=True, **options)
        self.engine = self.llm.llm_engine
        cache = self.engine.vllm_config.cache_config
        self.num_kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        self._num_tokens: dict[str, int] = {}

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self._params(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                              output_kind=self._delta)
        self._num_tokens[request_id] = 0
        self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    def step(self) -> list[tuple[str, int, bool]]:
        moved = []
        for o in self.engine.step():
            self._num_tokens[o.request_id] += len(o.outputs[0].token_ids)
            moved.append((o.request_id, self._num_tokens[o.request_id], o.finished))
        return moved

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()


ENGINES = {"dsserve": DsserveEngine, "vllm": VllmEngine}


def main() -> None:
    engine_name, path, spec_path, spawned_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    spec = json.loads(open(spec_path).read())
    prompts, out = spec["prompts"], spec["output_lens"]

    engine = ENGINES[engine_name](path, spec["options"])
    load_s = time.time() - spawned_at
    _timed(engine, [prompts["startup"]], 1)
    startup_s = time.time() - spawned_at
    _tell("loaded", load_s=load_s, startup_s=startup_s, num_kv_tokens=engine.num_kv_tokens)

    _timed(engine, prompts["warmup"], 4)
    one = _timed(engine, [prompts["batch1"]], out["batch1"])
    batch = _timed(engine, prompts["batched"], out["batched"])
    prefill = _timed(engine, [prompts["prefill"]], 1)
    num_batched = len(prompts["batched"])
    _tell("done",
          batch1_first_token_ms=1000 * one.all_first_token_s,
          batch1_decode_tok_s=(out["batch1"] - 1) / (one.total_s - one.all_first_token_s),
          batched_tok_s=num_batched * out["batched"] / batch.total_s,
          batched_decode_tok_s=num_batched * (out["batched"] - 1) / (batch.total_s - batch.all_first_token_s),
          prefill_tok_s=len(prompts["prefill"]) / prefill.total_s)


_request_ids = itertools.count()


def _timed(engine, prompts: list[list[int]], max_tokens: int) -> Timing:
    """Run `prompts` to exactly `max_tokens` output tokens each (EOS ignored, greedy), noting the arrivals."""
    ids = [f"leg-{next(_request_ids)}" for _ in prompts]
    started = time.perf_counter()  # before adding: vLLM's engine process starts on a request as it arrives
    for request_id, prompt in zip(ids, prompts):
        engine.add(request_id, prompt, max_tokens)
    first_tokens: dict[str, float] = {}
    num_outputs: dict[str, int] = {}
    while engine.has_unfinished():
        for request_id, num_tokens, finished in engine.step():
            if num_tokens and request_id not in first_tokens:
                first_tokens[request_id] = time.perf_counter()
            if finished:
                num_outputs[request_id] = num_tokens
    finished_at = time.perf_counter()
    wrong = {i: n for i, n in num_outputs.items() if n != max_tokens}
    if wrong or len(num_outputs) != len(ids):
        raise RuntimeError(f"asked for {max_tokens} tokens each, got {num_outputs}")
    return Timing(started, [first_tokens[i] for i in ids], finished_at)


def _tell(event: str, **fields) -> None:
    """One line to the parent, then (for the RSS readings) wait until it answers."""
    print("@legs " + json.dumps({"event": event, **fields}), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
