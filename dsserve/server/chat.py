"""POST /v1/chat/completions: template the messages, run, read reasoning, content and tool calls, render JSON or SSE."""

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
from dsserve.server.agent import (
    AnswerStream, ChatPlan, finish_prompt, plan_chat, read_answer, render_prompt, structured_output,
    template_messages, template_variables,
)
from dsserve.server.constraints import check_min_tokens
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
    plan = plan_chat(req, config, template_variables(tokenizer, config))
    messages = template_messages(req, plan, config.strict_reasoning_history)
    num_chars = sum(len(m["content"]) + len(m.get("name") or "") + (len(str(m["tool_calls"])) if m.get("tool_calls")
                    else 0) for m in messages)
    check_chars(num_chars, config, "messages")
    state.admit(req.n)  # before the templating work: a full server refuses at once
    if num_chars > _INLINE_CHARS or len(messages) > _INLINE_MESSAGES:
        prompt_text, prompt_ids = await state.run_blocking(_prompt_ids, state, tokenizer, messages, plan)
    else:
        prompt_text, prompt_ids = _prompt_ids(state, tokenizer, messages, plan)
    max_tokens = max_tokens_for(state, len(prompt_ids), req.max_completion_tokens or req.max_tokens, req.n, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, logprobs, None, state.engine.engine.model_config.vocab_size)
    rid = engine_request_id(state, "chatcmpl", http)
    prompt = {"prompt_token_ids": prompt_ids}
    starts_in_reasoning = plan.reasoning and r1.prompt_opens_reasoning(prompt_text)
    end_id = tokenizer.token_to_id(r1.END) if plan.reasoning else None
    params.structured = structured_output(req, plan, end_id if starts_in_reasoning else None, tokenizer.special_markers)
    if params.structured is not None and starts_in_reasoning and end_id is None:
        raise APIError(400, "This model's end of reasoning (</think>) is not one token, so a grammar cannot wait for "
                       "it; turn the reasoning off with chat_template_kwargs {\"thinking\": false}.",
                       param=params.structured.param, code="unsupported_parameter")
    check_min_tokens(params.structured, params.min_tokens)
    audit_text = messages if state.audit is not None and state.audit.content else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        state.admit(req.n)  # refuse with a status code (503) before the 200 of a stream is sent
        return StreamingResponse(
            _stream(state, http, rid, prompt, params, req.model, plan, starts_in_reasoning, end_id, include_usage,
                    tokenizer, audit_text),
            media_type="text/event-stream",
        )
    output = await final_output(state, http, rid, prompt, params)
    note_output(http, state, output, audit_text)
    render = functools.partial(_response, output, rid, req.model, plan, starts_in_reasoning, end_id, logprobs,
                               tokenizer)
    if logprobs is not None or sum(len(c.token_ids) for c in output.outputs) > _INLINE_TOKENS:
        return await state.run_blocking(render)
    return render()


# Below these sizes a request's templating or response is cheaper to do on the event loop than to hand to a thread.
_INLINE_CHARS, _INLINE_MESSAGES, _INLINE_TOKENS = 16_384, 64, 4096


def _prompt_ids(state, tokenizer, messages: list[dict[str, Any]], plan: ChatPlan) -> tuple[str, list[int]]:
    try:
        text = finish_prompt(render_prompt(tokenizer, messages, state.config, plan.template_kwargs), plan)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    except DsserveError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None) or "messages", code="invalid_value") from None
    return text, truncate(state, prompt_ids)


def _response(output, rid, model, plan, starts_in_reasoning, end_id, logprobs, tokenizer) -> JSONResponse:
    choices = []
    reasoning_tokens = 0
    for c in output.outputs:
        reasoning, content, tool_calls = read_answer(c.text, plan, starts_in_reasoning)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if plan.reasoning:
            message["reasoning_content"] = reasoning
            reasoning_tokens += r1.count_reasoning_tokens(c.token_ids, end_id, reasoning is not None)
        if tool_calls:
            message["tool_calls"] = tool_calls
        choices.append({"index": c.index, "message": message, "logprobs": _logprobs(c.logprobs, c.token_ids, tokenizer)
                        if logprobs is not None else None, "finish_reason": _finish_reason(c.finish_reason, tool_calls)})
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None, "choices": choices,
        "usage": usage(output, reasoning_tokens if plan.reasoning else None),
    })


def _finish_reason(reason: str | None, tool_calls) -> str | None:
    return "tool_calls" if tool_calls and reason == "stop" else reason


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
    """One streamed chat completion's events, output by output: reasoning, content and tool calls read by the same
    rules as the non-streamed response (server/agent.py), logprobs. The handler calls it, and so does the step's
    direct writer (server/direct.py) for the outputs that arrive while the handler waits: both the same renderer,
    in turn."""

    def __init__(self, events: EventWriter, params, plan: ChatPlan, starts_in_reasoning: bool, tokenizer):
        self.events, self.params, self.plan, self.tokenizer = events, params, plan, tokenizer
        self.sent_tokens = [0] * params.n
        self.answers = [AnswerStream(plan, starts_in_reasoning) for _ in range(params.n)]
        self.finished = [False] * params.n
        self.has_reasoning = [False] * params.n

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
            delta_reasoning, delta_content, tool_calls = self.answers[i].update(c.text, done)
            if delta_reasoning:
                self.has_reasoning[i] = True
                chunks.append(events.event({"index": i, "delta": {"reasoning_content": delta_reasoning},
                                            "logprobs": logprobs, "finish_reason": None}) if logprobs else
                              events.encoded(_DELTA % (i, "reasoning_content", json_string(delta_reasoning))))
                logprobs = None
            if delta_content or (logprobs and not delta_reasoning and not tool_calls):
                chunks.append(events.event({"index": i, "delta": {"content": delta_content}, "logprobs": logprobs,
                                            "finish_reason": None}) if logprobs else
                              events.encoded(_DELTA % (i, "content", json_string(delta_content))))
                logprobs = None
            if tool_calls:
                chunks.append(events.event({"index": i, "delta": {"tool_calls": tool_calls}, "logprobs": logprobs,
                                            "finish_reason": None}))
            if done:
                self.finished[i] = True
                chunks.append(events.event({"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(
                    c.finish_reason, self.answers[i].num_calls)}))
        return b"".join(chunks)


async def _stream(state, http, rid, prompt, params, model, plan, starts_in_reasoning, end_id, include_usage, tokenizer,
                  audit_text):
    events = EventWriter({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                          "system_fingerprint": None}, include_usage)
    render = _Render(events, params, plan, starts_in_reasoning, tokenizer)
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
            reasoning_tokens = (sum(r1.count_reasoning_tokens(c.token_ids, end_id, render.has_reasoning[c.index])
                                    for c in last.outputs) if plan.reasoning else None)
            yield events.usage_event(usage(last, reasoning_tokens))
    except APIError as e:
        yield events.error_event(e.body())
    except DsserveError as e:
        yield events.error_event(stream_error(http, e).body())
    finally:
        note_output(http, state, last, audit_text)
    yield events.done
