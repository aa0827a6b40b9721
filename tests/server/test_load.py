"""Many concurrent streams, clients that vanish mid-stream, and an engine that dies."""

import asyncio
import time

import httpx
import openai
import pytest

from conftest import Server

MODEL = "DeepSeek-R1"


def test_64_concurrent_streams_complete(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i} " * (i % 5 + 1)}], max_tokens=16 + i % 8,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, temperature=1.0)
        text, usage = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += (choice.delta.content or "") + (getattr(choice.delta, "reasoning_content", None) or "")
            usage = chunk.usage or usage
        return usage.completion_tokens, 16 + i % 8

    async def run():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(run())
    assert all(got == want for got, want in results)


def test_disconnecting_clients_leave_nothing_behind(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}

    async def leave_early():
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                    if seen >= 4:
                        return  # close the connection mid-stream

    async def non_stream_leave():
        async with httpx.AsyncClient(timeout=0.5) as client:
            try:
                await client.post(server.url + "/v1/chat/completions", json={**body, "stream": False})
            except httpx.TimeoutException:
                pass

    async def run():
        await asyncio.gather(*(leave_early() for _ in range(12)), *(non_stream_leave() for _ in range(4)))

    asyncio.run(run())
    deadline = time.time() + 15
    while time.time() < deadline:
        m = server.metrics()
        if (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                and m["dsserve:kv_cache_free_blocks"] == m["dsserve:kv_cache_total_blocks"]):
            break
        time.sleep(0.2)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["dsserve:kv_cache_free_blocks"] == m["dsserve:kv_cache_total_blocks"]
    assert m["vllm:kv_cache_usage_perc"] == 0


def test_engine_death_answers_errors_and_exits_nonzero(tiny_r1):
    s = Server(tiny_r1, env={"DSSERVE_FAULT_AFTER_STEPS": "3"})
    try:
        body = {"model": "tiny-r1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
        assert s.proc.wait(20) != 0
    finally:
        s.stop()


def test_engine_death_mid_stream_sends_error_then_done(tiny_r1):
    s = Server(tiny_r1, env={"DSSERVE_FAULT_AFTER_STEPS": "5"})
    try:
        body = {"model": "tiny-r1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200
        assert '"internal_server_error"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert s.proc.wait(20) != 0
    finally:
        s.stop()


def test_a_vanished_stream_is_aborted_not_run_to_its_end(server):
    """Both endpoints: a client that closes a stream after a few tokens gets its request aborted and its blocks
    freed, not generated to max_tokens (4 x 480 tokens if it were), and counted as finished_reason "abort"."""
    requests = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "long"}]}),
                ("/v1/completions", {"prompt": "long"})]

    async def leave_early(path: str, body: dict):
        body = {"model": MODEL, "max_tokens": 480, "ignore_eos": True, "stream": True, **body}
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", server.url + path, json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        return

    def aborted() -> float:  # server.metrics() keeps one label set per name: read this one's line
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before, aborted_before = server.metrics()["vllm:generation_tokens_total"], aborted()

    async def run():
        await asyncio.gather(*(leave_early(path, body) for path, body in requests for _ in range(2)))

    asyncio.run(run())
    deadline = time.time() + 15
    while time.time() < deadline:
        m = server.metrics()
        if m["vllm:num_requests_running"] == 0 and m["dsserve:kv_cache_free_blocks"] == m["dsserve:kv_cache_total_blocks"]:
            break
        time.sleep(0.1)
    assert m["vllm:num_requests_running"] == 0 and m["dsserve:kv_cache_free_blocks"] == m["dsserve:kv_cache_total_blocks"]
    assert m["vllm:generation_tokens_total"] - before < 4 * 480 / 2
    assert aborted() == aborted_before + 4  # counted as vLLM counts them
