"""AsyncEngine: the loop on the caller's thread (as `dsserve serve` runs it), outputs handed to the event loop."""

import asyncio
import json
import threading

import pytest

from dsserve.engine.async_engine import AsyncEngine
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.engine.request import SamplingParams


def _collect(async_engine: AsyncEngine, requests: dict[str, list[int]], max_tokens: int, pause_s: float = 0.0):
    """Run the engine on this thread and the requests from an event loop on another; each request's outputs."""
    collected: dict[str, list] = {}

    async def client() -> None:
        async def one(rid: str, prompt: list[int]) -> None:
            collected[rid] = []
            async for o in async_engine.generate(rid, {"prompt_token_ids": prompt},
                                                 SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)):
                collected[rid].append(o)
                await asyncio.sleep(pause_s)  # a handler slower than the engine

        await asyncio.gather(*(one(rid, prompt) for rid, prompt in requests.items()))

    def http_side() -> None:
        try:
            asyncio.run(client())
        finally:
            async_engine.shutdown()

    helper = threading.Thread(target=http_side)
    helper.start()
    async_engine.run()  # returns once the helper has its outputs and shuts the engine down
    helper.join(30)
    return collected


def test_run_steps_on_the_calling_thread_and_streams_every_output(tiny_r1):
    """`dsserve serve` runs the loop on the thread that loaded the model (one OpenMP pool on CPU) while HTTP is
    served from another thread; each stream gets its outputs in order, ending with the whole output, and shutdown
    ends `run`. (A handler that falls behind gets the newest output in place of the ones it missed.)"""
    engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=64))
    stepped_on = set()
    real_step = engine.step

    def step():
        stepped_on.add(threading.current_thread())
        return real_step()

    engine.step = step
    collected = _collect(AsyncEngine(engine), {"a": [1, 2, 3], "b": [4, 5, 6, 7, 8], "c": [9]}, 6)
    assert stepped_on == {threading.current_thread()}
    for rid in "abc":
        lengths = [len(o.outputs[0].token_ids) for o in collected[rid]]
        assert lengths == sorted(set(lengths)) and lengths[-1] == 6 and collected[rid][-1].finished


def test_stream_interval_sends_every_nth_step_plus_first_and_last(tiny_r1):
    """--stream-interval 4 over 10 tokens: outputs after tokens 1, 5, 9 and 10 only (fewer if the handler lags),
    the last one whole; the same tokens as every-step streaming."""
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7, 8]}
    config = build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=64)
    every = _collect(AsyncEngine(LLMEngine(config)), prompts, 10)
    sparse = _collect(AsyncEngine(LLMEngine(config), stream_interval=4), prompts, 10)
    for rid in prompts:
        lengths = [len(o.outputs[0].token_ids) for o in sparse[rid]]
        assert set(lengths) <= {1, 5, 9, 10} and lengths == sorted(set(lengths)) and lengths[-1] == 10
        assert sparse[rid][-1].finished
        assert sparse[rid][-1].outputs[0].token_ids == every[rid][-1].outputs[0].token_ids
        assert sparse[rid][-1].outputs[0].text == every[rid][-1].outputs[0].text


def test_a_lagging_handler_gets_the_newest_output_not_a_backlog(tiny_r1):
    """A handler that takes longer per output than the engine takes per step receives fewer outputs, each the newest
    (cumulative) one, and the last is whole: it does not fall further and further behind."""
    engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=64))
    got = _collect(AsyncEngine(engine), {"a": [1, 2, 3]}, 24, pause_s=0.05)["a"]
    lengths = [len(o.outputs[0].token_ids) for o in got]
    assert lengths == sorted(set(lengths)) and lengths[-1] == 24 and got[-1].finished
    assert len(got) < 24


def test_stream_interval_must_be_positive(tiny_r1):
    engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=8, max_model_len=64))
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(engine, stream_interval=0)


def _events(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines()
            if line.startswith("data:") and line != "data: [DONE]"]


def test_stream_interval_through_the_endpoints_adds_up_to_the_whole_answer(tiny_r1):
    """`--stream-interval 4`: chat (reasoning split, n=2) and completion streams carry several tokens per chunk,
    and add up to exactly the non-streamed answer and usage."""
    from fastapi.testclient import TestClient

    from dsserve.server.app import create_app
    from dsserve.server.state import ServerConfig

    engine = AsyncEngine(LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=128)),
                         stream_interval=4)
    engine.start()
    try:
        client = TestClient(create_app(engine, ServerConfig(served_model_name="m", reasoning_parser="deepseek_r1")))
        chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 21, "temperature": 1.0,
                "seed": 7, "n": 2, "ignore_eos": True}
        whole = client.post("/v1/chat/completions", json=chat).json()
        events = _events(client.post("/v1/chat/completions", json={**chat, "stream": True,
                                                                    "stream_options": {"include_usage": True}}))
        for choice in whole["choices"]:
            deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == choice["index"]]
            reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
            content = "".join(d.get("content") or "" for d in deltas)
            assert reasoning == (choice["message"]["reasoning_content"] or "")
            assert content == (choice["message"]["content"] or "")
            assert sum(1 for d in deltas if d.get("reasoning_content") or d.get("content")) <= 2 * 7  # not 21
        assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == 42

        completion = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        whole = client.post("/v1/completions", json=completion).json()
        events = _events(client.post("/v1/completions", json={**completion, "stream": True}))
        texts = [c["text"] for e in events for c in e["choices"]]
        assert "".join(texts) == whole["choices"][0]["text"]
        assert len(texts) <= 4  # tokens 1, 5, 9, 10
        assert events[-1]["choices"][0]["finish_reason"] == "length"

        # n = 2, the choices ending in different steps (one stops early): each ends once, with its own text.
        for seed in range(200):
            two = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 1.0, "seed": seed, "n": 2,
                   "stop": ["a", "e", "o"]}
            whole = client.post("/v1/completions", json=two).json()
            if len({c["finish_reason"] for c in whole["choices"]}) == 2:
                break
        else:
            pytest.fail("no seed in 200 made one choice stop early and the other run to max_tokens")
        events = _events(client.post("/v1/completions", json={**two, "stream": True}))
        for choice in whole["choices"]:
            mine = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]
    finally:
        engine.shutdown()


def test_an_engine_failure_after_the_end_does_not_replace_a_finished_answer():
    """The finished output is waiting for its handler when the engine dies: the handler still gets the answer.
    An error that arrives first stays, and a later output does not hide it."""
    from dsserve.engine.async_engine import OutputStream
    from dsserve.engine.engine import CompletionOutput, RequestOutput

    def output(finished: bool) -> RequestOutput:
        completion = CompletionOutput(index=0, text="ab", token_ids=[1, 2],
                                      finish_reason="length" if finished else None)
        return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[0], outputs=[completion], finished=finished)

    async def scenario():
        stream = OutputStream(asyncio.get_running_loop())
        stream.set(output(finished=True))
        stream.set(RuntimeError("engine died"))
        got = await stream.get()
        assert got.finished and got.outputs[0].finish_reason == "length"
        stream.set(output(finished=False))
        stream.set(RuntimeError("engine died"))
        with pytest.raises(RuntimeError, match="engine died"):
            await stream.get()
        stream.set(RuntimeError("first"))
        stream.set(output(finished=True))
        with pytest.raises(RuntimeError, match="first"):
            await stream.get()

    asyncio.run(scenario())
