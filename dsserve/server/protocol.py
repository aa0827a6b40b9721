"""OpenAI (and DeepSeek) request schemas, and the OpenAI error object with OpenAI's wording and status codes."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class APIError(Exception):
    """An error rendered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on 429 and 503

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Booleans are JSON booleans: pydantic's lax mode would take "yes", "off" or 1, where OpenAI answers 400.


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # like vLLM: unknown fields are ignored, not rejected


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # past the vocabulary: all of it (clamped, as vLLM)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # torch generators take a signed 64-bit seed
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = Field(None)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: StrictBool = False
    min_tokens: int = Field(0, ge=0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # token id (as a string, OpenAI's form) -> bias in [-100, 100]; at most 300 entries, as OpenAI
    logit_bias: dict[str, float] | None = Field(None, max_length=300)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)  # None: the server's --max-tokens-default, else OpenAI's 16
    echo: StrictBool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # refused: no fill-in-the-middle


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def parse(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Body bytes -> a validated request, or an APIError worded as OpenAI words it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise APIError(400, _JSON_MESSAGE) from None
    if not isinstance(data, dict):
        raise APIError(400, _JSON_MESSAGE)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e.errors(include_url=False)[0], data) from None


_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library "
    "correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)

_TYPE_NAMES = {
    "string_type": "a string", "float_type": "a number", "float_parsing": "a number", "int_type": "an integer",
    "int_parsing": "an integer", "int_from_float": "an integer", "bool_type": "a boolean", "bool_parsing": "a boolean",
    "list_type": "an array", "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[ContentPart]", "function-after"):
            continue  # union branch names that pydantic inserts
        else:
            out += ("." if out else "") + str(part)
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _from_validation(err: dict, data: dict) -> APIError:
    kind, param, value = err["type"], _param(err["loc"]), err.get("input")
    ctx = err.get("ctx", {})
    if kind == "missing":
        if param == "model":
            return APIError(400, "you must provide a model parameter", param="model")
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind in ("less_than_equal", "less_than"):
        return APIError(400, f"{value} is greater than the maximum of {ctx.get('le', ctx.get('lt'))} - '{param}'",
                        param=param, code="invalid_value")
    if kind in ("greater_than_equal", "greater_than"):
        return APIError(400, f"{value} is less than the minimum of {ctx.get('ge', ctx.get('gt'))} - '{param}'",
                        param=param, code="invalid_value")
    if kind == "too_short" and param == "messages":
        return APIError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
                        "empty array instead.", param="messages", code="empty_array")
    if kind in ("too_short", "too_long"):
        return APIError(400, f"Invalid '{param}': {err['msg']}.", param=param, code="invalid_value")
    if kind == "literal_error" and param.endswith("role"):
        return APIError(400, f"Invalid value: '{value}'. Supported values are: 'system', 'assistant', 'user', "
                        "'function', 'tool', and 'developer'.", param=param, code="invalid_value")
    if kind in _TYPE_NAMES:
        return APIError(400, f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, but got {_json_type(value)} "
                        "instead.", param=param, code="invalid_type")
    return APIError(400, f"Invalid value for '{param}': {err['msg']}.", param=param, code="invalid_value")
