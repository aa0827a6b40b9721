"""POST /tokenize and /detokenize, GET /tokenizer_info (vLLM's shapes; lm-eval's remote tokenizer uses them)."""

from __future__ import annotations

from fastapi import Request

from dsserve.errors import DsserveError
from dsserve.server.agent import render_prompt
from dsserve.server.common import check_chars
from dsserve.server.protocol import APIError, DetokenizeRequest, TokenizeRequest
from dsserve.server.state import read_request


async def tokenize(http: Request):
    state = http.app.state.dsserve
    req = await read_request(http, state, TokenizeRequest)
    state.check_model(req.model)
    tokenizer = _tokenizer(state)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
    config = state.config
    if req.messages is not None and len(req.messages) > config.max_messages:
        raise APIError(400, f"Invalid 'messages': {len(req.messages)} messages; the server takes at most "
                       f"{config.max_messages} per request (--max-messages).", param="messages", code="invalid_value")
    texts = [req.prompt] if req.prompt is not None else [m.content for m in req.messages]
    check_chars(sum(len(t) for t in texts if isinstance(t, str)), config, "messages" if req.messages else "prompt")
    ids = await state.run_blocking(_encode, state, tokenizer, req)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


def _encode(state, tokenizer, req: TokenizeRequest) -> list[int]:
    try:
        if req.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            text = render_prompt(tokenizer, messages, state.config, add_generation_prompt=req.add_generation_prompt)
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    except DsserveError as e:
        raise APIError(400, str(e), param="messages") from None


async def detokenize(http: Request):
    state = http.app.state.dsserve
    req = await read_request(http, state, DetokenizeRequest)
    state.check_model(req.model)
    tokenizer = _tokenizer(state)
    vocab = state.engine.engine.model_config.vocab_size
    check_chars(len(req.tokens), state.config, "tokens")  # a token id counts as a character

    def decode() -> dict:
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of vocabulary (size {vocab}).", param="tokens",
                           code="invalid_value")
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}

    return await state.run_blocking(decode) if len(req.tokens) > _INLINE_TOKENS else decode()


_INLINE_TOKENS = 4096  # longer token lists are checked and decoded off the event loop


async def tokenizer_info(http: Request):
    """What a client needs to tokenize and template as the server does: special tokens and the chat template."""
    state = http.app.state.dsserve
    tokenizer = _tokenizer(state)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": state.config.chat_template or tokenizer.chat_template,
        "model_max_length": state.max_model_len, "vocab_size": state.engine.engine.model_config.vocab_size,
    }


def _tokenizer(state):
    if state.engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer.json", param=None)
    return state.engine.tokenizer
