"""A request as the engine sees it: SamplingParams, status, and its token counts (num_computed_tokens / num_tokens)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsserve.errors import InvalidRequestError

if TYPE_CHECKING:  # `import dsserve` (every CLI command) stays free of torch's ~2 s import
    import torch

    from dsserve.engine.structured import Constraint, StructuredOutput


@dataclass
class SamplingParams:
    """Per-request sampling, shaped like vLLM's. `None` temperature/top_p/top_k take generation_config.json's values."""

    n: int = 1  # independent samples of the same prompt
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None  # nucleus mass in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens; 0 or -1: all
    min_p: float = 0.0  # drop tokens below min_p * p(best)
    presence_penalty: float = 0.0  # subtract once for every token already generated
    frequency_penalty: float = 0.0  # subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (divide positive logits)
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    stop: list[str] | str | None = None  # stop strings, cut from the output
    stop_token_ids: list[int] | None = None  # extra end tokens (kept in token_ids, not in text)
    ignore_eos: bool = False  # keep generating past EOS
    max_tokens: int | None = 16  # generated tokens at most; None: up to max_model_len
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens exist
    logprobs: int | None = None  # return the sampled token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit before sampling, in [-100, 100]
    structured: "StructuredOutput | None" = None  # a grammar the output must match (engine/structured.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self.validate()

    def validate(self) -> None:
        def bad(field_name: str, value, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{field_name}={value!r} is invalid: {rule}", param=field_name)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", self.n, "must be an integer >= 1")
        if self.temperature is not None and (not _finite(self.temperature) or self.temperature < 0):
            raise bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if self.top_p is not None and (not _finite(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < -1):
            raise bad("top_k", self.top_k, "must be -1, 0 (both: no limit) or a positive integer")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise bad(name, value, "must be in [-2, 2]")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 means no penalty)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                raise bad(name, value, "must be an integer in [0, 20]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED):
            raise bad("seed", self.seed, "must be an integer in [0, 2^63)")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise bad("logit_bias", token, "keys must be token ids (non-negative integers)")
            if not _finite(bias) or not -100 <= bias <= 100:
                raise bad("logit_bias", bias, f"the bias of token {token} must be a number in [-100, 100]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be non-negative integers")

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: token ids in the vocabulary. (top_k above the vocabulary means all of it.)"""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias or ()))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(f"{name} contains token id {bad[0]}, which is out of vocabulary (size "
                                          f"{vocab_size})", param=name)

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """Fill unset temperature/top_p/top_k from generation_config.json (or greedy-free vLLM defaults)."""
        temperature = self.temperature if self.temperature is not None else defaults.get("temperature", 1.0)
        if self.temperature is None and defaults.get("do_sample") is False:
            temperature = 0.0
        top_p = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
        top_k = self.top_k if self.top_k is not None else defaults.get("top_k", 0)
        clone = SamplingParams(**{**self.__dict__, "temperature": temperature, "top_p": top_p, "top_k": top_k})
        return clone

    @property
    def is_greedy(self) -> bool:
        return (self.temperature or 0.0) < 1e-5


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; recomputes its tokens when rescheduled
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # this request's own computation failed (its sampling, its detokenization); others go on

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                        RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)  # identity: a request equals only itself
class Request:
    """One sequence. `num_computed_tokens` of `all_token_ids` have KV in the cache; the rest is work to do."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved (defaults filled)
    eos_token_ids: tuple[int, ...]
    arrival_index: int  # FCFS order
    max_total_tokens: int  # min(prompt + max_tokens, max_model_len)
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prefix-cache hits at first schedule (reported in usage)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    parent_id: str | None = None  # n > 1: the user-visible request this sample belongs to
    sample_index: int = 0
    wait_for: "Request | None" = None  # n > 1: a sibling whose prompt blocks this one will reuse
    logprobs: list = field(default_factory=list)  # per output token: (logprob, {token: logprob})
    prompt_logprobs: list = field(default_factory=list)  # per prompt token after the first
    num_preemptions: int = 0
    constraint: "Constraint | None" = None  # this sequence's grammar state, when its request has one

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished


MAX_SEED = 2**63  # torch.Generator.manual_seed takes a signed 64-bit value


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
