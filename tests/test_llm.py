"""The offline LLM's lifetime: `shutdown()`, `with LLM(...)`, and release on garbage collection free the model and
the KV cache and stop a tensor-parallel deployment's ranks, so that another LLM starts in the same process."""

import gc
import subprocess
import sys
import weakref

import pytest
import torch.distributed as dist

from dsserve import LLM, SamplingParams
from dsserve.errors import EngineDeadError

PROMPTS = [[5, 17, 33, 9], [100, 7, 250, 3, 8, 8], [42]]
GREEDY = SamplingParams(max_tokens=8, temperature=0)
OPTIONS = dict(num_kv_blocks=64, step_timeout=30, connect_timeout=60)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _rank_processes(llm: LLM) -> list:
    return [proc for _, proc in llm.engine.runner.group.children]


def test_tp2_llms_one_after_another_in_one_process(model_dir):
    """Leaving `with` stops rank 1 and leaves the process group; a second TP=2 LLM then starts and agrees."""
    path = model_dir("qwen2_tied")
    with LLM(path, tensor_parallel_size=2, **OPTIONS) as first:
        children = _rank_processes(first)
        expected = _tokens(first)
    assert children[0].poll() == 0  # rank 1 stopped cleanly on rank 0's STOP
    assert not dist.is_initialized()
    second = LLM(path, tensor_parallel_size=2, **OPTIONS)
    try:
        assert _tokens(second) == expected
    finally:
        second.shutdown()
    second.shutdown()  # twice is fine
    assert not dist.is_initialized()


def test_a_dropped_llm_is_released(model_dir):
    llm = LLM(model_dir("qwen2_tied"), **OPTIONS)
    _tokens(llm)
    runner, model = weakref.ref(llm.engine.runner), weakref.ref(llm.engine.runner.model)
    del llm
    gc.collect()
    assert runner() is None and model() is None


def test_a_dropped_tp2_llm_stops_its_ranks(model_dir):
    """The runner's finalizer holds the process group, not the runner: dropping the LLM frees the model and stops
    rank 1, and the process can start another TP=2 LLM."""
    path = model_dir("qwen2_tied")
    llm = LLM(path, tensor_parallel_size=2, **OPTIONS)
    expected = _tokens(llm)
    children = _rank_processes(llm)
    runner, model = weakref.ref(llm.engine.runner), weakref.ref(llm.engine.runner.model)
    del llm
    gc.collect()
    assert runner() is None and model() is None
    assert children[0].wait(10) == 0
    assert not dist.is_initialized()
    with LLM(path, tensor_parallel_size=2, **OPTIONS) as again:
        assert _tokens(again) == expected


def test_a_tp2_llm_never_shut_down_stops_its_ranks_at_exit(model_dir):
    """`weakref.finalize` runs at interpreter exit too: rank 1 gets its STOP and the program exits 0."""
    script = (f"from dsserve import LLM, SamplingParams\n"
              f"llm = LLM({str(model_dir('qwen2_tied'))!r}, tensor_parallel_size=2, **{OPTIONS!r})\n"
              "llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rank 1: stop received" in done.stderr


def test_shutdown_frees_the_model_and_later_use_fails_clearly(model_dir):
    llm = LLM(model_dir("qwen2_tied"), **OPTIONS)
    model = weakref.ref(llm.engine.runner.model)
    llm.shutdown()
    gc.collect()
    assert model() is None
    for use in (lambda: llm.generate(PROMPTS, GREEDY), lambda: llm.chat([{"role": "user", "content": "hi"}]),
                lambda: llm.engine):
        with pytest.raises(EngineDeadError, match="this LLM was shut down; create a new one"):
            use()
    llm.shutdown()  # twice is fine


def test_a_shut_down_engine_fails_the_call_and_queues_nothing(model_dir):
    """`llm.engine.shutdown()` (the engine-level call) makes the next step fail; the LLM aborts what it queued."""
    llm = LLM(model_dir("qwen2_tied"), **OPTIONS)
    llm.engine.shutdown()
    llm.engine.shutdown()
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate(PROMPTS, GREEDY)
    assert not llm.engine.has_unfinished_requests()
