"""What the chat and completion endpoints share: sampling parameters, context checks, running a request."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from dsserve.engine.engine import RequestOutput
from dsserve.engine.request import SamplingParams
from dsserve.errors import InvalidRequestError
from dsserve.server.protocol import APIError, SamplingFields


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one encoder, not one per call
# A str as a JSON string, as `_encode` writes it (C, non-ASCII kept). The chunk of one streamed token is a fixed
# shape around one string: formatting it around this costs a sixth of encoding the same dict.
json_string = json.encoder.encode_basestring


class EventWriter:
    """The server-sent events of one streamed response. Every chunk repeats the response's id, object, created and
    model (and `"usage": null` when the client asked for usage at the end), so those bytes are encoded once and
    each event encodes only its choices: per streamed token this was the HTTP thread's largest piece of Python
    after the socket write (py-spy), and that thread's time comes out of the engine's on a small CPU."""

    done = b"data: [DONE]\n\n"

    def __init__(self, head: dict[str, Any], include_usage: bool):
        self._prefix = f"data: {_encode(head)[:-1]},\"choices\":[".encode()
        self._suffix = ("],\"usage\":null}\n\n" if include_usage else "]}\n\n").encode()

    def event(self, *choices: dict[str, Any]) -> bytes:
        return self._prefix + ",".join(map(_encode, choices)).encode() + self._suffix

    def encoded(self, choice: str) -> bytes:
        """An event of one choice already encoded as JSON (the per-token chunks: see `json_string`)."""
        return self._prefix + choice.encode() + self._suffix

    def usage_event(self, usage_body: dict[str, Any]) -> bytes:
        """The last chunk of a stream that asked for usage: no choices."""
        return self._prefix + b"]," + f"\"usage\":{_encode(usage_body)}}}\n\n".encode()

    @staticmethod
    def error_event(body: dict[str, Any]) -> bytes:
        """An error ends the stream: ASCII-escaped, so that no message text can keep it (and [DONE]) from being sent."""
        return f"data: {json.dumps(body)}\n\n".encode()


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def fit_context(state, prompt_len: int, max_tokens: int | None, param: str) -> tuple[list | None, int]:
    """Check prompt + max_tokens against the context; returns the max_tokens to use."""
    limit = state.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
                       f"{prompt_len} tokens. Please reduce the length of the {param}.", param=param,
                       code="context_length_exceeded")
    if max_tokens is None:
        return None, limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the completion). "
                       "Please reduce the length of the messages or completion.", param="max_tokens",
                       code="context_length_exceeded")
    return None, max_tokens


def truncate(state, token_ids: list[int]) -> list[int]:
    """MindIE's `truncation`: with --truncate-input, prompts longer than --max-input-len keep their last tokens."""
    limit = state.config.max_input_len
    if limit is not None and len(token_ids) > limit:
        if not state.config.truncate_input:
            raise APIError(400, f"The prompt has {len(token_ids)} tokens, more than the server's --max-input-len "
                           f"{limit}.", param="messages", code="context_length_exceeded")
        return token_ids[-limit:]
    return token_ids


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                    vocab_size: int) -> SamplingParams:
    for token in req.stop_token_ids or []:
        if not 0 <= token < vocab_size:
            raise APIError(400, f"stop_token_ids contains {token}, which is out of vocabulary (size {vocab_size}).",
                           param="stop_token_ids", code="invalid_value")
    try:
        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )
    except InvalidRequestError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None), code="invalid_value") from None


async def results(state, http: Request, rid: str, prompt: Any, params: SamplingParams,
                  sink: Callable[[RequestOutput], bool] | None = None) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request (but those `sink` takes: AsyncEngine.generate); the request is aborted
    when the client disconnects."""
    state.admit()
    state.in_flight += 1
    state.metrics.arrived(rid, time.perf_counter())
    stream = state.engine.generate(rid, prompt, params, sink)
    finished = rejected = False
    try:
        async for output in stream:
            finished = output.finished
            yield output
    except InvalidRequestError as e:
        rejected = True
        raise APIError(400, str(e), param=getattr(e, "param", None), code="invalid_value") from None
    finally:
        state.in_flight -= 1
        state.metrics.forget(rid, aborted=not (finished or rejected))
        await stream.aclose()


async def final_output(state, http: Request, rid: str, prompt: Any, params: SamplingParams) -> RequestOutput:
    """Run to completion, watching for a disconnect (then the request is aborted and its blocks freed)."""
    async def collect() -> RequestOutput:
        last = None
        async for output in results(state, http, rid, prompt, params):
            last = output
        return last

    task = asyncio.ensure_future(collect())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await http.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected", code="client_closed_request")
    return task.result()


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)


def usage(output: RequestOutput, reasoning_tokens: int | None = None) -> dict[str, Any]:
    completion = sum(len(c.token_ids) for c in output.outputs)
    prompt = len(output.prompt_token_ids)
    body: dict[str, Any] = {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens},
    }
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body
