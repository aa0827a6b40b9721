"""What the chat and completion endpoints share: sampling parameters, context checks, running a request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from dsserve.engine.engine import RequestOutput
from dsserve.engine.request import SamplingParams
from dsserve.errors import DsserveError, EngineDeadError, InvalidRequestError, RequestFailedError, ShuttingDownError
from dsserve.server.direct import DirectWriter
from dsserve.server.protocol import APIError, SamplingFields
from dsserve.server.state import RECORD_KEY, internal_error, note, request_id_of

logger = logging.getLogger(__name__)


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


def max_tokens_for(state, prompt_len: int, requested: int | None, num_seqs: int, param: str,
                   default: int | None = None) -> int:
    """The max_tokens of each of a request's `num_seqs` sequences (n x prompts): what the client asked for, checked
    against the context and the server's per-request budget (--max-request-tokens), or, when it asked for none,
    `default` or the server's --max-tokens-default, within what fits the context and the budget."""
    limit, config = state.max_model_len, state.config
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
                       f"{prompt_len} tokens. Please reduce the length of the {param}.", param=param,
                       code="context_length_exceeded")
    budget = config.max_request_tokens // num_seqs
    if requested is None:
        if budget < 1:
            raise APIError(400, f"This request asks for {num_seqs} sequences; the server generates at most "
                           f"{config.max_request_tokens} tokens per request (--max-request-tokens). Lower n or send "
                           "fewer prompts.", param="n", code="invalid_value")
        wanted = default or config.max_tokens_default or limit - prompt_len
        return max(1, min(wanted, limit - prompt_len, budget))
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the {param}, {requested} in the completion). "
                       "Please reduce the length of the messages or completion.", param="max_tokens",
                       code="context_length_exceeded")
    if requested * num_seqs > config.max_request_tokens:
        raise APIError(400, f"max_tokens {requested} x {num_seqs} sequences (n x prompts) = {requested * num_seqs} "
                       f"tokens is more than the server generates for one request ({config.max_request_tokens}, "
                       "--max-request-tokens). Lower max_tokens or n.", param="max_tokens", code="invalid_value")
    return requested


def check_stop(req: SamplingFields, config) -> None:
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > config.max_stop:
        raise APIError(400, f"Invalid 'stop': {len(stop)} stop strings; the server takes at most {config.max_stop} "
                       "(--max-stop).", param="stop", code="invalid_value")
    for i, text in enumerate(stop):
        if len(text) > config.max_stop_chars:
            raise APIError(400, f"Invalid 'stop[{i}]': {len(text)} characters; a stop string may have at most "
                           f"{config.max_stop_chars} (--max-stop-chars).", param=f"stop[{i}]", code="invalid_value")
        if not text:
            raise APIError(400, f"Invalid 'stop[{i}]': an empty stop string would end every completion at once.",
                           param=f"stop[{i}]", code="invalid_value")


def check_chars(num_chars: int, config, param: str) -> None:
    if num_chars > config.max_prompt_chars:
        raise APIError(400, f"The {param} hold {num_chars} characters; the server takes at most "
                       f"{config.max_prompt_chars} per request (--max-prompt-chars).", param=param,
                       code="context_length_exceeded")


def note_output(http: Request, state, output: RequestOutput | None, prompt_text=None) -> None:
    """Tokens and finish reasons of a finished (or abandoned) request, and its text when the audit log keeps it."""
    if output is None:
        return
    fields: dict[str, Any] = {
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": sum(len(c.token_ids) for c in output.outputs),
        "finish_reason": [c.finish_reason for c in output.outputs],
    }
    if state.audit is not None and state.audit.content:
        fields["prompt"] = prompt_text
        fields["completion"] = [c.text for c in output.outputs]
    note(http, **fields)


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
    top_k = min(req.top_k, vocab_size) if req.top_k is not None and req.top_k > 0 else req.top_k
    try:
        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=top_k, min_p=req.min_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(req.logit_bias, vocab_size),
        )
    except InvalidRequestError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None), code="invalid_value") from None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size or not key.strip().isdigit():
            raise APIError(400, f"Invalid 'logit_bias': the key {key[:40]!r} is not a token id in [0, {vocab_size}).",
                           param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:  # NaN fails this too
            raise APIError(400, f"Invalid 'logit_bias': the bias {value} of token {token} is outside [-100, 100].",
                           param="logit_bias", code="invalid_value")
        out[token] = value
    return out


def engine_request_id(state, prefix: str, http: Request) -> str:
    """The engine's id for a request: the X-Request-Id under the endpoint's prefix, so that the engine's log lines
    carry it. A client's own id gets a random suffix: two requests may send the same one (a retry, a proxy)."""
    record = http.scope.get(RECORD_KEY)
    if record is None:
        return request_id(prefix)
    rid = f"{prefix}-{record['request_id']}"
    return f"{rid}-{uuid.uuid4().hex[:8]}" if record.get("client_request_id") else rid


async def results(state, http: Request, rid: str, prompt: Any, params: SamplingParams,
                  render: Callable[[RequestOutput], bytes] | None = None) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request; the request is aborted when the client disconnects. A failure inside the
    engine that belongs to this request alone (RequestFailedError) is a 500 for this request, without its cause
    (logged under the request id).

    `render`: the stream's renderer, which the caller applies to every output it gets and sends the bytes of. Then
    the outputs that arrive while the caller waits here are rendered and written straight to the connection instead
    of being yielded (server/direct.py), unless --no-direct-writes or the connection is not uvicorn's."""
    direct = DirectWriter.of(http.scope, render) if render is not None and state.config.direct_writes else None
    state.admit(params.n)
    state.in_flight += params.n
    state.metrics.arrived(rid, time.perf_counter())
    stream = state.engine.generate(rid, prompt, params, direct.take if direct is not None else None)
    finished = rejected = False
    try:
        while not finished:
            if direct is None:
                output = await anext(stream)
            else:
                direct.is_parked = True  # all the caller sent is on the wire: the writer may write until it wakes
                try:
                    output = await anext(stream)
                finally:
                    direct.is_parked = False
            finished = output.finished
            yield output
    except InvalidRequestError as e:
        rejected = True
        raise APIError(400, str(e), param=getattr(e, "param", None), code="invalid_value") from None
    except RequestFailedError as e:
        rejected = True
        raise APIError(500, f"{e}; the operator can find the cause in the server log under request id {rid}.",
                       type="internal_server_error") from None
    finally:
        state.in_flight -= params.n
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
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await http.is_disconnected():
                note(http, finish_reason="client disconnected")
                raise APIError(499, "client disconnected", code="client_closed_request")
        return task.result()
    finally:
        if not task.done():  # the client left, or this handler was cancelled: the request is aborted
            task.cancel()


def stream_error(http: Request, error: DsserveError) -> APIError:
    """The error event that ends a stream the engine could not finish: no exception text, the request id."""
    if isinstance(error, ShuttingDownError):
        return APIError(503, str(error), type="server_overloaded", code="server_shutting_down")
    logger.error("request %s: stream ended by %r", request_id_of(http), error)
    if isinstance(error, EngineDeadError):
        return APIError(500, "The engine has stopped after an internal error; the server is shutting down. (request "
                        f"id {request_id_of(http)})", type="internal_server_error")
    return internal_error(request_id_of(http))


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
