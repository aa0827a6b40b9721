"""server/agent.py without a server: what a request's agent fields become for the template and the parser."""

import pytest

from dsserve.server.agent import plan_chat, template_messages
from dsserve.server.protocol import APIError, ChatCompletionRequest
from dsserve.server.state import ServerConfig

CONFIG = ServerConfig(served_model_name="m", reasoning_parser="deepseek_r1", tool_call_parser="deepseek_v3")
HISTORY = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "why"},
           {"role": "user", "content": "c"}]


def _request(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, **fields})


def test_reasoning_history_goes_to_templates_that_read_it():
    req = _request()
    reads = plan_chat(req, CONFIG, frozenset({"reasoning_content"}))
    assert template_messages(req, reads, strict=False)[1]["reasoning_content"] == "why"
    ignores = plan_chat(req, CONFIG, frozenset())
    assert "reasoning_content" not in template_messages(req, ignores, strict=False)[1]


def test_thinking_switch_becomes_both_template_names_or_a_closed_block():
    req = _request(chat_template_kwargs={"enable_thinking": False})
    with_switch = plan_chat(req, CONFIG, frozenset({"thinking"}))
    assert with_switch.template_kwargs["thinking"] is False and not with_switch.close_thinking
    without = plan_chat(req, CONFIG, frozenset())
    assert without.close_thinking


def test_reasoning_effort_reaches_templates_that_read_it():
    assert plan_chat(_request(reasoning_effort="high"), CONFIG,
                     frozenset({"reasoning_effort"})).template_kwargs["reasoning_effort"] == "high"
    with pytest.raises(APIError) as e:
        plan_chat(_request(reasoning_effort="high"), CONFIG, frozenset())
    assert e.value.param == "reasoning_effort"


def test_tools_go_to_the_template_or_into_the_system_prompt():
    tool = {"type": "function", "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}}}
    req = _request(tools=[tool])
    reads = plan_chat(req, CONFIG, frozenset({"tools"}))
    assert reads.template_kwargs["tools"][0]["function"]["name"] == "f" and reads.tool_system_prompt is None
    injected = plan_chat(req, CONFIG, frozenset())
    messages = template_messages(req, injected, strict=False)
    assert messages[0]["role"] == "system" and "### f" in messages[0]["content"] and "```json" in messages[0]["content"]


def test_no_tool_format_refuses_tools():
    config = ServerConfig(served_model_name="m", tool_call_parser="none")
    tool = {"type": "function", "function": {"name": "f"}}
    with pytest.raises(APIError) as e:
        plan_chat(_request(tools=[tool]), config, frozenset())
    assert e.value.param == "tools"
    assert plan_chat(_request(tools=[tool], tool_choice="none"), config, frozenset()).tool_format is None


def test_forced_dsml_call_refuses_a_schema_its_grammar_cannot_hold():
    """V3.2's DSML writes one argument at a time: a top-level oneOf would be silently dropped by its grammar."""
    from dsserve.server.agent import structured_output

    config = ServerConfig(served_model_name="m", tool_call_parser="deepseek_v32")
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "oneOf": [{"required": ["a"]}]}}}
    req = _request(tools=[tool], tool_choice="required")
    with pytest.raises(APIError) as e:
        structured_output(req, plan_chat(req, config, frozenset({"tools"})), None)
    assert e.value.status == 400 and e.value.param == "tools[0].function.parameters"


def test_invalid_tool_schema_is_refused_even_when_not_forced():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                       "properties": {"a": {"type": "nope"}}}}}
    with pytest.raises(APIError) as e:
        plan_chat(_request(tools=[tool]), CONFIG, frozenset({"tools"}))
    assert e.value.param == "tools[0].function.parameters"


def test_forced_call_refuses_an_answer_constraint_it_would_drop():
    """tool_choice required: the answer is calls only, so a response_format beside it would be silently ignored."""
    from dsserve.server.agent import structured_output

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = _request(tools=[tool], tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(APIError) as e:
        structured_output(req, plan_chat(req, CONFIG, frozenset({"tools"})), None)
    assert e.value.param == "response_format"
    auto = _request(tools=[tool], response_format={"type": "json_object"})
    assert "answer: %json" in structured_output(auto, plan_chat(auto, CONFIG, frozenset({"tools"})), None).lark
