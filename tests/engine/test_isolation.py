"""A failure that belongs to one request (a value that slipped past validation, its detokenizer) ends that request
with an error; the engine and the other requests in the same steps go on, with the tokens they get alone."""

import asyncio
import threading

import pytest

from dsserve.engine.async_engine import AsyncEngine
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.engine.request import SamplingParams
from dsserve.errors import InvalidRequestError, RequestFailedError


@pytest.fixture(scope="module")
def engine(tiny_r1):
    return LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=128))


def _run(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def _params(**fields):
    return SamplingParams(**{"max_tokens": 8, "ignore_eos": True, "temperature": 0.0, **fields})


def test_a_sampler_failure_on_one_row_fails_that_request_alone(engine):
    engine.add_request("alone", [5, 6, 7], _params())
    reference = _run(engine)["alone"].outputs[0].token_ids
    engine.add_request("bad", [5, 6, 7], _params(n=2, temperature=1.0, seed=1))
    engine.add_request("good", [5, 6, 7], _params())
    # a value past validation (as if a new field forgot its check): an id no int64 tensor holds
    for sample in engine.groups["bad"].samples:
        sample.params.logit_bias = {2**70: 1.0}
    finished = _run(engine)
    bad, good = finished["bad"], finished["good"]
    assert bad.error and "sampling" in bad.error and all(c.finish_reason == "error" for c in bad.outputs)
    assert good.error is None and good.outputs[0].token_ids == reference
    assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks or engine.kv_cache.usage == 0.0
    engine.add_request("after", [5, 6, 7], _params())
    assert _run(engine)["after"].outputs[0].token_ids == reference


def test_a_detokenizer_failure_fails_that_request_alone(engine):
    engine.add_request("alone", [9, 10], _params())
    reference = _run(engine)["alone"].outputs[0].token_ids
    engine.add_request("bad", [9, 10], _params())
    engine.add_request("good", [9, 10], _params())

    def broken(token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    engine.groups["bad"].detokenizers[0].append = broken
    finished = _run(engine)
    assert finished["bad"].error and finished["bad"].outputs[0].finish_reason == "error"
    assert finished["good"].outputs[0].token_ids == reference


def test_the_async_engine_raises_request_failed_for_that_stream_only(tiny_r1):
    engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=128))
    async_engine = AsyncEngine(engine)
    results = {}

    async def one(rid, params, corrupt=False):
        stream = async_engine.generate(rid, {"prompt_token_ids": [3, 4, 5]}, params)
        try:
            async for output in stream:
                if corrupt:  # reaches the engine's own params object: the engine thread reads it next step
                    for sample in engine.groups[rid].samples:
                        sample.params.logit_bias = {2**70: 1.0}
                    corrupt = False
                results[rid] = output
        except (RequestFailedError, InvalidRequestError) as e:
            results[rid] = e

    unchecked = _params()
    unchecked.seed = 2**64  # set past the constructor's validation: add_request checks again

    async def client():
        await asyncio.gather(one("bad", _params(max_tokens=30), corrupt=True), one("good", _params(max_tokens=30)),
                             one("seed", unchecked))

    def http_side():
        try:
            asyncio.run(client())
        finally:
            async_engine.shutdown()

    helper = threading.Thread(target=http_side)
    helper.start()
    async_engine.run()
    helper.join(30)
    assert isinstance(results["bad"], RequestFailedError) and "sampling" in str(results["bad"])
    assert results["good"].finished and len(results["good"].outputs[0].token_ids) == 30
    assert isinstance(results["seed"], InvalidRequestError) and results["seed"].param == "seed"
    assert async_engine.dead is None
