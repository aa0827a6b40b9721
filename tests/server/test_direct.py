"""Streamed chunks written on the event loop while a handler waits (server/direct.py, AsyncEngine's sink)."""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from dsserve.engine.async_engine import AsyncEngine, _deliver, _Stream
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.server import direct
from dsserve.server.app import ServerConfig, create_app
from dsserve.server.direct import SEND_KEY, ChunkWriter, direct_sink, expose_send


def _output(n: int, finished: bool = False):
    return SimpleNamespace(n=n, finished=finished)


async def _drain(stream: _Stream, got: list) -> None:
    """A handler: takes outputs until the finished one (or an error)."""
    try:
        while True:
            item = await stream.get()
            got.append(item.n)
            if item.finished:
                return
    except RuntimeError as e:
        got.append(e)


def test_the_sink_takes_outputs_while_the_handler_waits_and_the_handler_gets_the_last():
    async def scenario():
        sunk = []
        stream = _Stream(asyncio.get_running_loop(), lambda o: sunk.append(o.n) or True)
        got = []
        handler = asyncio.create_task(_drain(stream, got))
        await asyncio.sleep(0)  # the handler is now waiting in get()
        for n in (1, 2, 3):
            stream.offer(_output(n))
        stream.offer(_output(4, finished=True))
        await handler
        return sunk, got

    sunk, got = asyncio.run(scenario())
    assert sunk == [1, 2, 3] and got == [4]


def test_the_handler_gets_outputs_when_it_is_busy_has_one_pending_or_the_sink_refuses():
    async def scenario():
        refuse = {"now": False}
        sunk = []

        def sink(o):
            if refuse["now"]:
                return False
            sunk.append(o.n)
            return True

        stream = _Stream(asyncio.get_running_loop(), sink)
        stream.offer(_output(1))  # no handler waiting yet: it must see this one
        got = []
        handler = asyncio.create_task(_drain(stream, got))
        await asyncio.sleep(0)  # took 1, waiting again
        stream.offer(_output(2))  # the sink's
        refuse["now"] = True
        stream.offer(_output(3))  # refused: pending for the handler
        refuse["now"] = False
        stream.offer(_output(4))  # 3 is still pending: 4 replaces it, the sink must not write past it
        await asyncio.sleep(0)
        stream.offer(_output(5, finished=True))
        await handler
        return sunk, got

    sunk, got = asyncio.run(scenario())
    assert sunk == [2] and got == [1, 4, 5]


def test_a_sink_that_raises_ends_its_own_stream_and_the_step_reaches_the_others():
    async def scenario():
        def broken(o):
            raise RuntimeError("render failed")

        sunk = []
        bad = _Stream(asyncio.get_running_loop(), broken)
        good = _Stream(asyncio.get_running_loop(), lambda o: sunk.append(o.n) or True)
        got_bad, got_good = [], []
        handlers = [asyncio.create_task(_drain(bad, got_bad)), asyncio.create_task(_drain(good, got_good))]
        await asyncio.sleep(0)
        _deliver([(bad, _output(1)), (good, _output(1))])
        _deliver([(good, _output(2, finished=True))])
        await asyncio.gather(*handlers)
        return got_bad, got_good, sunk, bad.sink

    got_bad, got_good, sunk, bad_sink = asyncio.run(scenario())
    assert len(got_bad) == 1 and str(got_bad[0]) == "render failed" and bad_sink is None
    assert sunk == [1] and got_good == [2]


def _cycle(**state) -> RequestResponseCycle:
    cycle = object.__new__(RequestResponseCycle)  # the attributes ChunkWriter reads, as uvicorn keeps them
    written = []
    defaults = dict(response_started=True, chunked_encoding=True, response_complete=False, disconnected=False,
                    flow=SimpleNamespace(write_paused=False), transport=SimpleNamespace(write=written.append))
    for key, value in {**defaults, **state}.items():
        setattr(cycle, key, value)
    cycle.written = written
    return cycle


