"""Block pool, prefix hashing and the scheduler's block accounting."""

import random

import pytest

from dsserve import SamplingParams
from dsserve.config import SchedulerConfig
from dsserve.engine.kv_cache import KVCacheManager
from dsserve.engine.request import Request, RequestStatus
from dsserve.engine.scheduler import Scheduler


def _request(rid: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id=rid, prompt_token_ids=tokens, params=SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=(1,), arrival_index=0, max_total_tokens=len(tokens) + max_tokens)


def _make_cache(num_blocks=8, block_size=4, prefix=True) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, prefix)


def test_allocate_counts_blocks_and_refuses_without_side_effects():
    cache = _make_cache(num_blocks=3)
    a = _request("a", list(range(10)))
    assert cache.allocate_slots(a, 10)  # ceil(10 / 4) = 3 blocks
    assert cache.pool.num_free == 0
    b = _request("b", list(range(100, 102)))
    assert not cache.allocate_slots(b, 2)
    assert cache.block_ids("b") == [] and cache.pool.num_free == 0
    cache.free(a)
    assert cache.pool.num_free == 3


def test_prefix_hit_shares_full_blocks_and_recomputes_last_token():
    cache = _make_cache()
    a = _request("a", list(range(12)))
    cache.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    b = _request("b", list(range(12)))
    hits, num_tokens = cache.get_computed_blocks(b)
    assert num_tokens == 8  # 3 full blocks match, but the last token must be recomputed: 2 blocks
    assert cache.allocate_slots(b, 4, hits)
    assert cache.block_ids("b")[:2] == cache.block_ids("a")[:2]
    assert cache.pool.blocks[cache.block_ids("a")[0]].ref_count == 2
    c = _request("c", list(range(4)) + [99] * 8)  # shares only the first block
    assert cache.get_computed_blocks(c)[1] == 4


def test_chained_keys_do_not_match_the_same_block_after_a_different_prefix():
    cache = _make_cache()
    a = _request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    cache.allocate_slots(a, 9)
    b = _request("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])  # block 1 equal, block 0 not
    assert cache.get_computed_blocks(b)[1] == 0


def test_freed_cached_blocks_are_reused_lru_and_evicted_when_needed():
    cache = _make_cache(num_blocks=4)
    a = _request("a", list(range(9)))
    cache.allocate_slots(a, 9)
    cache.free(a)
    assert cache.pool.num_free == 4
    again = _request("a2", list(range(9)))
    assert cache.get_computed_blocks(again)[1] == 8  # still cached while free
    big = _request("big", list(range(50, 66)))
    assert cache.allocate_slots(big, 16)  # takes every block, evicting the cached ones
    assert cache.get_computed_blocks(_request("a3", list(range(9))))[1] == 0


def test_no_prefix_caching_never_hits():
    cache = _make_cache(prefix=False)
    a = _request("a", list(range(12)))
    cache.allocate_slots(a, 12)
    assert cache.get_computed_blocks(_request("b", list(range(12)))) == ([], 0)


@pytest.mark.parametrize("seed", range(6))
def test_random_mix_returns_every_block(seed):
    """Scheduler + cache without a model: random lengths, sampled tokens, aborts and preemption."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    cache = KVCacheManager(num_blocks=rng.randint(12, 40), block_size=block_size, enable_prefix_caching=seed % 2 == 0)
    sched = Scheduler(SchedulerConfig(max_num_seqs=rng.randint(2, 8), max_num_batched_tokens=rng.randint(8, 64),
                                      max_model_len=1 << 20, enable_chunked_prefill=True, fit_max_model_len=False),
                      cache)
    shared = [rng.randrange(1000) for _ in range(rng.randint(0, 40))]
    live: list[Request] = []
    for i in range(40):
        tokens = shared[: rng.randint(0, len(shared))] + [rng.randrange(1000) for _ in range(rng.randint(1, 30))]
        max_tokens = rng.randint(1, 12)
        if -(-(len(tokens) + max_tokens) // block_size) > cache.num_blocks:
            continue
        r = _request(f"r{i}", tokens, max_tokens)
        sched.add(r)
        live.append(r)
    steps = 0
    while sched.num_unfinished:
        steps += 1
        assert steps < 10_000
        plan = sched.schedule()
        assert plan, "a non-empty queue must always make progress"
        sampled = [rng.choice([1, rng.randrange(2, 1000)]) if rng.random() < 0.1 else rng.randrange(2, 1000)
                   for _ in plan.requests]
        sched.update(plan, sampled)
        if rng.random() < 0.1:
            unfinished = [r for r in live if not r.is_finished]
            if unfinished:
                sched.finish(rng.choice(unfinished), RequestStatus.FINISHED_ABORTED)
        in_use = {b for r in sched.running for b in cache.block_ids(r.request_id)}
        assert cache.pool.num_free + len(in_use) == cache.num_blocks
    assert all(r.is_finished for r in live)
    assert cache.pool.num_free == cache.num_blocks
    assert all(b.ref_count == 0 for b in cache.pool.blocks)
    assert not cache.req_blocks


def test_random_mix_through_the_engine(tiny_r1):
    """Same invariant with the real model, n > 1, aborts and a cache small enough to force preemption."""
    from dsserve import LLM

    llm = LLM(tiny_r1, num_kv_blocks=24, block_size=4, max_model_len=64, max_num_batched_tokens=32)
    engine = llm.engine
    rng = random.Random(0)
    for i in range(24):
        prompt = {"prompt_token_ids": [rng.randrange(10, 200) for _ in range(rng.randint(1, 30))]}
        engine.add_request(str(i), prompt, SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randint(1, 20),
                                                          temperature=1.0, ignore_eos=rng.random() < 0.5))
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        if step % 7 == 0 and engine.groups:
            engine.abort_request(rng.choice(list(engine.groups)))
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks
    assert all(b.ref_count == 0 for b in engine.kv_cache.pool.blocks)
