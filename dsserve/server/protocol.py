"""OpenAI (and DeepSeek) request schemas, and the OpenAI error object with OpenAI's wording and status codes."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

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
    # Deprecated or audio parts of an assistant message that this server cannot render: 400 when set.
    function_call: None = None
    audio: None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    include_obfuscation: Literal[False] | None = None  # OpenAI's padding of streamed chunks is not offered: 400 on true


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: the function takes no arguments
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` object (the newer name of its guided_* fields): exactly one key is set."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: StrictBool | None = None


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


class StructuredFields(SamplingFields):
    """The fields that constrain the answer to a grammar (server/constraints.py), on chat and text completions."""

    response_format: ResponseFormat | None = None
    # vLLM's structured-output fields: the older guided_* ones and the newer structured_outputs object
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None


class ChatCompletionRequest(StructuredFields):
    REFUSED: ClassVar[dict[str, tuple[tuple, str]]]  # set below the class
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high", "max"] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # Identifiers that do not change the answer (OpenAI's cache-routing key and abuse-tracking id), like `user`.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(StructuredFields):
    REFUSED: ClassVar[dict[str, tuple[tuple, str]]]  # set below the class
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)  # None: the server's --max-tokens-default, else OpenAI's 16
    echo: StrictBool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    add_special_tokens: StrictBool = True  # text prompts: the tokenizer's BOS (vLLM's default for completions)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# Fields of OpenAI's and vLLM's request bodies that this server does not implement. Sent with a value other than
# the ones listed (their "off" values, which ask for nothing), each is refused with a 400 that names it: ignored, it
# would give the client a different answer than the one it asked for, with status 200.
_VLLM_REFUSED = {
    "use_beam_search": ((False,), "beam search is not supported"),
    "length_penalty": ((1, 1.0), "length_penalty applies to beam search, which is not supported"),
    "logits_processors": ((), "custom logits processors are not supported"),
    "allowed_token_ids": ((), "allowed_token_ids is not supported; use logit_bias"),
    "bad_words": ((), "bad_words is not supported; use logit_bias on their tokens"),
    "include_stop_str_in_output": ((False,), "stop strings are always cut from the output"),
    "skip_special_tokens": ((True,), "special tokens are always skipped in the text"),
    "spaces_between_special_tokens": ((True,), "the detokenizer does not put spaces between special tokens"),
    "truncate_prompt_tokens": ((), "per-request truncation is not supported; the operator sets --max-input-len"),
    "guided_decoding_backend": ((), "the server chooses the grammar backend"),
    "guided_whitespace_pattern": ((), "guided_whitespace_pattern is not supported"),
    "priority": ((0,), "request priorities are not supported; requests run first come, first served"),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids is not supported"),
    "kv_transfer_params": ((), "disaggregated prefill (KV transfer) is not supported"),
    "vllm_xargs": ((), "vllm_xargs is not supported"),
    "cache_salt": ((), "cache_salt is not supported"),
    "mm_processor_kwargs": ((), "this server serves text models"),
    "best_of": ((1,), "best_of is not supported; ask for n samples and pick among them"),
    "prompt_embeds": ((), "prompt embeddings are not supported; send text or token ids"),
    "return_token_ids": ((False,), "token ids are not returned; use /tokenize on the text"),
    "request_id": ((), "send the request's id as the X-Request-Id header"),
    "structural_tag": ((), "structural tags are not supported; use guided_grammar"),
    "max_repetition_pattern_size": ((0,), "repetition detection is not supported"),
    "min_repetition_pattern_size": ((0,), "repetition detection is not supported"),
    "repetition_min_count": ((0,), "repetition detection is not supported"),
    "media_io_kwargs": ((), "this server serves text models"),
    "prompt_cache_retention": (("in-memory", "in_memory"), "prompts are cached in memory only, while the KV cache "
                               "holds them"),
}
ChatCompletionRequest.REFUSED = {
    **_VLLM_REFUSED,
    "functions": ((), "the deprecated 'functions' field is not supported; send the same definitions as 'tools'"),
    "function_call": ((), "the deprecated 'function_call' field is not supported; use 'tool_choice'"),
    "audio": ((), "audio output is not supported; this server answers in text"),
    "modalities": ((["text"],), "only the 'text' modality is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
    "store": ((False,), "this server does not store completions"),
    "metadata": ((), "metadata is kept only with 'store', which this server does not offer"),
    "service_tier": (("auto", "default"), "service tiers are not offered; leave service_tier out or send 'auto'"),
    "verbosity": ((), "verbosity is not supported"),
    "echo": ((False,), "echo is not supported on chat completions; use /v1/completions"),
    "continue_final_message": ((False,), "continue_final_message is not supported"),
    "add_generation_prompt": ((True,), "the chat template's generation prompt is always added"),
    "add_special_tokens": ((False,), "the chat template writes the special tokens; add_special_tokens is not supported"),
    "documents": ((), "documents (RAG templates) are not supported"),
    "chat_template": ((), "a request cannot set the chat template; the operator sets it with --chat-template"),
    "prompt_logprobs": ((), "prompt_logprobs is not supported on chat completions; use /v1/completions with echo"),
    "include_reasoning": ((True,), "the reasoning is always returned, in reasoning_content"),
    "min_tokens_ratio": ((), "min_tokens_ratio is not supported"),
}
CompletionRequest.REFUSED = {
    **_VLLM_REFUSED,
    "suffix": ((), "suffix (fill-in-the-middle) is not supported by this server; leave it out"),
    "prompt_logprobs": ((), "prompt_logprobs is not supported; send echo with logprobs"),
    "stream_options_continuous_usage_stats": ((), "continuous usage stats are not supported"),
}


def parse(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Body bytes -> a validated request, or an APIError worded as OpenAI words it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise APIError(400, _JSON_MESSAGE) from None
    if not isinstance(data, dict):
        raise APIError(400, _JSON_MESSAGE)
    _refuse_unimplemented(data, getattr(schema, "REFUSED", {}))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e.errors(include_url=False)[0], data) from None


def _refuse_unimplemented(data: dict, refused: dict[str, tuple[tuple, str]]) -> None:
    for name, (accepted, reason) in refused.items():
        if name not in data or data[name] is None:
            continue
        value = data[name]
        if any(type(value) is type(ok) and value == ok for ok in accepted):  # 1 is not True, [] is not False
            continue
        raise APIError(400, f"Unsupported parameter: '{name}': {reason}.", param=name, code="unsupported_parameter")


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
        elif part in ("str", "int", "float", "bool", "function-after") or "[" in part or part[:1].isupper():
            continue  # union branch names that pydantic inserts: list[int], literal['a','b'], NamedToolChoice
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
