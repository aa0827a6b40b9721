"""Streamed chunks written on the event loop while a handler waits (server/direct.py's DirectWriter, the engine's
`on_output`), and the same bytes with --no-direct-writes."""

import asyncio
import contextlib
import json
import re
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from dsserve.engine.async_engine import AsyncEngine, OutputStream
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.server import direct
from dsserve.server.app import create_app
from dsserve.server.direct import SEND_KEY, ChunkWriter, DirectWriter, expose_send
from dsserve.server.state import ServerConfig


def _output(n: int, finished: bool = False):
    return SimpleNamespace(n=n, finished=finished)


async def _drain(stream: OutputStream, got: list, writer: DirectWriter | None = None) -> None:
    """A handler: takes outputs until the finished one (or an error), parking the writer around each wait as
    common.results does."""
    try:
        while True:
            if writer is not None:
                writer.is_parked = True
            try:
                item = await stream.get()
            finally:
                if writer is not None:
                    writer.is_parked = False
            got.append(item.n)
            if item.finished:
                return
    except RuntimeError as e:
        got.append(e)


def test_on_output_sees_every_unfinished_output_and_the_iteration_gets_the_rest_and_the_last():
    """The engine's side: each unfinished output goes to `on_output` first, whether or not the consumer waits; what
    it turns down, and the finished output, go to the iteration."""
    async def scenario():
        offered = []
        stream = OutputStream(asyncio.get_running_loop(), lambda o: offered.append(o.n) or o.n % 2 == 1)
        got = []
        stream.offer(_output(1))  # taken
        stream.offer(_output(2))  # turned down: the iteration's, before any handler waits
        handler = asyncio.create_task(_drain(stream, got))
        await asyncio.sleep(0)
        stream.offer(_output(3))
        stream.offer(_output(4, finished=True))  # never offered
        await handler
        return offered, got

    offered, got = asyncio.run(scenario())
    assert offered == [1, 2, 3] and got == [2, 4]


def test_an_on_output_that_raises_ends_its_own_stream_and_the_others_still_get_theirs():
    async def scenario():
        def broken(o):
            raise RuntimeError("render failed")

        taken = []
        bad = OutputStream(asyncio.get_running_loop(), broken)
        good = OutputStream(asyncio.get_running_loop(), lambda o: taken.append(o.n) or True)
        got_bad, got_good = [], []
        handlers = [asyncio.create_task(_drain(bad, got_bad)), asyncio.create_task(_drain(good, got_good))]
        await asyncio.sleep(0)
        for stream, output in ((bad, _output(1)), (good, _output(1)), (bad, _output(2)), (good, _output(2, True))):
            stream.offer(output)  # a step's delivery: one stream's failure raises nothing here
        await asyncio.gather(*handlers)
        return got_bad, got_good, taken, bad.on_output

    got_bad, got_good, taken, bad_on_output = asyncio.run(scenario())
    assert len(got_bad) == 1 and str(got_bad[0]) == "render failed" and bad_on_output is None
    assert taken == [1] and got_good == [2]


def test_the_writer_writes_while_the_handler_is_parked_and_the_handler_gets_the_last():
    async def scenario():
        cycle = _cycle()
        writer = DirectWriter(ChunkWriter(cycle), lambda o: b"%d" % o.n)
        stream = OutputStream(asyncio.get_running_loop(), writer.take)
        got = []
        handler = asyncio.create_task(_drain(stream, got, writer))
        await asyncio.sleep(0)  # the handler is now parked in get()
        for n in (1, 2, 3):
            stream.offer(_output(n))
        stream.offer(_output(4, finished=True))
        await handler
        return cycle.written, got

    written, got = asyncio.run(scenario())
    assert written == [b"1\r\n1\r\n", b"1\r\n2\r\n", b"1\r\n3\r\n"] and got == [4]


