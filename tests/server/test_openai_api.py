"""The server through the official openai client: chat (reasoning split), completions, models, tokenize, metrics."""

import json
import subprocess

import httpx
import pytest

from dsserve.reasoning import r1

MODEL = "DeepSeek-R1"


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def thinking_seed(client):
    """A seed for which the tiny random model closes its reasoning, so both parts are non-empty."""
    for seed in range(300):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=48,
                                           temperature=1.0, seed=seed)
        message = r.choices[0].message
        if message.content and message.reasoning_content:
            return seed
    pytest.fail("no seed in 300 made the random model emit </think>")


def _stream_text(client, **kwargs):
    reasoning, content, chunks = "", "", []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        chunks.append(chunk)
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    return reasoning, content, chunks


def test_reasoning_split_streamed_equals_non_streamed(client, thinking_seed):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=48, temperature=1.0,
                  seed=thinking_seed)
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert message.reasoning_content and message.content
    reasoning, content, chunks = _stream_text(client, **kwargs)
    assert (reasoning, content) == (message.reasoning_content, message.content)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # reasoning deltas all come before content deltas
    kinds = [("r" if getattr(c.choices[0].delta, "reasoning_content", None) else "c")
             for c in chunks if c.choices and (c.choices[0].delta.content or getattr(c.choices[0].delta, "reasoning_content", None))]
    assert kinds == sorted(kinds, key=lambda k: k == "c")
    usage = whole.usage
    assert usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_include_usage_and_n(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=7, n=2, stream=True, seed=3,
        temperature=1.0, extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    assert all(c.usage is None for c in chunks[:-1])
    finals = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finals == {0: "length", 1: "length"}
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=7,
                                           n=2, seed=3, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in whole.choices] == [0, 1]


def test_seed_reproducible_and_stop(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=30, temperature=1.0,
                  seed=11, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs).choices[0].message
    b = client.chat.completions.create(**kwargs).choices[0].message
    assert (a.reasoning_content, a.content) == (b.reasoning_content, b.content)
    text = (a.reasoning_content or "") + "</think>" * (a.content is not None) + (a.content or "")
    window = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2] and "<" not in text[i:i + 2])
    stopped = client.chat.completions.create(**{**kwargs, "stop": [window]}).choices[0]
    assert stopped.finish_reason == "stop"
    got = (stopped.message.reasoning_content or "") + "</think>" * (stopped.message.content is not None) + (stopped.message.content or "")
    assert got == text[: text.index(window)]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       logprobs=True, top_logprobs=3, temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_completions_echo_and_prompt_logprobs(client):
    prompt = [0, 40, 50, 60, 70, 80]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.text_offset) == len(lp.tokens)
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, seed=1)
    assert text.object == "text_completion" and text.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == text.choices[0].text


def test_models_tokenize_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "你好 world"}).json()
    assert tokens["count"] == len(tokens["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"].endswith("你好 world")
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"][-1] == httpx.post(server.url + "/tokenize", json={"prompt": "\n", "add_special_tokens": False}).json()["tokens"][-1]
    assert httpx.get(server.url + "/health").status_code == 200
    info = httpx.get(server.url + "/tokenizer_info").json()  # lm-eval's remote tokenizer reads this
    assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert "<｜Assistant｜>" in info["chat_template"] and info["model_max_length"] == 512


def test_seed_brief_curl_verbatim(server):
    body = ('{"model": "DeepSeek-R1", "messages": [{"role": "user", "content": "你好"}], '
            '"max_tokens": 20, "presence_penalty": 1.03, "frequency_penalty": 1.0, "seed": null, '
            '"temperature": 0.5, "top_p": 0.95, "stream": true}')
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{server.url}/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=60)
    events = [line[6:] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics_use_vllm_names(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "m"}], max_tokens=3)
    m = server.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count"):
        assert name in m, name
    assert m["vllm:generation_tokens_total"] > 0


def test_split_rules():
    assert r1.split("abc</think>\n\nanswer") == ("abc", "\n\nanswer")
    assert r1.split("<think>abc</think>x") == ("abc", "x")
    assert r1.split("still thinking") == ("still thinking", None)
    assert r1.split("abc</think>") == ("abc", None)
    stream, parts = r1.ReasoningStream(), []
    text = "<think>\nstep</think>\n\nok"
    for i in range(1, len(text) + 1):
        parts.append(stream.update(text[:i], finished=i == len(text)))
    assert "".join(p[0] for p in parts) == "\nstep" and "".join(p[1] for p in parts) == "\n\nok"


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_and_echo_equal_the_non_streamed(server, echo):
    """Streamed completions carry the same text (the echoed prompt first), tokens, logprobs, alternatives and text
    offsets as the non-streamed answer, chunk after chunk."""
    body = {"model": MODEL, "prompt": [3, 17, 40, 9], "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": echo,
            "ignore_eos": True}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[5:])["choices"]:
                text += choice["text"]
                for key in merged:
                    merged[key] += choice["logprobs"][key]
    assert text == whole["text"]
    assert merged == whole["logprobs"]
    assert len(merged["tokens"]) == 6 + (4 if echo else 0)
