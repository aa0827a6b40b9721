"""Bad requests get OpenAI's status, type, param and code, never a 500; the server keeps serving."""

import asyncio
import json
import time

import httpx
import pytest

from conftest import Server

MODEL = "DeepSeek-R1"
CHAT = "/v1/chat/completions"
OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with(**changes):
    body = {**OK, **changes}
    return {k: v for k, v in body.items() if v is not ...}


CASES = [
    pytest.param(CHAT, b"{not json", 400, None, None, id="malformed-json"),
    pytest.param(CHAT, b"\xff\xfe\x00", 400, None, None, id="not-utf8"),
    pytest.param(CHAT, b"[1, 2]", 400, None, None, id="body-not-object"),
    pytest.param(CHAT, _with(model=...), 400, "model", None, id="missing-model"),
    pytest.param(CHAT, _with(model="gpt-5"), 404, "model", "model_not_found", id="unknown-model"),
    pytest.param(CHAT, _with(messages=[]), 400, "messages", "empty_array", id="empty-messages"),
    pytest.param(CHAT, _with(messages=...), 400, "messages", "missing_required_parameter", id="missing-messages"),
    pytest.param(CHAT, _with(messages=[{"role": "foo", "content": "x"}]), 400, "messages[0].role", "invalid_value",
                 id="invalid-role"),
    pytest.param(CHAT, _with(temperature="hot"), 400, "temperature", "invalid_type", id="temperature-string"),
    pytest.param(CHAT, _with(temperature=2.5), 400, "temperature", "invalid_value", id="temperature-too-high"),
    pytest.param(CHAT, _with(top_p=1.5), 400, "top_p", "invalid_value", id="top_p-too-high"),
    pytest.param(CHAT, _with(max_tokens=0), 400, "max_tokens", "invalid_value", id="max_tokens-zero"),
    pytest.param(CHAT, _with(n=0), 400, "n", "invalid_value", id="n-zero"),
    pytest.param(CHAT, _with(n=500), 400, "n", "invalid_value", id="n-too-many"),
    pytest.param(CHAT, _with(top_logprobs=30, logprobs=True), 400, "top_logprobs", "invalid_value", id="top_logprobs-30"),
    pytest.param(CHAT, _with(top_logprobs=2), 400, "top_logprobs", None, id="top_logprobs-without-logprobs"),
    pytest.param(CHAT, _with(presence_penalty=5), 400, "presence_penalty", "invalid_value", id="presence-penalty"),
    pytest.param(CHAT, _with(stop_token_ids=[10**9]), 400, "stop_token_ids", "invalid_value", id="stop-token-oov"),
    pytest.param(CHAT, _with(max_tokens=100000), 400, "max_tokens", "context_length_exceeded", id="context-exceeded"),
    pytest.param(CHAT, _with(messages=[{"role": "user", "content": "x" * 3000}]), 400, "messages",
                 "context_length_exceeded", id="prompt-too-long"),
    pytest.param(CHAT, _with(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
                 "messages[0].content[0].type", "invalid_value", id="image-part"),
    pytest.param(CHAT, _with(stop=5), 400, "stop", "invalid_type", id="stop-wrong-type"),
    pytest.param(CHAT, _with(seed="x"), 400, "seed", "invalid_type", id="seed-string"),
    pytest.param("/v1/completions", {"model": MODEL, "prompt": [999999]}, 400, "prompt", "invalid_value",
                 id="completion-token-oov"),
    pytest.param("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "invalid_value", id="empty-prompt"),
    pytest.param("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, 400, "logprobs", "invalid_value",
                 id="completion-logprobs-99"),
    pytest.param("/detokenize", {"tokens": [-1]}, 400, "tokens", "invalid_value", id="detokenize-negative"),
    pytest.param(CHAT, _with(temperature=float("nan")), 400, "temperature", None, id="temperature-nan"),
]


@pytest.mark.parametrize("path,body,status,param,code", CASES)
def test_bad_request(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]


def test_still_healthy_after_bad_requests(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_reasoning_content_in_history_is_dropped(server):
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "reasoning_content": "secret"},
                {"role": "user", "content": "c"}]
    r = httpx.post(server.url + CHAT, json={**OK, "messages": messages})
    assert r.status_code == 200


@pytest.fixture(scope="module")
def guarded(tiny_r1):
    s = Server(tiny_r1, "--api-key", "sk-test-123456", "--max-num-seqs", "1", "--max-queued-requests", "1",
               "--strict-reasoning-history", "--max-input-len", "50", "--truncate-input")
    yield s
    s.stop()


def test_api_key_on_every_route_but_health(guarded):
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT), ("POST", "/tokenize")):
        r = httpx.request(method, guarded.url + path, json=OK)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    r = httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer wrong-key-000"})
    assert r.status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200
    client = guarded.client(api_key="sk-test-123456")
    assert client.models.list().data[0].id == "tiny-r1"


def test_strict_history_and_truncation(guarded):
    auth = {"Authorization": "Bearer sk-test-123456"}
    body = {"model": "tiny-r1", "max_tokens": 2, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
        {"role": "user", "content": "c"}]}
    r = httpx.post(guarded.url + CHAT, json=body, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].reasoning_content"
    long = {"model": "tiny-r1", "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 200}]}
    r = httpx.post(guarded.url + CHAT, json=long, headers=auth)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 50


def test_body_too_large(guarded):
    r = httpx.post(guarded.url + CHAT, content=b"x" * (41 * 2**20), headers={"Authorization": "Bearer sk-test-123456"})
    assert r.status_code == 413


def test_queue_full_gives_503(guarded):
    """max_num_seqs 1 + 1 queued: of 6 concurrent long requests, the overflow gets 503, the rest 200."""
    auth = {"Authorization": "Bearer sk-test-123456"}
    body = {"model": "tiny-r1", "max_tokens": 200, "ignore_eos": True, "messages": [{"role": "user", "content": "q"}]}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(guarded.url + CHAT, json=body, headers=auth) for _ in range(6)))

    codes = sorted(r.status_code for r in asyncio.run(run()))
    assert codes.count(200) == 2 and codes.count(503) == 4, codes
    assert all(r == 503 or r == 200 for r in codes)
    time.sleep(0.2)
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_health_is_503_once_the_engine_is_dead(tiny_r1):
    from fastapi.testclient import TestClient

    from dsserve.engine.async_engine import AsyncEngine
    from dsserve.engine.engine import LLMEngine, build_engine_config
    from dsserve.server.app import create_app
    from dsserve.server.state import ServerConfig

    engine = AsyncEngine(LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=8, max_model_len=64)))
    client = TestClient(create_app(engine, ServerConfig(served_model_name="m")))
    assert client.get("/health").status_code == 200
    engine.dead = RuntimeError("boom")
    assert client.get("/health").status_code == 503
    r = client.post(CHAT, json={**OK, "model": "m"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