def test_chunk_writer_frames_chunks_as_uvicorn_and_refuses_when_uvicorn_would_not_write():
    cycle = _cycle()
    writer = ChunkWriter.of({SEND_KEY: cycle.send})
    assert writer is not None and writer.ready()
    writer.write(b"data: {}\n\n")
    assert cycle.written == [b"a\r\ndata: {}\n\n\r\n"]
    for state in ({"response_started": False}, {"chunked_encoding": False}, {"response_complete": True},
                  {"disconnected": True}, {"flow": SimpleNamespace(write_paused=True)}):
        assert not ChunkWriter.of({SEND_KEY: _cycle(**state).send}).ready(), state
    assert ChunkWriter.of({}) is None
    renamed = _cycle()
    del renamed.disconnected  # a uvicorn that keeps its state under other names: the ASGI way, not a failed stream
    assert ChunkWriter.of({SEND_KEY: renamed.send}) is None
    assert ChunkWriter.of({SEND_KEY: lambda message: None}) is None  # not uvicorn's httptools protocol
    assert direct_sink({}, lambda o: b"") is None


def test_a_sink_leaves_an_output_to_the_handler_when_the_connection_cannot_take_it():
    cycle = _cycle(flow=SimpleNamespace(write_paused=True))
    rendered = []
    sink = direct_sink({SEND_KEY: cycle.send}, lambda o: rendered.append(o) or b"x")
    assert sink(_output(1)) is False and rendered == [] and cycle.written == []
    cycle.flow.write_paused = False
    assert sink(_output(2)) is True and cycle.written == [b"1\r\nx\r\n"]


@pytest.fixture
def live(tiny_r1, monkeypatch):
    """`dsserve serve`'s app under uvicorn (httptools) on 127.0.0.1, the engine on a thread; counts direct writes."""
    writes = []
    real_write = ChunkWriter.write
    monkeypatch.setattr(direct.ChunkWriter, "write", lambda self, data: writes.append(data) or real_write(self, data))
    engine = AsyncEngine(LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=128)))
    engine.start()
    app = expose_send(create_app(engine, ServerConfig(served_model_name="m", reasoning_parser="deepseek_r1")))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http="httptools", log_config=None,
                                           access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, writes
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


def _events(text: str) -> list[dict]:
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]


def test_streams_written_directly_add_up_to_the_non_streamed_answer(live):
    """Through uvicorn the steps' outputs are written by the sink (counted), and the streams still add up to the
    non-streamed answers: chat with the R1 split and n=2, completions with echo and logprobs."""
    client, writes = live
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24, "temperature": 1.0,
            "seed": 3, "n": 2, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=chat).json()
    events = _events(client.post("/v1/chat/completions", json={**chat, "stream": True,
                                                              "stream_options": {"include_usage": True}}).text)
    assert len(writes) > 0
    for choice in whole["choices"]:
        deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == (choice["message"]["reasoning_content"] or "")
        assert "".join(d.get("content") or "" for d in deltas) == (choice["message"]["content"] or "")
        assert [c["finish_reason"] for e in events for c in e["choices"]
                if c["index"] == choice["index"] and c["finish_reason"]] == ["length"]
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == 48

    before = len(writes)
    completion = {"model": "m", "prompt": "Hello", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                  "echo": True, "logprobs": 2}
    whole = client.post("/v1/completions", json=completion).json()["choices"][0]
    chunks = [c for e in _events(client.post("/v1/completions", json={**completion, "stream": True}).text)
              for c in e["choices"]]
    assert len(writes) > before
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == whole["logprobs"]["text_offset"]
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["length"]


