"""AsyncEngine: the loop on the caller's thread (as `dsserve serve` runs it), outputs handed to the event loop."""

import asyncio
import threading

from dsserve.engine.async_engine import AsyncEngine
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.engine.request import SamplingParams


def test_run_steps_on_the_calling_thread_and_streams_every_output(tiny_r1):
    """`dsserve serve` runs the loop on the thread that loaded the model (one OpenMP pool on CPU) while HTTP is
    served from another thread; every step's outputs reach each stream, in order, and shutdown ends `run`."""
    engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=64))
    stepped_on = set()
    real_step = engine.step

    def step():
        stepped_on.add(threading.current_thread())
        return real_step()

    engine.step = step
    async_engine = AsyncEngine(engine)
    collected: dict[str, list] = {}

    async def client() -> None:
        async def one(rid: str, prompt: list[int]) -> None:
            outputs = [o async for o in async_engine.generate(rid, {"prompt_token_ids": prompt},
                                                               SamplingParams(max_tokens=6, ignore_eos=True))]
            collected[rid] = outputs

        await asyncio.gather(one("a", [1, 2, 3]), one("b", [4, 5, 6, 7, 8]), one("c", [9]))

    def http_side() -> None:
        try:
            asyncio.run(client())
        finally:
            async_engine.shutdown()

    helper = threading.Thread(target=http_side)
    helper.start()
    async_engine.run()  # returns once the helper has its outputs and shuts the engine down
    helper.join(30)
    assert stepped_on == {threading.current_thread()}
    for rid in "abc":
        lengths = [len(o.outputs[0].token_ids) for o in collected[rid]]
        assert lengths == list(range(1, 7)) and collected[rid][-1].finished
