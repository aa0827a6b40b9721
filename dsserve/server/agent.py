"""What a chat request asks of the agent features: tools and tool_choice, the thinking switch, reasoning_effort,
the template variables they become, and how the answer's text is read back (reasoning, content, tool calls)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from dsserve.engine.structured import StructuredOutput, with_json_style
from dsserve.errors import InvalidRequestError
from dsserve.reasoning import r1
from dsserve.server import encoding_dsv32
from dsserve.server.constraints import answer_constraint, checked_schema
from dsserve.server.protocol import APIError, ChatCompletionRequest
from dsserve.tool_parsers import FORMATS, ToolCallFormat, ToolCallStream, call_grammar, tool_prompt


@dataclass
class ChatPlan:
    """How one chat request is templated and how its output is read."""

    template_kwargs: dict[str, Any]  # variables for the chat template (chat_template_kwargs, tools, thinking...)
    tool_format: ToolCallFormat | None  # parse tool calls out of the answer (tools offered, tool_choice not none)
    tools: list[dict[str, Any]] = field(default_factory=list)  # the request's tools, as plain dicts
    tool_choice: str | dict[str, Any] = "auto"  # "auto", "required" or {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    reasoning: bool = False  # the reasoning parser is on
    close_thinking: bool = False  # thinking off on a template without a switch: close an empty <think> block
    tool_system_prompt: str | None = None  # the tools described in a system message (a template that has no tools)
    keep_reasoning_history: bool = False  # the template reads reasoning_content of assistant messages


def plan_chat(req: ChatCompletionRequest, config, template_variables: frozenset[str]) -> ChatPlan:
    """Check the agent fields of a request against the model (400 with `param` for any it cannot honour)."""
    kwargs = dict(req.chat_template_kwargs or {})
    reasoning = config.reasoning_parser == "deepseek_r1"
    close_thinking = False
    thinking = _thinking_switch(kwargs)
    if thinking is not None:
        if thinking and not reasoning:
            raise APIError(400, "This model does not reason (the server runs no reasoning parser), so thinking cannot "
                           "be switched on.", param="chat_template_kwargs.thinking", code="invalid_value")
        kwargs["thinking"] = kwargs["enable_thinking"] = thinking  # V3.1 reads `thinking`, others `enable_thinking`
        has_switch = bool({"thinking", "enable_thinking"} & template_variables)
        close_thinking = reasoning and not thinking and not has_switch
    if req.reasoning_effort is not None:
        if "reasoning_effort" not in template_variables:
            raise APIError(400, "This model's chat template has no reasoning_effort; switch the reasoning on or off "
                           "with chat_template_kwargs {\"thinking\": true|false}.", param="reasoning_effort",
                           code="unsupported_parameter")
        kwargs["reasoning_effort"] = req.reasoning_effort
    plan = ChatPlan(kwargs, None, reasoning=reasoning, close_thinking=close_thinking,
                    keep_reasoning_history="reasoning_content" in template_variables,
                    parallel_tool_calls=req.parallel_tool_calls)
    _plan_tools(req, config, template_variables, plan)
    return plan


def _thinking_switch(kwargs: dict[str, Any]) -> bool | None:
    values = {k: kwargs[k] for k in ("thinking", "enable_thinking") if k in kwargs and kwargs[k] is not None}
    for key, value in values.items():
        if not isinstance(value, bool):
            raise APIError(400, f"Invalid type for 'chat_template_kwargs.{key}': expected a boolean.",
                           param=f"chat_template_kwargs.{key}", code="invalid_type")
    if len(set(values.values())) > 1:
        raise APIError(400, "chat_template_kwargs.thinking and its alias enable_thinking disagree; send one.",
                       param="chat_template_kwargs.enable_thinking", code="invalid_value")
    return next(iter(values.values()), None)


def _plan_tools(req: ChatCompletionRequest, config, template_variables: frozenset[str], plan: ChatPlan) -> None:
    choice = req.tool_choice
    if req.tools is None:
        if choice is not None and choice != "none":
            raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                           "specified.", param="tool_choice")
        return
    if not req.tools:
        raise APIError(400, "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty "
                       "array instead.", param="tools", code="empty_array")
    names = [t.function.name for t in req.tools]
    for i, tool in enumerate(req.tools):
        if tool.function.parameters is not None:
            checked_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise APIError(400, f"Invalid 'tools[{i}].function.name': the name '{name}' is used by an earlier tool.",
                           param=f"tools[{i}].function.name", code="invalid_value")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise APIError(400, f"Invalid value for 'tool_choice': no tool named '{choice.function.name}' is in 'tools'.",
                       param="tool_choice", code="invalid_value")
    if choice == "none":
        return  # a plain answer: the tools are neither shown nor parsed
    if config.tool_call_parser == "none":
        raise APIError(400, "This model has no tool-call format (its chat template writes no tool calls), so it "
                       "cannot be given tools; the server's operator can choose one with --tool-call-parser.",
                       param="tools", code="unsupported_parameter")
    plan.tool_format = FORMATS[config.tool_call_parser]
    plan.tools = [t.model_dump(exclude_none=True) for t in req.tools]
    plan.tool_choice = "auto" if choice is None else (choice if isinstance(choice, str) else choice.model_dump())
    if "tools" in template_variables:
        plan.template_kwargs["tools"] = plan.tools
    else:
        plan.tool_system_prompt = tool_prompt(plan.tools, plan.tool_format.name)


def template_messages(req: ChatCompletionRequest, plan: ChatPlan, strict: bool) -> list[dict[str, Any]]:
    """Plain dicts for the template: text parts joined, tool calls and tool results checked, earlier reasoning
    dropped unless the template reads it (R1 must not see it again; V3.2-style templates want it back)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.reasoning_content is not None and strict:
            raise APIError(400, "reasoning_content must not be sent back in the conversation history; drop it from "
                           "earlier assistant messages.", param=f"messages[{i}].reasoning_content")
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise APIError(400, f"content parts of type '{part.type}' are not supported; this model reads text.",
                                   param=f"messages[{i}].content[{j}].type", code="invalid_value")
            content = "".join(part.text or "" for part in content)
        role = "system" if m.role == "developer" else m.role
        if role == "function":
            raise APIError(400, "Messages with role 'function' belong to the deprecated function-calling API; send "
                           "the result as a 'tool' message with its tool_call_id.", param=f"messages[{i}].role",
                           code="invalid_value")
        message: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            if role != "assistant":
                raise APIError(400, "Only assistant messages may hold tool_calls.", param=f"messages[{i}].tool_calls",
                               code="invalid_value")
            message["tool_calls"] = [_history_call(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(m.tool_calls)]
        if role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                               param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
            message["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None and plan.keep_reasoning_history and role == "assistant":
            message["reasoning_content"] = m.reasoning_content
        out.append(message)
    if plan.tool_system_prompt is not None:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + plan.tool_system_prompt}
        else:
            out.insert(0, {"role": "system", "content": plan.tool_system_prompt})
    return out


def _history_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"Invalid '{param}': a tool call needs function.name (a string).", param=f"{param}.function",
                       code="invalid_value")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise APIError(400, f"Invalid type for '{param}.function.arguments': expected a string (JSON text).",
                       param=f"{param}.function.arguments", code="invalid_type")
    return {"id": str(call.get("id", "")), "type": call.get("type") or "function",
            "function": {"name": function["name"], "arguments": arguments}}


