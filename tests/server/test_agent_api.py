"""The agent API against a real server on the tiny random DeepSeek-V3 model (byte-level BPE tokenizer): tool calls,
structured outputs, the thinking switch, logit_bias, and the fields that are refused rather than ignored."""

import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from conftest import Server

MODEL = "DeepSeek-R1"
CHAT = "/v1/chat/completions"
V31_TEMPLATE = Path(__file__).parent.parent / "tool_parsers" / "deepseek_v31.jinja"
USER = [{"role": "user", "content": "Plan my day"}]
NO_THINKING = {"chat_template_kwargs": {"thinking": False}}

SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "calm"]},
        "outdoor": {"type": "boolean"},
        "hours": {"type": "integer", "minimum": 0, "maximum": 12},
        "place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                   "floor": {"type": "integer", "minimum": -2, "maximum": 3}},
                  "required": ["city", "floor"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["mood", "outdoor", "hours", "place", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "北京"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def post(server, body, path=CHAT):
    # 12 forced-call samples of up to 1000 tokens took 321 s on a 2-core machine shared with other test runs
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=600)


def token_id(server, text):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def stream_events(server, body):
    events = []
    with httpx.stream("POST", server.url + CHAT, json={"model": MODEL, "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def reassemble(events):
    """Streamed chunks -> per choice (reasoning, content, [(name, arguments)], finish_reason)."""
    out = {}
    for event in events:
        assert "error" not in event, event
        for choice in event["choices"]:
            reasoning, content, calls, finish = out.get(choice["index"], ("", "", [], None))
            delta = choice["delta"]
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                if "id" in call:
                    assert call["index"] == len(calls) and call["type"] == "function"
                    calls.append([call["function"]["name"], ""])
                calls[call["index"]][1] += call["function"].get("arguments", "")
            out[choice["index"]] = (reasoning, content, calls, choice["finish_reason"] or finish)
    return {i: (r or None, c or None, [tuple(x) for x in calls], f) for i, (r, c, calls, f) in out.items()}


def message_view(choice):
    m = choice["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
    return m.get("reasoning_content"), m["content"], calls, choice["finish_reason"]


# ---- nothing silently ignored ---------------------------------------------------------------------------------

REFUSED = [
    pytest.param({"functions": [{"name": "f"}]}, "functions", id="functions"),
    pytest.param({"function_call": "auto"}, "function_call", id="function_call"),
    pytest.param({"audio": {"voice": "alloy", "format": "wav"}}, "audio", id="audio"),
    pytest.param({"modalities": ["text", "audio"]}, "modalities", id="modalities"),
    pytest.param({"best_of": 2}, "best_of", id="best_of"),
    pytest.param({"use_beam_search": True}, "use_beam_search", id="use_beam_search"),
    pytest.param({"prediction": {"type": "content", "content": "x"}}, "prediction", id="prediction"),
    pytest.param({"store": True}, "store", id="store"),
    pytest.param({"logits_processors": ["x"]}, "logits_processors", id="logits_processors"),
    pytest.param({"chat_template": "{{ messages }}"}, "chat_template", id="request-chat_template"),
    pytest.param({"response_format": {"type": "xml"}}, "response_format.type", id="response_format-unknown-type"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                 "response_format.json_schema.schema", id="json_schema-without-schema"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}}, "response_format.json_schema.schema",
        id="invalid-json-schema"),
    pytest.param({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", id="two-constraints"),
    pytest.param({"guided_regex": "(unclosed"}, "guided_regex", id="invalid-regex"),
    pytest.param({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
                 id="tool_choice-unknown-tool"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="tool_choice-without-tools"),
    pytest.param({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", id="tool_choice-unknown-value"),
    pytest.param({"response_format": {"type": "json_object"}, "min_tokens": 3, **NO_THINKING}, "min_tokens",
                 id="min_tokens-with-grammar"),
    pytest.param({"tools": []}, "tools", id="empty-tools"),
    pytest.param({"stream": True, "stream_options": {"include_obfuscation": True}},
                 "stream_options.include_obfuscation", id="stream-obfuscation"),
    pytest.param({"include_reasoning": False}, "include_reasoning", id="include_reasoning-false"),
    pytest.param({"return_token_ids": True}, "return_token_ids", id="return_token_ids"),
    pytest.param({"request_id": "abc"}, "request_id", id="request_id-in-body"),
    pytest.param({"prompt_cache_retention": "24h"}, "prompt_cache_retention", id="prompt_cache_retention-24h"),
    pytest.param({"max_repetition_pattern_size": 4}, "max_repetition_pattern_size", id="repetition-detection"),
    pytest.param({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                                  "function_call": {"name": "f", "arguments": "{}"}}]},
                 "messages[1].function_call", id="history-function_call"),
    pytest.param({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", id="duplicate-tool-names"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name",
                 id="bad-tool-name"),
    pytest.param({"reasoning_effort": "high"}, "reasoning_effort", id="reasoning_effort-without-template-support"),
    pytest.param({"chat_template_kwargs": {"thinking": "no"}}, "chat_template_kwargs.thinking", id="thinking-not-bool"),
    pytest.param({"chat_template_kwargs": {"thinking": True, "enable_thinking": False}},
                 "chat_template_kwargs.enable_thinking", id="thinking-alias-disagrees"),
    pytest.param({"logit_bias": {"5": 100.5}}, "logit_bias", id="logit_bias-value-out-of-range"),
    pytest.param({"logit_bias": {"100000": 1}}, "logit_bias", id="logit_bias-token-out-of-range"),
    pytest.param({"logit_bias": {"-3": 1}}, "logit_bias", id="logit_bias-negative-token"),
    pytest.param({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role",
                 id="function-role-message"),
    pytest.param({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
                 id="tool-message-without-id"),
]


@pytest.mark.parametrize("body,param", REFUSED)
def test_refused_with_param(server, body, param):
    r = post(server, {"messages": USER, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_completions_refusals(server):
    for body, param in (({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
                        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                        ({"guided_regex": "(unclosed"}, "guided_regex"),
                        ({"guided_choice": ["a"], "min_tokens": 2}, "min_tokens")):
        r = post(server, {"prompt": "hi", "max_tokens": 2, **body}, "/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_off_values_of_refused_fields_are_accepted(server):
    r = post(server, {"messages": USER, "max_tokens": 2, "modalities": ["text"], "store": False, "best_of": 1,
                      "use_beam_search": False, "parallel_tool_calls": True, "service_tier": "auto",
                      "include_reasoning": True, "prompt_cache_retention": "in-memory",
                      "stream_options": {"include_obfuscation": False}})
    assert r.status_code == 200, r.text


def test_completions_add_special_tokens(server):
    """vLLM's add_special_tokens on /v1/completions: the tokenizer's BOS before a text prompt, or not."""
    counts = [post(server, {"prompt": "hi", "max_tokens": 1, "add_special_tokens": flag}, "/v1/completions").json()
              ["usage"]["prompt_tokens"] for flag in (True, False)]
    assert counts[0] == counts[1] + 1


# ---- logit_bias -----------------------------------------------------------------------------------------------

def test_logit_bias_forces_and_bans(server):
    base = {"prompt": "The", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    forced = post(server, {**base, "logit_bias": {str(token_id(server, "q")): 100}}, "/v1/completions").json()
    assert forced["choices"][0]["text"] == "q" * 6
    plain = post(server, base, "/v1/completions").json()["choices"][0]["text"]
    banned = post(server, {**base, "logit_bias": {str(token_id(server, plain[0])): -100}}, "/v1/completions").json()
    assert plain[0] not in banned["choices"][0]["text"]


# ---- structured outputs ---------------------------------------------------------------------------------------

def test_json_schema_every_sample_validates(server):
    body = {"messages": USER, "n": 24, "temperature": 1.0, "seed": 11, "max_tokens": 200, **NO_THINKING,
            "response_format": {"type": "json_schema", "json_schema": {"name": "day", "schema": SCHEMA,
                                                                       "strict": True}}}
    r = post(server, body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 24
    for choice in choices:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


@pytest.mark.parametrize("body,check", [
    # any object: the random model's keys and strings end only when '"' and '}' are made likely
    pytest.param({"response_format": {"type": "json_object"}, "bias": {'"': 8, "}": 8}},
                 lambda t: isinstance(json.loads(t), dict), id="json_object"),
    pytest.param({"guided_regex": "[a-c]{3}-[0-9]{2}"}, lambda t: len(t) == 6 and t[3] == "-", id="guided_regex"),
    pytest.param({"guided_choice": ["yes", "no", "可能"]}, lambda t: t in ("yes", "no", "可能"), id="guided_choice"),
    pytest.param({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right"),
                 id="structured_outputs-choice"),
    pytest.param({"guided_grammar": 'start: "x" ("y" | "z")'}, lambda t: t in ("xy", "xz"), id="guided_grammar-lark"),
    pytest.param({"guided_json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3,
                                                                        "maximum": 4}}, "required": ["n"],
                                  "additionalProperties": False}},
                 lambda t: json.loads(t)["n"] in (3, 4), id="guided_json"),
])
def test_other_constraints(server, body, check):
    body = dict(body)
    bias = {str(token_id(server, char)): value for char, value in body.pop("bias", {}).items()}
    r = post(server, {"messages": USER, "n": 4, "temperature": 1.0, "seed": 5, "max_tokens": 80, **NO_THINKING,
                      **body, **({"logit_bias": bias} if bias else {})})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop" and check(choice["message"]["content"]), choice


@pytest.mark.parametrize("body,check", [
    pytest.param({"guided_choice": ["yes", "no", "可能"]}, lambda t: t in ("yes", "no", "可能"), id="guided_choice"),
    pytest.param({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, lambda t: len(t) == 6 and t[3] == "-",
                 id="structured_outputs-regex"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}}}},
        lambda t: json.loads(t)["n"] in (1, 2), id="response_format"),
])
@pytest.mark.parametrize("prompts", [["The"], ["The", "A"]], ids=["one-prompt", "two-prompts"])
def test_completions_follow_structured_outputs(server, body, check, prompts):
    """/v1/completions takes the same fields as vLLM: every prompt's every sample follows the grammar."""
    r = post(server, {"prompt": prompts if len(prompts) > 1 else prompts[0], "n": 3, "temperature": 1.0, "seed": 7,
                      "max_tokens": 40, **body}, "/v1/completions")
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 3 * len(prompts)
    for choice in choices:
        assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


def test_completions_structured_output_streams_the_same(server):
    body = {"prompt": "The", "temperature": 1.0, "seed": 3, "max_tokens": 40, "guided_choice": ["north", "south"]}
    whole = post(server, body, "/v1/completions").json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, "stream": True, **body},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == whole and whole in ("north", "south")


def test_grammar_applies_after_the_reasoning_only(server):
    """Thinking on: the reasoning is free; the answer after </think> follows the schema. logit_bias makes the model
    end its reasoning at once, which the grammar (inactive until then) does not prevent."""
    end = token_id(server, "</think>")
    body = {"messages": USER, "n": 4, "temperature": 1.0, "seed": 2, "max_tokens": 120, "logit_bias": {str(end): 100},
            "response_format": {"type": "json_schema", "json_schema": {"name": "day", "schema": SCHEMA}}}
    for choice in post(server, body).json()["choices"]:
        message = choice["message"]
        assert message["reasoning_content"] == ""  # the forced first token ended the reasoning
        jsonschema.validate(json.loads(message["content"]), SCHEMA)


def test_unconstrained_greedy_output_is_unchanged_beside_constrained_requests(server):
    import concurrent.futures

    plain = {"messages": USER, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    alone = post(server, plain).json()["choices"][0]["message"]
    constrained = {"messages": USER, "n": 4, "temperature": 1.0, "max_tokens": 60, **NO_THINKING,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA}}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(post, server, constrained) for _ in range(3)]
        beside = pool.submit(post, server, plain)
        assert all(f.result().status_code == 200 for f in others)
        assert beside.result().json()["choices"][0]["message"] == alone


# ---- tools ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_server(tiny_r1):
    """Room for the tools' system prompt, which R1's template (no tools of its own) gets from the server: one token
    per byte on this tokenizer."""
    s = Server(tiny_r1, "--served-model-name", MODEL, "--max-model-len", "2048", "--kv-cache-memory", "256MiB")
    yield s
    s.stop()


def _assert_valid_calls(message, names):
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_tool_choice_required_gives_valid_calls_every_time(tools_server):
    """Parallel calls allowed: the random model would go on calling; a bias on the "s" of <｜tool▁calls▁end｜>
    (the grammar's only choice between another call and the end) makes it end its block of calls."""
    r = post(tools_server, {"messages": USER, "tools": TOOLS, "tool_choice": "required", "n": 12, "temperature": 1.0,
                            "seed": 4, "max_tokens": 1000, "logit_bias": {str(token_id(tools_server, "s")): 10},
                            **NO_THINKING})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        _assert_valid_calls(choice["message"], {"get_weather", "get_time"})


def test_named_tool_and_single_call(tools_server):
    r = post(tools_server, {"messages": USER, "tools": TOOLS, "n": 8, "temperature": 1.0, "seed": 9, "max_tokens": 250,
                      "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                      "parallel_tool_calls": False, **NO_THINKING})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        _assert_valid_calls(choice["message"], {"get_time"})
        assert len(choice["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("extra", [
    pytest.param({"tool_choice": "required", **NO_THINKING}, id="required"),
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, **NO_THINKING},
                 id="named"),
    pytest.param({"tool_choice": "required"}, id="required-after-reasoning"),
])
def test_streamed_tool_calls_equal_non_streamed(tools_server, extra):
    body = {"messages": USER, "tools": TOOLS, "n": 3, "temperature": 1.0, "seed": 21, "max_tokens": 200, **extra}
    whole = post(tools_server, body).json()["choices"]
    streamed = reassemble(stream_events(tools_server, body))
    assert {c["index"]: message_view(c) for c in whole} == streamed


def test_tool_history_renders_through_the_template(tools_server):
    """An assistant turn with tool_calls and the tool's result go through R1's own template."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(tools_server.url + "/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    text = httpx.post(tools_server.url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" in text
    assert "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>" in text
    messages[1]["content"] = None  # as the openai client sends it
    r = post(tools_server, {"messages": messages, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 200, r.text


# ---- the thinking switch --------------------------------------------------------------------------------------

def _thinking_cases(server, end_id, on_kwargs, off_kwargs):
    ban_end = {"logit_bias": {str(end_id): -100}}
    base = {"messages": USER, "max_tokens": 12, "temperature": 1.0, "seed": 3, **ban_end}
    on = post(server, {**base, **on_kwargs}).json()["choices"][0]["message"]
    assert on["reasoning_content"] and on["content"] is None
    off = post(server, {**base, **off_kwargs}).json()["choices"][0]
    assert off["message"]["reasoning_content"] is None and off["message"]["content"]
    for body, choice in ((on_kwargs, {"message": on, "finish_reason": "length"}), (off_kwargs, off)):
        streamed = reassemble(stream_events(server, {**base, **body}))[0]
        assert streamed[:2] == message_view(choice)[:2]


def test_thinking_switch_on_the_r1_template(server):
    _thinking_cases(server, token_id(server, "</think>"), {}, NO_THINKING)
    alias = post(server, {"messages": USER, "max_tokens": 6, "temperature": 1.0, "seed": 3,
                          "chat_template_kwargs": {"enable_thinking": False}}).json()["choices"][0]["message"]
    assert alias["reasoning_content"] is None


@pytest.fixture(scope="module")
def v31_server(tiny_r1):
    s = Server(tiny_r1, "--served-model-name", MODEL, "--chat-template", str(V31_TEMPLATE), "--max-model-len", "2048",
               "--kv-cache-memory", "256MiB")
    yield s
    s.stop()


def test_thinking_switch_on_the_v31_template(v31_server):
    # V3.1's template thinks only when asked to
    _thinking_cases(v31_server, token_id(v31_server, "</think>"), {"chat_template_kwargs": {"thinking": True}}, {})


def test_v31_tool_calls(v31_server):
    r = post(v31_server, {"messages": USER, "tools": TOOLS, "tool_choice": "required", "n": 4, "temperature": 1.0,
                          "seed": 8, "max_tokens": 1000})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        _assert_valid_calls(choice["message"], {"get_weather", "get_time"})
