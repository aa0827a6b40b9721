"""POST /v1/completions: text or token-id prompts, echo, prompt and completion logprobs (lm-eval's local-completions)."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsserve.errors import DsserveError, InvalidRequestError
from dsserve.server.common import (
    EventWriter, check_chars, check_stop, engine_request_id, final_output, json_string, max_tokens_for, note,
    note_output, results, sampling_params, stream_error, token_text, truncate, usage,
)
from dsserve.server.constraints import answer_constraint, check_min_tokens
from dsserve.server.protocol import APIError, CompletionRequest
from dsserve.server.state import read_request


async def create_completion(http: Request):
    state = http.app.state.dsserve
    req = await read_request(http, state, CompletionRequest)
    state.check_model(req.model)
    note(http, model=req.model)
    config = state.config
    raw = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else req.prompt
    if len(raw) > config.max_prompts:
        raise APIError(400, f"Invalid 'prompt': {len(raw)} prompts; the server takes at most {config.max_prompts} per "
                       "request (--max-prompts).", param="prompt", code="invalid_value")
    if req.stream and len(raw) > 1:
        raise APIError(400, "streaming supports one prompt per request", param="prompt")
    num_chars = sum(len(p) for p in raw)  # a token id counts as a character
    check_chars(num_chars, config, "prompt")
    check_stop(req, config)
    num_seqs = req.n * len(raw)
    state.admit(num_seqs)  # before the tokenizing work: a full server refuses at once
    tokenizer = state.engine.tokenizer
    vocab = state.engine.engine.model_config.vocab_size
    if num_chars > _INLINE_CHARS:
        prompts = await state.run_blocking(_prompts, raw, tokenizer, vocab, req.add_special_tokens)
    else:
        prompts = _prompts(raw, tokenizer, vocab, req.add_special_tokens)
    answer = answer_constraint(req)  # before any prompt runs: an invalid grammar is the request's 400
    jobs = []
    for ids in prompts:
        ids = truncate(state, ids)
        max_tokens = max_tokens_for(state, len(ids), req.max_tokens, num_seqs, "prompt", default=_DEFAULT_MAX_TOKENS
                                    if config.max_tokens_default is None else None)
        params = sampling_params(req, max_tokens, req.logprobs, req.logprobs if req.echo and req.logprobs is not None
                                 else None, vocab)
        params.structured = answer[1] if answer is not None else None
        check_min_tokens(params.structured, params.min_tokens)
        jobs.append((ids, params))
    rid = engine_request_id(state, "cmpl", http)
    prompt_text = raw if state.audit is not None and state.audit.content else None
    if req.stream:
        ids, params = jobs[0]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        state.admit(num_seqs)  # refuse with a status code (503) before the 200 of a stream is sent
        return StreamingResponse(_stream(state, http, rid, ids, params, req, include_usage, tokenizer, prompt_text),
                                 media_type="text/event-stream")
    tasks = [asyncio.ensure_future(final_output(state, http, f"{rid}-{i}", {"prompt_token_ids": ids}, params))
             for i, (ids, params) in enumerate(jobs)]
    try:
        outputs = await asyncio.gather(*tasks)
    finally:  # one prompt failed (or the client left): the others stop too
        for task in tasks:
            task.cancel()
    note(http, prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
         completion_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
         finish_reason=[c.finish_reason for o in outputs for c in o.outputs],
         **({"prompt": prompt_text, "completion": [c.text for o in outputs for c in o.outputs]}
            if prompt_text is not None else {}))
    render = functools.partial(_response, outputs, rid, req, tokenizer)
    if req.logprobs is not None or sum(len(c.token_ids) for o in outputs for c in o.outputs) > _INLINE_TOKENS:
        return await state.run_blocking(render)
    return render()


_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, when the server sets no --max-tokens-default
# Below these sizes a request's tokenizing or response is cheaper to do on the event loop than to hand to a thread.
_INLINE_CHARS, _INLINE_TOKENS = 16_384, 4096


def _response(outputs, rid, req: CompletionRequest, tokenizer) -> JSONResponse:
    choices, total = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for output in outputs:
        for c in output.outputs:
            choices.append(_choice(len(choices), output, c, req, tokenizer))
        for key, value in usage(output).items():
            if key in total:
                total[key] += value
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                         "choices": choices, "usage": total})


def _prompts(prompt: list, tokenizer, vocab: int, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each prompt (a string, or token ids already)."""
    out = []
    for p in prompt:
        if isinstance(p, str):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids as the prompt", param="prompt")
            try:
                ids = tokenizer.encode(p, add_special_tokens=add_special_tokens)
            except InvalidRequestError as e:
                raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"Token id {bad[0]} is out of vocabulary (size {vocab}).", param="prompt",
                               code="invalid_value")
        if not ids:
            raise APIError(400, "The prompt is empty; send at least one token.", param="prompt", code="invalid_value")
        out.append(ids)
    if not out:
        raise APIError(400, "The prompt is empty; send at least one token.", param="prompt", code="invalid_value")
    return out


