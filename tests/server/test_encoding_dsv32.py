"""DeepSeek-V3.2's prompt format (its published encoding_dsv32.py, rendered by server/encoding_dsv32.py): whole
renderings written out by hand from the reference encoder's templates, and the server choosing it for a V3.2
tokenizer, which ships no chat template."""

import json

import pytest

from dsserve.engine.tokenizer import Tokenizer
from dsserve.errors import InvalidRequestError
from dsserve.server import encoding_dsv32
from dsserve.server.agent import plan_chat, render_prompt, template_messages, template_variables
from dsserve.server.launch import resolve_chat_encoder, resolve_tool_call_parser
from dsserve.server.protocol import ChatCompletionRequest
from dsserve.server.state import ServerConfig

B, E, D = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "｜DSML｜"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "北京", "days": 3}'}},
         {"id": "call_2", "type": "function", "function": {"name": "lookup",
                                                          "arguments": '{"q": "a <b> \\"c\\"", "o": {"d": [1, true]}}'}}]
CALLS_DSML = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
              f'<{D}parameter name="city" string="true">北京</{D}parameter>\n'
              f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n'
              f'<{D}invoke name="lookup">\n<{D}parameter name="q" string="true">a <b> "c"</{D}parameter>\n'
              f'<{D}parameter name="o" string="false">{{"d": [1, true]}}</{D}parameter>\n</{D}invoke>\n'
              f'</{D}function_calls>')
HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in 北京?"},
           {"role": "assistant", "content": "", "reasoning_content": "I should call.", "tool_calls": CALLS},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
           {"role": "tool", "tool_call_id": "call_2", "content": "found"}]
TOOLS_PROMPT = encoding_dsv32.TOOLS_SYSTEM_TEMPLATE.format(
    dsml=D, think_start="<think>", think_end="</think>",
    functions='{"name": "get_weather", "description": "天气", "parameters": {"type": "object", "properties": '
              '{"city": {"type": "string"}}}}')


def test_tools_prompt_is_the_reference_text():
    assert TOOLS_PROMPT.startswith("## Tools\nYou have access to a set of tools you can use to answer the user's "
                                   f'question.\nYou can invoke functions by writing a "<{D}function_calls>" block')
    assert TOOLS_PROMPT.endswith('<functions>\n{"name": "get_weather", "description": "天气", "parameters": '
                                 '{"type": "object", "properties": {"city": {"type": "string"}}}}\n</functions>\n')


@pytest.mark.parametrize("thinking,expected", [
    pytest.param(False, B + "Be brief.\n\n" + TOOLS_PROMPT + "<｜User｜>Weather in 北京?<｜Assistant｜></think>"
                 + CALLS_DSML + E + "\n\n<function_results>\n<result>sunny</result>\n<result>found</result>"
                 "\n</function_results>\n\n</think>", id="chat"),
    # thinking: the turn after the last user message keeps its reasoning; the results reopen the reasoning
    pytest.param(True, B + "Be brief.\n\n" + TOOLS_PROMPT + "<｜User｜>Weather in 北京?<｜Assistant｜><think>"
                 + "I should call.</think>" + CALLS_DSML + E + "\n\n<function_results>\n<result>sunny</result>"
                 "\n<result>found</result>\n</function_results>\n\n<think>", id="thinking"),
])
def test_rendering_follows_the_reference_encoder(thinking, expected):
    assert encoding_dsv32.encode(HISTORY, [WEATHER], thinking) == expected


def test_a_later_user_turn_closes_earlier_reasoning():
    messages = [*HISTORY[1:], {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    prompt = encoding_dsv32.encode(messages, None, thinking=True)
    # no tools: no system message; earlier turns lose their reasoning, the last user turn opens a new one
    assert prompt == (B + "<｜User｜>Weather in 北京?<｜Assistant｜></think>" + CALLS_DSML + E
                      + "\n\n<function_results>\n<result>sunny</result>\n<result>found</result>\n</function_results>"
                      "\n\n</think>Sunny." + E + "<｜User｜>Thanks<｜Assistant｜><think>")


@pytest.mark.parametrize("messages", [
    pytest.param([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], id="result-without-call"),
    pytest.param([{"role": "assistant", "content": "", "tool_calls": [CALLS[0]]}, {"role": "tool", "content": "a"},
                  {"role": "tool", "content": "b"}], id="more-results-than-calls"),
    pytest.param([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}], id="arguments-not-an-object"),
])
def test_malformed_history_is_a_request_error(messages):
    with pytest.raises(InvalidRequestError):
        encoding_dsv32.encode(messages)


def _v32_tokenizer(folder):
    """A V3.2-like tokenizer: ｜DSML｜ a special token, </think> in the vocabulary, no chat template."""
    from tokenizers import AddedToken

    from dsserve.assets.tiny_random import byte_level_tokenizer

    hf = byte_level_tokenizer()
    hf.add_special_tokens([AddedToken(D, special=True, normalized=False)])
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": B, "eos_token": E}))
    return Tokenizer(folder)


def test_server_picks_the_encoder_for_a_v32_tokenizer_and_plans_with_it(tmp_path):
    tokenizer = _v32_tokenizer(tmp_path)
    assert tokenizer.chat_template is None
    parser = resolve_tool_call_parser("auto", tokenizer)
    assert parser == "deepseek_v32" and resolve_chat_encoder(parser, tokenizer) == "deepseek_v32"
    assert resolve_chat_encoder(parser, tokenizer, "{{ messages }}") is None  # a template given: it is used
    config = ServerConfig(served_model_name="m", reasoning_parser="deepseek_r1", tool_call_parser=parser,
                          chat_encoder="deepseek_v32")
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "tools": [WEATHER], "chat_template_kwargs": {"thinking": True}})
    plan = plan_chat(req, config, template_variables(tokenizer, config))
    assert plan.tool_system_prompt is None and not plan.close_thinking  # tools and the switch go to the encoder
    prompt = render_prompt(tokenizer, template_messages(req, plan, strict=False), config, plan.template_kwargs)
    assert prompt == B + "\n\n" + TOOLS_PROMPT + "<｜User｜>hi<｜Assistant｜><think>"
    assert tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False), skip_special_tokens=True) == prompt[len(B):]
