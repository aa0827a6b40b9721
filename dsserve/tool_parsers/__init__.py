"""Tool calls in DeepSeek's output formats: the text of an answer -> (content, tool calls), streamed or not."""

from dsserve.tool_parsers.deepseek import (
    FORMATS, ParsedOutput, ToolCall, ToolCallFormat, ToolCallStream, ToolCallDelta, call_grammar, detect_format, tool_prompt,
)

__all__ = ["FORMATS", "ParsedOutput", "ToolCall", "ToolCallDelta", "ToolCallFormat", "ToolCallStream", "call_grammar", "detect_format", "tool_prompt"]
