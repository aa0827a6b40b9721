"""Which requests run this step and how many tokens each computes: counts, not phases.

A request is `num_tokens` long and has `num_computed_tokens` in the cache; a step gives it
`num_tokens - num_computed_tokens` more (capped by the token budget). A fresh prompt, a chunk of a
long prompt, a prefix-cache hit, a decode step and a recompute after preemption are all that one rule.
Running requests go first (oldest first); when blocks run out, the newest running request is
preempted (its blocks freed, recomputed later). Then waiting requests are admitted in arrival order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsserve.config import SchedulerConfig
from dsserve.engine.kv_cache import KVCacheManager
from dsserve.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's plan: the requests in batch order and how many new tokens each computes."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start; exported as a metric

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()  # the newest: FCFS keeps the oldest running
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.requests.append(request)
                out.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: nothing behind it is left
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.wait_for is not None and not _prompt_is_cached(request.wait_for):
                # n > 1: let the first sample fill the prompt's blocks, then share them as prefix hits.
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = ([], 0)
            if request.num_computed_tokens == 0:
                hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            num_new = request.num_tokens - request.num_computed_tokens - num_hit_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv_cache.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_prompt_tokens = num_hit_tokens
            request.wait_for = None
            request.num_computed_tokens += num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(request)
            out.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """Advance counts; append the sampled token of each request whose last token was computed.

        Returns the requests that gained a token (some may have finished: EOS, stop token, length).
        """
        advanced = []
        for request, num_new, token in zip(out.requests, out.num_new_tokens, sampled):
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += num_new
            if request.num_computed_tokens < request.num_tokens:
                continue  # a chunk of the prompt: its sampled token is meaningless
            request.output_token_ids.append(token)
            advanced.append(request)
            status = _check_stop(request, token)
            if status is not None:
                self.finish(request, status)
        return advanced

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish (or abort) a request wherever it is and free its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)
        self.kv_cache.forget(request)


def _prompt_is_cached(request: Request) -> bool:
    return request.is_finished or request.num_computed_tokens >= request.num_prompt_tokens


def _check_stop(request: Request, token: int) -> RequestStatus | None:
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        if token in request.eos_token_ids and not params.ignore_eos:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if request.num_tokens >= request.max_total_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None
