"""DeepSeek-V3.2's prompt format: V3.2 ships no Jinja chat template but a Python encoder, rendered here the same way.

Source: encoding/encoding_dsv32.py of the deepseek-ai/DeepSeek-V3.2 (and V3.2-Exp) Hugging Face repository, as
vendored by SGLang (python/sglang/srt/entrypoints/openai/encoding_dsv32.py) and vLLM
(vllm/tokenizers/deepseek_v32_encoding.py). Its render_message, one message at a time:

- system: the content; with tools, "\\n\\n" and the tools prompt (TOOLS_SYSTEM_TEMPLATE below, the functions as JSON
  lines). The request's tools go on the first system message (one is added, empty, when there is none: SGLang's
  serving code; vLLM always adds one).
- user: `<｜User｜>content<｜Assistant｜>`, then `<think>` for the last user message in thinking mode, else
  `</think>`.
- assistant: in thinking mode after the last user message, its reasoning_content and `</think>`; the content; its
  tool calls as a DSML block after "\\n\\n" (string arguments raw with string="true", the others as JSON); then
  `<｜end▁of▁sentence｜>`.
- tool: the results of the preceding assistant's calls, in order, in one `<function_results>` block of
  `<result>...</result>` lines, followed by "\\n\\n" and `<think>` (thinking mode, after the last user message) or
  `</think>`.

A developer message is a system message here (server/agent.py maps it, as for every other template).
"""

from __future__ import annotations

import json
from typing import Any

from dsserve.errors import InvalidRequestError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"

# The variables this format reads, as Tokenizer.template_variables names a Jinja template's: server/agent.py then
# passes the tools and the thinking switch to it and keeps earlier reasoning_content in the history.
VARIABLES = frozenset({"tools", "thinking", "reasoning_content"})

TOOLS_SYSTEM_TEMPLATE = """## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:
<{dsml}function_calls>
...
</{dsml}function_calls>
<function_results>
...
</function_results>
{think_start}...thinking about results{think_end}
Here are the functions available in JSONSchema format:
<functions>
{functions}
</functions>
"""


def encode(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, thinking: bool = False) -> str:
    """The prompt of a conversation (OpenAI-style message dicts, tool calls' arguments as JSON text), with BOS."""
    messages = list(messages)
    if tools:
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "tools": tools}
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return BOS + "".join(_message(i, messages, last_user, thinking) for i in range(len(messages)))


def _message(index: int, messages: list[dict[str, Any]], last_user: int, thinking: bool) -> str:
    message = messages[index]
    role, content = message["role"], message.get("content") or ""
    if role == "system":
        tools = message.get("tools")
        return content + ("\n\n" + _tools_prompt(tools) if tools else "")
    if role == "user":
        return USER + content + ASSISTANT + (THINK_START if thinking and index == last_user else THINK_END)
    if role == "assistant":
        reasoning = ""
        if thinking and index > last_user:
            reasoning = (message.get("reasoning_content") or "") + THINK_END
        calls = message.get("tool_calls") or []
        block = ""
        if calls:
            invokes = "\n".join(f'<{DSML}invoke name="{call["function"]["name"]}">\n'
                                f'{_parameters(call["function"].get("arguments"), index)}\n</{DSML}invoke>'
                                for call in calls)
            block = f"\n\n<{DSML}function_calls>\n{invokes}\n</{DSML}function_calls>"
        return reasoning + content + block + EOS
    if role == "tool":
        owner = index - 1
        while owner >= 0 and messages[owner]["role"] == "tool":
            owner -= 1
        calls = messages[owner].get("tool_calls") or [] if owner >= 0 and messages[owner]["role"] == "assistant" else []
        order = index - owner  # this result answers the assistant's order-th call
        if order > len(calls):
            raise InvalidRequestError(f"messages[{index}] is a tool result with no tool call of the assistant message "
                                      "before it to answer; each tool message follows the assistant's tool_calls, "
                                      "one per call, in order", param=f"messages[{index}]")
        out = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{content}</result>"
        if order == len(calls):
            out += "\n</function_results>\n\n" + (THINK_START if thinking and index >= last_user else THINK_END)
        return out
    raise InvalidRequestError(f"messages[{index}] has role {role!r}, which DeepSeek-V3.2's format does not have",
                              param=f"messages[{index}].role")


def _tools_prompt(tools: list[dict[str, Any]]) -> str:
    functions = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return TOOLS_SYSTEM_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, functions=functions)


def _parameters(arguments: str | dict | None, index: int) -> str:
    """A call's arguments (a JSON object, as text) as DSML parameter elements: strings raw, the rest as JSON."""
    try:
        values = json.loads(arguments) if isinstance(arguments, str) else (arguments or {})
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise InvalidRequestError(f"messages[{index}].tool_calls: a call's function.arguments must be a JSON object "
                                  "for DeepSeek-V3.2's format", param=f"messages[{index}].tool_calls")
    return "\n".join(f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
                     f'{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}</{DSML}parameter>'
                     for key, value in values.items())
