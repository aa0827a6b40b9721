"""POST /v1/chat/completions: template the messages, run, split reasoning from content, render JSON or SSE."""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsserve.errors import DsserveError
from dsserve.reasoning import r1
from dsserve.server.common import (
    EventWriter, check_chars, check_stop, engine_request_id, final_output, json_string, max_tokens_for, note,
    note_output, results, sampling_params, stream_error, token_text, truncate, usage,
)
from dsserve.server.protocol import APIError, ChatCompletionRequest
from dsserve.server.state import read_request


async def create_chat_completion(http: Request):
    state = http.app.state.dsserve
    req = await read_request(http, state, ChatCompletionRequest)
    state.check_model(req.model)
    note(http, model=req.model)
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so chat messages cannot be templated; use /v1/completions "
                       "with token ids", param="messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs is only allowed when logprobs is true.", param="top_logprobs")
    config = state.config
    if len(req.messages) > config.max_messages:
        raise APIError(400, f"Invalid 'messages': {len(req.messages)} messages; the server takes at most "
                       f"{config.max_messages} per request (--max-messages).", param="messages", code="invalid_value")
    check_stop(req, config)
    messages = _messages(req, config.strict_reasoning_history)
    num_chars = sum(len(m["content"]) + len(m.get("name") or "") + (len(str(m["tool_calls"])) if m.get("tool_calls")
                    else 0) for m in messages)
    check_chars(num_chars, config, "messages")
    state.admit(req.n)  # before the templating work: a full server refuses at once
    if num_chars > _INLINE_CHARS or len(messages) > _INLINE_MESSAGES:
        prompt_ids = await state.run_blocking(_prompt_ids, state, tokenizer, messages, req.chat_template_kwargs)
    else:
        prompt_ids = _prompt_ids(state, tokenizer, messages, req.chat_template_kwargs)
    max_tokens = max_tokens_for(state, len(prompt_ids), req.max_completion_tokens or req.max_tokens, req.n, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, logprobs, None, state.engine.engine.model_config.vocab_size)
    rid = engine_request_id(state, "chatcmpl", http)
    prompt = {"prompt_token_ids": prompt_ids}
    reasoning = state.config.reasoning_parser == "deepseek_r1"
    end_id = tokenizer.token_to_id(r1.END) if reasoning else None
    prompt_text = messages if state.audit is not None and state.audit.content else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        state.admit(req.n)  # refuse with a status code (503) before the 200 of a stream is sent
        return StreamingResponse(
            _stream(state, http, rid, prompt, params, req.model, reasoning, end_id, include_usage, tokenizer,
                    prompt_text),
            media_type="text/event-stream",
        )
    output = await final_output(state, http, rid, prompt, params)
    note_output(http, state, output, prompt_text)
    render = functools.partial(_response, output, rid, req.model, reasoning, end_id, logprobs, tokenizer)
    if logprobs is not None or sum(len(c.token_ids) for c in output.outputs) > _INLINE_TOKENS:
        return await state.run_blocking(render)
    return render()


# Below these sizes a request's templating or response is cheaper to do on the event loop than to hand to a thread.
_INLINE_CHARS, _INLINE_MESSAGES, _INLINE_TOKENS = 16_384, 64, 4096


def _prompt_ids(state, tokenizer, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None) -> list[int]:
    try:
        prompt_ids = tokenizer.encode(
            tokenizer.apply_chat_template(messages, True, state.config.chat_template, template_kwargs),
            add_special_tokens=False,
        )
    except DsserveError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None) or "messages", code="invalid_value") from None
    return truncate(state, prompt_ids)


def _response(output, rid, model, reasoning, end_id, logprobs, tokenizer) -> JSONResponse:
    choices = []
    for c in output.outputs:
        message: dict[str, Any] = {"role": "assistant"}
        if reasoning:
            message["reasoning_content"], message["content"] = r1.split(c.text)
        else:
            message["content"] = c.text
        choices.append({"index": c.index, "message": message, "logprobs": _logprobs(c.logprobs, c.token_ids, tokenizer)
                        if logprobs is not None else None, "finish_reason": c.finish_reason})
    reasoning_tokens = sum(r1.count_reasoning_tokens(c.token_ids, end_id) for c in output.outputs) if reasoning else None
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None, "choices": choices, "usage": usage(output, reasoning_tokens),
    })