def test_the_handler_gets_outputs_when_it_is_busy_has_one_pending_or_the_connection_cannot_take_it():
    """The ordering rule: nothing is written before the handler has sent what was handed to it."""
    async def scenario():
        cycle = _cycle()
        writer = DirectWriter(ChunkWriter(cycle), lambda o: b"%d" % o.n)
        stream = OutputStream(asyncio.get_running_loop(), writer.take)
        stream.offer(_output(1))  # no handler parked yet: it must see this one
        got = []
        handler = asyncio.create_task(_drain(stream, got, writer))
        await asyncio.sleep(0)  # took 1, parked again
        stream.offer(_output(2))  # written
        cycle.flow.write_paused = True
        stream.offer(_output(3))  # the connection cannot take it: pending for the handler
        cycle.flow.write_paused = False
        stream.offer(_output(4))  # 3 is still pending: 4 replaces it, the writer must not write past it
        await asyncio.sleep(0)
        stream.offer(_output(5, finished=True))
        await handler
        return cycle.written, got

    written, got = asyncio.run(scenario())
    assert written == [b"1\r\n2\r\n"] and got == [1, 4, 5]


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
    assert DirectWriter.of({}, lambda o: b"") is None


def test_a_writer_leaves_outputs_to_the_handler_when_the_connection_cannot_take_one_until_it_parks_again():
    cycle = _cycle(flow=SimpleNamespace(write_paused=True))
    rendered = []
    writer = DirectWriter.of({SEND_KEY: cycle.send}, lambda o: rendered.append(o) or b"x")
    assert writer.take(_output(0)) is False  # not parked: the handler is busy
    writer.is_parked = True
    assert writer.take(_output(1)) is False and rendered == [] and cycle.written == []
    cycle.flow.write_paused = False
    assert writer.take(_output(2)) is False and cycle.written == []  # 1 went to the handler: 2 must follow it
    writer.is_parked = True
    assert writer.take(_output(3)) is True and cycle.written == [b"1\r\nx\r\n"]


@contextlib.contextmanager
def _served(engine: AsyncEngine, **config):
    """`dsserve serve`'s app for `engine` under uvicorn (httptools) on 127.0.0.1; an httpx client to it."""
    app = expose_send(create_app(engine, ServerConfig(served_model_name="m", reasoning_parser="deepseek_r1", **config)))
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
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def writes(monkeypatch):
    """The chunks the direct writers write, as they write them."""
    written = []
    real_write = ChunkWriter.write
    monkeypatch.setattr(direct.ChunkWriter, "write", lambda self, data: written.append(data) or real_write(self, data))
    return written


@pytest.fixture
def live(tiny_r1, writes):
    """A served app, the engine on a thread; counts direct writes."""
    engine = AsyncEngine(LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=128)))
    engine.start()
    try:
        with _served(engine) as client:
            yield client, writes
    finally:
        engine.shutdown()


def test_no_direct_writes_sends_the_same_bytes_through_asgi(tiny_r1, writes):
    """`--no-direct-writes` (ServerConfig.direct_writes False): no chunk is written directly, and the same streamed
    chat (R1 split, n=2, usage) and completion (echo, logprobs) requests give byte for byte the events they give with
    direct writes, but for each response's id and created time. (Each step is slowed so that no handler ever lags:
    a lagging handler merges outputs into fewer chunks, either way.)"""
    llm_engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=64, max_model_len=128))
    real_step = llm_engine.step
    llm_engine.step = lambda: time.sleep(0.03) or real_step()
    engine = AsyncEngine(llm_engine)
    engine.start()
    requests = [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
                                  "temperature": 1.0, "seed": 3, "n": 2, "ignore_eos": True, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                             "echo": True, "logprobs": 2, "stream": True}),
    ]
    try:
        bodies = {}
        for direct_writes in (True, False):
            before = len(writes)
            with _served(engine, direct_writes=direct_writes) as client:
                bodies[direct_writes] = [_stable(client.post(path, json=body).content) for path, body in requests]
            assert (len(writes) > before) == direct_writes
    finally:
        engine.shutdown()
    for with_direct, without in zip(bodies[True], bodies[False]):
        assert with_direct == without and with_direct.endswith(b"data: [DONE]\n\n")


def _stable(body: bytes) -> bytes:
    """A stream's bytes without what differs from one response to the next: its id and created time."""
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb'"id":"[^"]*"', b'"id":""', body))


def _events(text: str) -> list[dict]:
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]


def test_streams_written_directly_add_up_to_the_non_streamed_answer(live):
    """Through uvicorn the steps' outputs are written directly (counted), and the streams still add up to the
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
    """The connection refusing every other direct write (as a paused one does): chunks written directly and by the
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