def _choice(index: int, output, c, req: CompletionRequest, tokenizer) -> dict[str, Any]:
    text = c.text
    logprobs = None
    if req.echo:
        text = _prompt_text(output, tokenizer) + text
    if req.logprobs is not None:
        logprobs = _logprobs(_echoed(output, req, tokenizer) + _generated(c.token_ids, c.logprobs, tokenizer), 0)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def _prompt_text(output, tokenizer) -> str:
    return tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False) if tokenizer else ""


def _echoed(output, req: CompletionRequest, tokenizer) -> list[tuple[str, float | None, dict | None]]:
    """The prompt's (token text, logprob, top alternatives) entries when echo and logprobs are asked for."""
    if not req.echo or req.logprobs is None:
        return []
    return [(token_text(tokenizer, token), entry[0] if entry else None,
             {token_text(tokenizer, t): lp for t, lp in entry[1].items()} if entry else None)
            for token, entry in zip(output.prompt_token_ids, output.prompt_logprobs or [])]


def _generated(token_ids, entries, tokenizer) -> list[tuple[str, float | None, dict | None]]:
    return [(token_text(tokenizer, token), lp, {token_text(tokenizer, t): v for t, v in alternatives.items()})
            for token, (lp, alternatives) in zip(token_ids, entries or [])]


def _logprobs(entries: list[tuple[str, float | None, dict | None]], offset: int) -> dict[str, Any]:
    """The completions `logprobs` object of these entries, their text offsets counted from `offset`."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": offsets}


_TEXT_CHOICE = '{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}'  # a choice without logprobs


class _Render:
    """One streamed completion's events, output by output. The handler calls it, and so does the step's direct
    writer (server/direct.py) for the outputs that arrive while the handler waits: both the same renderer, in turn."""

    def __init__(self, events: EventWriter, params, req: CompletionRequest, tokenizer):
        self.events, self.req, self.tokenizer = events, req, tokenizer
        self.sent = [0] * params.n
        self.sent_tokens = [0] * params.n
        self.finished = [False] * params.n
        self.offsets = [0] * params.n  # where each choice's next logprobs entry starts in its (echoed) text
        self.first = True

    def __call__(self, output) -> bytes:
        req, events, chunks = self.req, self.events, []
        if self.first and req.echo:  # the prompt first, as the non-streamed text starts with it
            prompt_text, echoed = _prompt_text(output, self.tokenizer), _echoed(output, req, self.tokenizer)
            for i in range(len(self.sent)):
                logprobs = _logprobs(echoed, 0) if req.logprobs is not None else None
                self.offsets[i] = len(prompt_text)
                chunks.append(events.event({"index": i, "text": prompt_text, "logprobs": logprobs,
                                            "finish_reason": None}))
        self.first = False
        for c in output.outputs:
            i = c.index
            if self.finished[i]:  # its last chunk, with finish_reason, has been sent
                continue
            self.finished[i] = c.finish_reason is not None
            delta = c.text[self.sent[i]:]
            self.sent[i] = len(c.text)
            start, self.sent_tokens[i] = self.sent_tokens[i], len(c.token_ids)
            # One chunk per output with new tokens (one token per step; several with --stream-interval or
            # when this handler lagged), even when its text is held back (an unfinished UTF-8 character, a
            # possible stop string): serving benchmarks time tokens by chunks. None for a choice that has not
            # moved (with n > 1 and prefix caching, choices after the first can start a step later).
            if not (delta or len(c.token_ids) > start or c.finish_reason):
                continue
            if req.logprobs is not None:
                entries = _generated(c.token_ids[start:], (c.logprobs or [])[start:], self.tokenizer)
                logprobs = _logprobs(entries, self.offsets[i])
                self.offsets[i] += sum(len(e[0]) for e in entries)
                chunks.append(events.event({"index": i, "text": delta, "logprobs": logprobs,
                                            "finish_reason": c.finish_reason}))
            else:
                chunks.append(events.encoded(_TEXT_CHOICE % (i, json_string(delta), json_string(c.finish_reason)
                                                            if c.finish_reason else "null")))
        return b"".join(chunks)


async def _stream(state, http, rid, ids, params, req, include_usage, tokenizer, prompt_text):
    events = EventWriter({"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model},
                         include_usage)
    render = _Render(events, params, req, tokenizer)
    last = None
    try:
        async for output in results(state, http, rid, {"prompt_token_ids": ids}, params, render):
            last = output
            chunk = render(output)
            if chunk:
                yield chunk
        if include_usage and last is not None:
            yield events.usage_event(usage(last))
    except APIError as e:
        yield events.error_event(e.body())
    except DsserveError as e:
        yield events.error_event(stream_error(http, e).body())
    finally:
        note_output(http, state, last, prompt_text)
    yield events.done
