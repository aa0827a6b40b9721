"""DeepSeek's tool-call formats: canned outputs, real template renderings, and every two-chunk split of each."""

import json
from pathlib import Path

import pytest

from dsserve.assets import demo_model_dir
from dsserve.assets.tiny_random import r1_chat_template
from dsserve.engine.tokenizer import Tokenizer
from dsserve.reasoning import r1
from dsserve.tool_parsers import FORMATS, ToolCallStream, detect_format

V31_TEMPLATE = (Path(__file__).parent / "deepseek_v31.jinja").read_text(encoding="utf-8")

B, CB, CE, S, E = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁calls▁end｜>"


def v3_call(name, args):
    return f"{CB}function{S}{name}\n```json\n{args}\n```{CE}"


def v31_call(name, args):
    return f"{CB}{name}{S}{args}{CE}"


def dsml_call(name, params):
    body = "\n".join(f'<｜DSML｜parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                     f'{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</｜DSML｜parameter>'
                     for k, v in params.items())
    return f'<｜DSML｜invoke name="{name}">\n{body}\n</｜DSML｜invoke>'


def dsml_block(*calls):
    return "<｜DSML｜function_calls>\n" + "\n".join(calls) + "\n</｜DSML｜function_calls>"


WEATHER = '{"city": "Paris", "unit": "celsius"}'
CHINESE = '{"city": "北京", "note": "天气怎么样？"}'
MARKERS = '{"code": "```python\\nprint(1)\\n```", "sep": "<｜tool▁sep｜> and <｜", "x": "}"}'

CASES = [
    # format, text, content, [(name, arguments)]
    pytest.param("deepseek_v3", "no tools here", "no tools here", [], id="v3-plain"),
    pytest.param("deepseek_v3", f"{B}{v3_call('get_weather', WEATHER)}{E}", "", [("get_weather", WEATHER)],
                 id="v3-one-call"),
    pytest.param("deepseek_v3", f"Let me look.\n\n{B}{v3_call('get_weather', WEATHER)}{E}", "Let me look.",
                 [("get_weather", WEATHER)], id="v3-text-before"),
    pytest.param("deepseek_v3", f"{B}{v3_call('a', WEATHER)}\n{v3_call('b', '{}')}\n{v3_call('c', CHINESE)}{E}", "",
                 [("a", WEATHER), ("b", "{}"), ("c", CHINESE)], id="v3-parallel"),
    pytest.param("deepseek_v3", f"{B}{v3_call('run', MARKERS)}{E}", "", [("run", MARKERS)], id="v3-marker-chars"),
    pytest.param("deepseek_v3", f"天气：{B}{v3_call('天气', CHINESE)}{E}", "天气：", [("天气", CHINESE)], id="v3-chinese"),
    pytest.param("deepseek_v3", f"{B}{v3_call('get_weather', WEATHER)}{E}\nDone.", "Done.", [("get_weather", WEATHER)],
                 id="v3-text-after"),
    pytest.param("deepseek_v3", f"x {B}{CB}function{S}get_weather\n```json\n" + '{"city": "Pa', "x",
                 [("get_weather", '{"city": "Pa')], id="v3-cut-by-max-tokens"),
    pytest.param("deepseek_v3", f"x {B}garbage", f"x {B}garbage", [], id="v3-malformed-is-content"),
    pytest.param("deepseek_v3", "a <｜tool▁ b", "a <｜tool▁ b", [], id="v3-partial-marker-in-text"),
    pytest.param("deepseek_v31", f"{B}{v31_call('get_weather', WEATHER)}{E}", "", [("get_weather", WEATHER)],
                 id="v31-one-call"),
    pytest.param("deepseek_v31", f"Sure.{B}{v31_call('a', WEATHER)}{v31_call('b', CHINESE)}{E}", "Sure.",
                 [("a", WEATHER), ("b", CHINESE)], id="v31-parallel-text-before"),
    pytest.param("deepseek_v31", f"{B}{v31_call('run', MARKERS)}{E}", "", [("run", MARKERS)], id="v31-marker-chars"),
    pytest.param("deepseek_v31", f"{B}{CB}get_weather{S}" + '{"ci', "", [("get_weather", '{"ci')], id="v31-cut"),
    pytest.param("deepseek_v32", "plain answer", "plain answer", [], id="v32-plain"),
    pytest.param("deepseek_v32", "Checking.\n\n" + dsml_block(dsml_call("get_weather", {"city": "Paris", "days": 3})),
                 "Checking.", [("get_weather", '{"city": "Paris", "days": 3}')], id="v32-text-before"),
    pytest.param("deepseek_v32", dsml_block(dsml_call("a", {"q": "北京 </｜DSML｜ <", "opts": {"deep": [1, True]}}),
                                            dsml_call("b", {})), "",
                 [("a", '{"q": "北京 </｜DSML｜ <", "opts": {"deep": [1, true]}}'), ("b", "{}")], id="v32-parallel"),
]


def reassemble(fmt_name, chunks):
    stream = ToolCallStream(FORMATS[fmt_name])
    content, calls, text = "", [], ""
    for i, chunk in enumerate(chunks):
        text += chunk
        delta_content, deltas = stream.update(text, i == len(chunks) - 1)
        content += delta_content
        for d in deltas:
            if d.name is not None:
                assert d.index == len(calls), "a call's name comes first, once"
                calls.append([d.name, ""])
            calls[d.index][1] += d.arguments
    return content, [tuple(c) for c in calls]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parse(fmt, text, content, calls):
    parsed = FORMATS[fmt].parse(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    for c in parsed.calls:
        if c.is_complete:
            json.loads(c.arguments)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_every_two_chunk_split_streams_the_same(fmt, text, content, calls):
    for cut in range(len(text) + 1):
        assert reassemble(fmt, [text[:cut], text[cut:]]) == (content, calls), cut


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_character_by_character_streams_the_same(fmt, text, content, calls):
    assert reassemble(fmt, list(text) or [""]) == (content, calls)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_no_marker_reaches_content(fmt, text, content, calls):
    if calls:
        streamed, _ = reassemble(fmt, list(text))
        assert "tool▁call" not in streamed and "DSML" not in streamed


TOOL_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}},
              {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": CHINESE}}]


@pytest.mark.parametrize("template,fmt,opening", [
    pytest.param(r1_chat_template(), "deepseek_v3", "<｜Assistant｜>", id="r1-template"),
    pytest.param(V31_TEMPLATE, "deepseek_v31", "<｜Assistant｜></think>", id="v31-template"),
])
def test_real_template_rendering_parses_back(template, fmt, opening):
    """An assistant turn with tool calls, as the model's own template writes it, parses back to the same calls."""
    assert detect_format(template) == fmt
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": TOOL_CALLS}]
    rendered = Tokenizer(demo_model_dir(), chat_template=template).apply_chat_template(messages, False)
    answer = rendered.split(opening, 1)[1].removesuffix("<｜end▁of▁sentence｜>")
    parsed = FORMATS[fmt].parse(answer)
    assert parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", WEATHER), ("lookup", CHINESE)]
    for cut in range(len(answer) + 1):
        assert reassemble(fmt, [answer[:cut], answer[cut:]]) == ("", [("get_weather", WEATHER), ("lookup", CHINESE)])


def test_detect_format():
    assert detect_format("{{ '<｜DSML｜function_calls>' }}") == "deepseek_v32"
    assert detect_format(None, "deepseek_v32") == "deepseek_v32"
    assert detect_format("{{ messages }}") is None


def test_call_inside_reasoning_is_not_a_call():
    """The reasoning parser takes the reasoning out first: a call written while thinking stays reasoning."""
    output = f"I could write {B}{v3_call('get_weather', WEATHER)}{E} but\n</think>\n\nIt is sunny."
    reasoning, answer = r1.split(output)
    parsed = FORMATS["deepseek_v3"].parse(answer)
    assert parsed.calls == [] and parsed.content == "\n\nIt is sunny."
    assert B in reasoning


@pytest.mark.parametrize("content", ["", "Let me check, 稍等。"])
def test_v32_encoder_rendering_parses_back(content):
    """V3.2 ships a Python encoder instead of a template: an assistant turn with tool calls as it renders them (string
    arguments raw, marker characters and Chinese included) parses back to the same calls, streamed or not."""
    from dsserve.server import encoding_dsv32

    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": CHINESE}},
             {"id": "call_2", "type": "function", "function": {"name": "run", "arguments": MARKERS}},
             {"id": "call_3", "type": "function", "function": {"name": "stats", "arguments": '{"n": [1, 2.5], "ok": false}'}}]
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": content, "tool_calls": calls}]
    rendered = encoding_dsv32.encode(messages)
    answer = rendered.split("<｜Assistant｜></think>", 1)[1].removesuffix("<｜end▁of▁sentence｜>")
    parsed = FORMATS["deepseek_v32"].parse(answer)
    expected = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == expected
    whole = [(c.name, c.arguments) for c in parsed.calls]
    for cut in range(len(answer) + 1):
        assert reassemble("deepseek_v32", [answer[:cut], answer[cut:]]) == (content, whole), cut