def template_variables(tokenizer, config) -> frozenset[str]:
    """What the prompt's renderer reads: the chat template's variables, or those of V3.2's encoder."""
    return encoding_dsv32.VARIABLES if config.chat_encoder == "deepseek_v32" else \
        tokenizer.template_variables(config.chat_template)


def render_prompt(tokenizer, messages: list[dict[str, Any]], config, template_kwargs: dict[str, Any] | None = None,
                  add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages`: the chat template, or V3.2's encoder for a checkpoint that ships none (which
    always ends a user turn with the assistant's opening)."""
    if config.chat_encoder == "deepseek_v32":
        kwargs = template_kwargs or {}
        return encoding_dsv32.encode(messages, kwargs.get("tools"), bool(kwargs.get("thinking")))
    return tokenizer.apply_chat_template(messages, add_generation_prompt, config.chat_template, template_kwargs)


def finish_prompt(prompt: str, plan: ChatPlan) -> str:
    return r1.close_reasoning(prompt) if plan.close_thinking else prompt


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def read_answer(text: str, plan: ChatPlan, starts_in_reasoning: bool) -> tuple[str | None, str | None, list[dict]]:
    """One finished output -> (reasoning_content, content, tool_calls as OpenAI writes them)."""
    if plan.reasoning:
        reasoning, answer = r1.split(text, starts_in_reasoning)
    else:
        reasoning, answer = None, text
    if plan.tool_format is None:
        return reasoning, answer, []
    parsed = plan.tool_format.parse(answer or "")
    calls = parsed.calls if plan.parallel_tool_calls else parsed.calls[:1]
    return reasoning, parsed.content or None, [
        {"id": tool_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls]


class AnswerStream:
    """Cumulative output text -> (reasoning delta, content delta, tool-call deltas as OpenAI streams them)."""

    def __init__(self, plan: ChatPlan, starts_in_reasoning: bool):
        self.plan = plan
        self.reasoning = r1.ReasoningStream(starts_in_reasoning) if plan.reasoning else None
        self.tools = ToolCallStream(plan.tool_format) if plan.tool_format is not None else None
        self.answer = ""
        self.sent_answer = 0
        self.num_calls = 0

    def update(self, text: str, finished: bool) -> tuple[str, str, list[dict]]:
        if self.reasoning is not None:
            delta_reasoning, delta_answer = self.reasoning.update(text, finished)
            self.answer += delta_answer
        else:
            delta_reasoning, self.answer = "", text
        if self.tools is None:
            delta_content = self.answer[self.sent_answer:]
            self.sent_answer = len(self.answer)
            return delta_reasoning, delta_content, []
        delta_content, deltas = self.tools.update(self.answer, finished)
        out = []
        for d in deltas:
            if not self.plan.parallel_tool_calls and d.index > 0:
                continue
            if d.name is not None:
                self.num_calls += 1
                out.append({"index": d.index, "id": tool_call_id(), "type": "function",
                            "function": {"name": d.name, "arguments": d.arguments}})
            else:
                out.append({"index": d.index, "function": {"arguments": d.arguments}})
        return delta_reasoning, delta_content, out


def structured_output(req: ChatCompletionRequest, plan: ChatPlan, after_token_id: int | None,
                      special_tokens: dict[str, int] | None = None) -> StructuredOutput | None:
    """The grammar a request's output must follow, or None: response_format, vLLM's guided_* fields or its
    structured_outputs object, and tool_choice "required" or a named tool (then the output is tool calls with
    arguments valid for the tool's parameters). A reasoning model reasons freely first (`after_token_id`).
    `special_tokens`: the tokenizer's special marker tokens, which the call grammar names by id."""
    answer = answer_constraint(req)
    forced = plan.tool_format is not None and plan.tool_choice != "auto"
    if forced and answer is not None:  # the answer is calls only: the field would have nothing to hold
        raise APIError(400, f"'{answer[0]}' cannot be combined with tool_choice 'required' or a named tool, whose "
                       "answer is tool calls only; use tool_choice 'auto' for 'a call or this answer'.",
                       param=answer[0], code="unsupported_parameter")
    tools_open = plan.tool_format is not None
    if not forced and answer is None:
        return None
    if tools_open:
        tools = plan.tools
        if isinstance(plan.tool_choice, dict):
            tools = [t for t in tools if t["function"]["name"] == plan.tool_choice["function"]["name"]]
        try:
            calls = call_grammar(tools, plan.tool_format.name, plan.parallel_tool_calls, with_json_style,
                                 special_tokens)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param, code="unsupported_parameter") from None
        if not forced:
            field_name, spec = answer
            if spec.json_schema is None:
                raise APIError(400, f"'{field_name}' cannot be combined with tools; only a JSON answer can "
                               "(response_format json_object or json_schema).", param=field_name,
                               code="unsupported_parameter")
            calls = calls.replace("start: calls | BLANK calls", "start: calls | BLANK calls | answer\nanswer: %json "
                                  + json.dumps(with_json_style(spec.json_schema), ensure_ascii=False), 1)
        return StructuredOutput(lark=calls, param="tools", after_token_id=after_token_id)
    field_name, spec = answer
    return dataclasses.replace(spec, after_token_id=after_token_id)