def test_dsserve_serve_hands_streams_the_servers_own_send(monkeypatch):
    """The app `dsserve serve` gives uvicorn puts uvicorn's `send` in every scope (without it every chunk would take
    the ASGI way, silently slower)."""
    from dsserve.server import launch

    seen = {}

    async def inner(scope, receive, send):
        seen.update(scope)

    monkeypatch.setattr(launch, "create_app", lambda engine, config: inner)

    async def send(message):
        pass

    asyncio.run(launch.asgi_app(None, None)({"type": "http"}, None, send))
    assert seen[SEND_KEY] is send


def test_the_only_middleware_is_the_guard(tiny_r1):
    """Direct writes keep a stream's order only if every middleware passes `send` straight through (app.py): a new
    middleware must be checked against that before it joins this list."""
    from dsserve.server.app import Guard

    engine = AsyncEngine(LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=8, max_model_len=64)))
    app = create_app(engine, ServerConfig(served_model_name="m"))
    assert [m.cls for m in app.user_middleware] == [Guard]


def test_a_completion_choice_that_has_not_moved_gets_no_chunk():
    """n > 1 with prefix caching: choices after the first can start a step later. A step in which a choice got no
    token sends nothing for it, with or without logprobs."""
    from dsserve.engine.engine import CompletionOutput, RequestOutput
    from dsserve.server.common import EventWriter
    from dsserve.server.completions import _Render

    for logprobs in (None, 1):
        render = _Render(EventWriter({"id": "x", "object": "text_completion", "created": 1, "model": "m"}, False),
                         SimpleNamespace(n=2), SimpleNamespace(echo=False, logprobs=logprobs), None)
        first = CompletionOutput(index=0, text="a", token_ids=[7], finish_reason=None,
                                 logprobs=[(-0.5, {7: -0.5})] if logprobs else None)
        waiting = CompletionOutput(index=1, text="", token_ids=[], finish_reason=None, logprobs=[] if logprobs else None)
        events = _events((render(RequestOutput("r", None, [1, 2], [first, waiting], False)) + b"data: [DONE]\n\n").decode())
        assert [c["index"] for e in events for c in e["choices"]] == [0], logprobs


def test_streams_mixing_direct_and_handler_writes_add_up(live, monkeypatch):
    """The connection refusing every other direct write (as a paused one does): chunks from the sink and from the
    handler interleave in one response and still add up, in order, to the non-streamed answer. Choices end in
    different steps (stop strings), n = 3 completions with echo and logprobs, n = 2 chat."""
    client, writes = live
    calls = {"n": 0}

    def ready(self):
        calls["n"] += 1
        return calls["n"] % 2 == 0

    monkeypatch.setattr(direct.ChunkWriter, "ready", ready)
    for seed in range(200):
        body = {"model": "m", "prompt": "Hello", "max_tokens": 14, "temperature": 1.0, "seed": seed, "n": 3,
                "stop": ["a", "e", "o"], "echo": True, "logprobs": 1}
        whole = client.post("/v1/completions", json=body).json()
        if len({c["finish_reason"] for c in whole["choices"]}) == 2:
            break
    else:
        pytest.fail("no seed in 200 made the choices end in different steps")
    before = len(writes)
    chunks = [c for e in _events(client.post("/v1/completions", json={**body, "stream": True}).text)
              for c in e["choices"]]
    assert len(writes) > before and calls["n"] > len(writes) - before  # both ways were taken
    for choice in whole["choices"]:
        mine = [c for c in chunks if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]

    for seed in range(200):
        chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "temperature": 1.0,
                "seed": seed, "n": 2, "stop": ["a", "e"]}
        whole = client.post("/v1/chat/completions", json=chat).json()
        if len({c["finish_reason"] for c in whole["choices"]}) == 2:
            break
    else:
        pytest.fail("no seed in 200 made the chat choices end in different steps")
    events = _events(client.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    for choice in whole["choices"]:
        deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == (choice["message"]["reasoning_content"] or "")
        assert "".join(d.get("content") or "" for d in deltas) == (choice["message"]["content"] or "")