def _messages(req: ChatCompletionRequest, strict: bool) -> list[dict[str, Any]]:
    """Plain dicts for the template; text parts joined; earlier reasoning dropped (R1 must not see it again)."""
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
        message = {"role": role, "content": content if content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        out.append(message)
    return out


def _logprobs(entries, token_ids, tokenizer) -> dict[str, Any]:
    content = []
    for token, (logprob, alternatives) in zip(token_ids, entries or []):
        text = token_text(tokenizer, token)
        content.append({
            "token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": token_text(tokenizer, t), "logprob": lp, "bytes": list(token_text(tokenizer, t).encode())}
                             for t, lp in sorted(alternatives.items(), key=lambda kv: -kv[1])],
        })
    return {"content": content}


_DELTA = '{"index":%d,"delta":{"%s":%s},"logprobs":null,"finish_reason":null}'  # a text delta without logprobs


class _Render:
    """One streamed chat completion's events, output by output: reasoning split from content (R1), logprobs. The
    handler calls it, and so does the step's direct writer (server/direct.py) for the outputs that arrive while the
    handler waits: both the same renderer, in turn."""

    def __init__(self, events: EventWriter, params, reasoning: bool, tokenizer):
        self.events, self.params, self.reasoning, self.tokenizer = events, params, reasoning, tokenizer
        self.sent_text = [0] * params.n
        self.sent_tokens = [0] * params.n
        self.splitters = [r1.ReasoningStream() for _ in range(params.n)]
        self.finished = [False] * params.n

    def __call__(self, output) -> bytes:
        events, chunks = self.events, []
        for c in output.outputs:
            i = c.index
            if self.finished[i]:
                continue
            done = c.finish_reason is not None
            logprobs = None
            if self.params.logprobs is not None and c.logprobs:
                logprobs = _logprobs(c.logprobs[self.sent_tokens[i]:], c.token_ids[self.sent_tokens[i]:], self.tokenizer)
            self.sent_tokens[i] = len(c.token_ids)
            if self.reasoning:
                delta_reasoning, delta_content = self.splitters[i].update(c.text, done)
            else:
                delta_reasoning, delta_content = "", c.text[self.sent_text[i]:]
                self.sent_text[i] = len(c.text)
            if delta_reasoning:
                chunks.append(events.event({"index": i, "delta": {"reasoning_content": delta_reasoning},
                                            "logprobs": logprobs, "finish_reason": None}) if logprobs else
                              events.encoded(_DELTA % (i, "reasoning_content", json_string(delta_reasoning))))
                logprobs = None
            if delta_content or (logprobs and not delta_reasoning):
                chunks.append(events.event({"index": i, "delta": {"content": delta_content}, "logprobs": logprobs,
                                            "finish_reason": None}) if logprobs else
                              events.encoded(_DELTA % (i, "content", json_string(delta_content))))
            if done:
                self.finished[i] = True
                chunks.append(events.event({"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": c.finish_reason}))
        return b"".join(chunks)


async def _stream(state, http, rid, prompt, params, model, reasoning, end_id, include_usage, tokenizer, prompt_text):
    events = EventWriter({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                          "system_fingerprint": None}, include_usage)
    render = _Render(events, params, reasoning, tokenizer)
    last = None
    try:
        yield b"".join(events.event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}) for i in range(params.n))
        async for output in results(state, http, rid, prompt, params, render):
            last = output
            chunk = render(output)
            if chunk:
                yield chunk
        if include_usage and last is not None:
            reasoning_tokens = (sum(r1.count_reasoning_tokens(c.token_ids, end_id) for c in last.outputs)
                                if reasoning else None)
            yield events.usage_event(usage(last, reasoning_tokens))
    except APIError as e:
        yield events.error_event(e.body())
    except DsserveError as e:
        yield events.error_event(stream_error(http, e).body())
    finally:
        note_output(http, state, last, prompt_text)
    yield events.done
