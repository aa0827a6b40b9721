"""Where evaluation requests go: the in-process engine, or any OpenAI-compatible server over HTTP.

Both answer the same two questions, in the caller's order:
- `loglikelihood([(context, continuation), ...])`: the summed log-probability of each continuation;
- `generate(prompts, ...)`: each answer's `content` (and, for reasoning models, its `reasoning_content`,
  which the scorer never reads).
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from dsserve.errors import DsserveError
from dsserve.reasoning import r1

Progress = Callable[[int], None]  # called with the number of requests just finished


@dataclass
class Generation:
    content: str | None
    reasoning: str | None = None
    finish_reason: str | None = None


class InProcessBackend:
    """The dsserve engine in this process; requests go in batches so the progress bar moves."""

    def __init__(self, llm, batch_size: int = 256):
        self.llm = llm
        self.batch_size = batch_size
        tokenizer = llm.tokenizer
        if tokenizer is None:
            raise DsserveError("evaluation needs the model's tokenizer (tokenizer.json) in the model folder")
        self.tokenizer = tokenizer
        self.reasoning = r1.uses_think(tokenizer)
        self.max_model_len = llm.engine.config.scheduler.max_model_len
        self.description = f"in-process engine ({llm.engine.config.model.path})"

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress) -> list[float]:
        from dsserve.engine.request import SamplingParams

        encoded = [_split_tokens(self.tokenizer.encode, context, continuation) for context, continuation in requests]
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        results: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            outputs = self.llm.generate([{"prompt_token_ids": ctx + cont} for ctx, cont in chunk], params)
            for (ctx, cont), out in zip(chunk, outputs):
                entries = out.prompt_logprobs[len(ctx) :]
                results.append(sum(entry[0] for entry in entries))
            progress(len(chunk))
        return results

    def generate(self, prompts: list[str], max_tokens: int, chat: bool, stop: list[str] | None,
                 progress: Progress) -> list[Generation]:
        from dsserve.engine.request import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=None if chat else stop)
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            if chat:
                outputs = self.llm.chat([[{"role": "user", "content": p}] for p in chunk], params)
            else:
                outputs = self.llm.generate(chunk, params)
            for out in outputs:
                c = out.outputs[0]
                if chat and self.reasoning:
                    reasoning, content = r1.split(c.text)
                    results.append(Generation(content, reasoning, c.finish_reason))
                else:
                    results.append(Generation(c.text, None, c.finish_reason))
            progress(len(chunk))
        return results


class HTTPBackend:
    """Any OpenAI-compatible server: /v1/completions (echo + logprobs) for log-likelihood, /v1/chat/completions
    (or /v1/completions without `chat`) for generation. `concurrency` requests in flight; transient failures
    (connection errors, timeouts, 429, 5xx) are retried with back-off, up to `max_retries` times."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 3, timeout: float = 600.0):
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=self.concurrency))
        self.description = f"{self.base_url} (model {model})"
        self._tokenize_available: bool | None = None

    def close(self) -> None:
        self.client.close()

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress) -> list[float]:
        return self._map(lambda r: self._loglikelihood(*r), requests, progress)

    def generate(self, prompts: list[str], max_tokens: int, chat: bool, stop: list[str] | None,
                 progress: Progress) -> list[Generation]:
        return self._map(lambda p: self._generate(p, max_tokens, chat, stop), prompts, progress)

    # --- one request each ---

    def _loglikelihood(self, context: str, continuation: str) -> float:
        ids = self._tokenize_pair(context, continuation)
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
        if ids is not None:
            ctx, cont = ids
            body["prompt"] = ctx + cont
            data = self._post("/v1/completions", body)
            token_logprobs = data["choices"][0]["logprobs"]["token_logprobs"]
            return float(sum(token_logprobs[len(ctx) : len(ctx) + len(cont)]))
        body["prompt"] = context + continuation
        data = self._post("/v1/completions", body)
        logprobs = data["choices"][0]["logprobs"]
        offsets, values = logprobs["text_offset"][:-1], logprobs["token_logprobs"][:-1]  # the last one was generated
        picked = [lp for offset, lp in zip(offsets, values) if offset >= len(context)]
        if not picked:
            raise DsserveError("the server's echoed logprobs do not cover the continuation; it needs /tokenize "
                               "or correct text_offset values")
        return float(sum(picked))

    def _generate(self, prompt: str, max_tokens: int, chat: bool, stop: list[str] | None) -> Generation:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "seed": 1234}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            choice = self._post("/v1/chat/completions", body)["choices"][0]
            message = choice.get("message") or {}
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            return Generation(message.get("content"), reasoning, choice.get("finish_reason"))
        body["prompt"] = prompt
        if stop:
            body["stop"] = stop
        choice = self._post("/v1/completions", body)["choices"][0]
        return Generation(choice.get("text"), None, choice.get("finish_reason"))

    def _tokenize_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]] | None:
        """Token ids of the context and of the continuation as they fall in the whole text, through the server's
        /tokenize (vLLM's and dsserve's); None when the server has none (then text offsets are used)."""
        if self._tokenize_available is False:
            return None
        try:
            whole = self._post("/tokenize", {"model": self.model, "prompt": context + continuation})["tokens"]
            ctx = self._post("/tokenize", {"model": self.model, "prompt": context})["tokens"]
        except _NotFound:
            self._tokenize_available = False
            return None
        self._tokenize_available = True
        return _at_boundary(whole, ctx)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        delay = 0.5
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.post(self.base_url + path, json=body)
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 404 and path == "/tokenize":
                    raise _NotFound()
                if response.status_code < 400:
                    return response.json()
                error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise DsserveError(f"{path} rejected the request ({error}); fix the options and run again")
            if attempt == self.max_retries:
                raise DsserveError(f"{path} failed {self.max_retries + 1} times; last error: {error}")
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _map(self, fn, items: list, progress: Progress) -> list:
        results: list = [None] * len(items)
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    progress(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results


class _NotFound(Exception):
    pass


def _split_tokens(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's rule: encode the whole text, and the context alone; the continuation is what follows."""
    return _at_boundary(encode(context + continuation), encode(context))


def _at_boundary(whole: list[int], ctx: list[int]) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `whole`; where the boundary merged into one token, the continuation
    starts at the first token that differs from the context's own encoding."""
    if whole[: len(ctx)] != ctx:
        common = 0
        while common < min(len(whole), len(ctx)) and whole[common] == ctx[common]:
            common += 1
        ctx = whole[:common]
    return ctx, whole[len(ctx) :]
