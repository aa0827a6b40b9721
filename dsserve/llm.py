"""Offline API shaped like vLLM's: LLM(model).generate(prompts, SamplingParams) and .chat(messages, SamplingParams)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from dsserve.engine.engine import LLMEngine, Prompt, RequestOutput
from dsserve.engine.request import SamplingParams
from dsserve.errors import EngineDeadError, InvalidRequestError


class LLM:
    """`LLM(path, dtype=..., block_size=..., max_model_len=..., ...)`; options are those of `build_engine_config`.

    `shutdown()` (or leaving `with LLM(...) as llm:`) stops a tensor-parallel deployment's other ranks and frees the
    model and the KV cache at once; an LLM nobody holds any more does the same when it is garbage collected."""

    def __init__(self, model: str | Path, **engine_options: Any):
        self._engine: LLMEngine | None = LLMEngine.from_options(model, **engine_options)
        self._ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError("this LLM was shut down; create a new one")
        return self._engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the other ranks, leave the process group, free the model and the KV cache; safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string, token ids, or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (or `chat_template`) and generate; one output per conversation."""
        if self.tokenizer is None:
            raise InvalidRequestError("chat needs a tokenizer; the model folder has no tokenizer.json")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.tokenizer.encode(
                self.tokenizer.apply_chat_template(conv, add_generation_prompt, chat_template), add_special_tokens=False)}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        engine = self.engine
        final: dict[str, RequestOutput] = {}
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        final[output.request_id] = output
        except BaseException:
            for request_id in request_ids:  # a failed (or interrupted) call leaves nothing queued for the next one
                engine.abort_request(request_id)
            raise
        return [final[i] for i in request_ids]
