"""The only code that knows the device: builds the model, sizes and owns the KV cache, runs one step."""

from __future__ import annotations

from concurrent.futures import Future

import gc
import itertools
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsserve.config import CacheConfig, EngineConfig, ParallelConfig
from dsserve.errors import ConfigError, DistributedError, EngineDeadError
from dsserve.backends import select as select_backend
from dsserve.layers.parallel import SINGLE
from dsserve.models.loader import iter_checkpoint
from dsserve.models.registry import model_class
from dsserve.profiling import PROFILER
from dsserve.runner.batch import StepInputs, build_forward_batch
from dsserve.runner.parallel import STEP, STOP, Distributed, Heartbeat, release
from dsserve.runner.sampler import SamplingMetadata, SamplingRow, sample

logger = logging.getLogger(__name__)

TokenLogprobs = tuple[float, dict[int, float]]  # (logprob of the token, {alternative: logprob})


@dataclass
class StepResult:
    sampled: list[int]  # one per scheduled sequence; -1 where no token was due (a prompt chunk)
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # row -> entries for this chunk
    failed: dict[int, BaseException] = field(default_factory=dict)  # row -> why its sampling failed (that row only)


class ModelRunner:
    """Rank 0's runner executes the scheduler's plan (and, with several ranks, first sends it to the others);
    the other ranks' runners wait in `serve_steps` for rank 0's plans and compute their share."""

    def __init__(self, config: EngineConfig):
        model_config, cache_config = config.model, config.cache
        self.config = model_config
        self.parallel = config.parallel
        self.device = _device_of_rank(config.device, config.parallel)
        self.dtype = getattr(torch, config.dtype)
        self.kv_dtype = getattr(torch, config.kv_cache_dtype)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.block_size = cache_config.block_size
        self.failure: BaseException | None = None
        self.heartbeat: Heartbeat | None = None
        self._lock = threading.Lock()  # one collective sequence at a time: steps vs the heartbeat
        self._closed = False
        self.group: Distributed | None = Distributed(config, self.device) if config.parallel.enabled else None
        try:
            if self.group is not None:
                with self.group.loading():  # the other ranks see this rank alive while it loads
                    self._load(config)
            else:
                self._load(config)
        except BaseException as e:
            if self.group is not None:
                self.group.report_failure(e)
                self.group.shutdown(graceful=False)
            raise

    def _load(self, config: EngineConfig) -> None:
        model_config, cache_config = config.model, config.cache
        tp = self.group.tp if self.group else SINGLE
        started = time.perf_counter()
        with torch.device(self.device):
            self.model = model_class(model_config)(model_config, config.scheduler.max_model_len, self.dtype, tp)
        self.backend = select_backend(config.backend, self.device, getattr(torch, config.weight_dtype),
                                      config.quantization)
        self.backend.prepare(self.model)
        # Tensors come as stored and are converted into each parameter; FP8 weights go to the backend's packer where
        # it keeps them (the CPU backend with linear_fp8.c) and are dequantized into their parameters elsewhere
        self.model.load_weights(iter_checkpoint(model_config, None, self.model.checkpoint_slices(),
                                                keep_quantized=True),
                                on_loaded=self.backend.module_loaded)
        self.backend.weights_loaded(self.model)
        self.model.eval()
        logger.info("loaded %s (%s%s%s) in %.1fs", model_config.path, config.dtype,
                    f", {model_config.quantization_config['quant_method']} checkpoint as {config.checkpoint_quantization}"
                    if config.checkpoint_quantization else "",
                    f", rank {tp.rank} of {tp.size}" if self.group else "", time.perf_counter() - started)
        self.num_blocks = self._num_blocks(cache_config, config.scheduler.max_model_len, config.scheduler.max_num_seqs)
        if self.group:
            self.num_blocks = self.group.agree_min("num_blocks", self.num_blocks)
        shape = (self.num_blocks, self.block_size, *self.model.kv_cache_entry_shape)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(model_config.num_hidden_layers)]
        self.backend.set_kv_caches(self.model, self.kv_caches)
        logger.info("backend: %s", self.backend.describe())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.heartbeat = (
            Heartbeat(self.group, self._lock, config.parallel.step_timeout_s / 4)
            if self.group and self.group.rank == 0 else None
        )
        # An offline LLM nobody shut down still stops its ranks when it is collected or at exit; the finalizer holds
        # the group, never this runner, so dropping the LLM frees the weights and the cache.
        self._release = weakref.finalize(self, release, self.group, self.heartbeat, self._lock) if self.group else None

    @property
    def bytes_per_block(self) -> int:
        entry = math.prod(self.model.kv_cache_entry_shape)
        return self.block_size * entry * self.config.num_hidden_layers * self.kv_dtype.itemsize

    @torch.inference_mode()
    def execute(self, rows: list[SamplingRow], num_new_tokens: list[int], block_tables: list[list[int]],
                num_computed: list[int], grammar_masks: Future | None = None) -> StepResult:
        """Compute `num_new_tokens[i]` tokens of each row after its `num_computed[i]`; sample rows that reach the end.
        `grammar_masks`: a Future of (rows, bitmask (len(rows), ceil(V/32)) int32), computed during the forward pass:
        those rows may only sample the tokens whose bit is set."""
        with PROFILER.section("prepare"):
            inputs = self._inputs(rows, num_new_tokens, block_tables, num_computed)
        prompt_spans = inputs.prompt_spans
        due = inputs.due
        logits = self._run(inputs)
        masks = None
        if grammar_masks is not None:
            with PROFILER.section("grammar"):
                mask_rows, bitmask = grammar_masks.result()
                masks = {row: bitmask[j] for j, row in enumerate(mask_rows)}

        with PROFILER.section("sample"):
            return self._sample(rows, due, prompt_spans, logits, masks)

    def _inputs(self, rows, num_new_tokens, block_tables, num_computed) -> StepInputs:
        chunks = [row.all_token_ids[start : start + n] for row, start, n in zip(rows, num_computed, num_new_tokens)]
        inputs = StepInputs.build(chunks, num_computed, block_tables)
        # Every logit this step needs comes from one LM-head call: the sampled rows' last tokens, then the
        # positions of prompt tokens whose logprobs were asked for.
        due = [i for i, (row, start, n) in enumerate(zip(rows, num_computed, num_new_tokens))
               if start + n == len(row.all_token_ids)]
        query_start = [0, *itertools.accumulate(num_new_tokens)]
        logit_rows = [query_start[i + 1] - 1 for i in due]
        prompt_spans = []  # (row, offset into the logits, number of positions, target token ids)
        for i, row in enumerate(rows):
            k = row.params.prompt_logprobs
            num_prompt = len(row.all_token_ids) - row.num_output_tokens
            start, n = num_computed[i], num_new_tokens[i]
            if k is None or start >= num_prompt - 1:
                continue
            end = min(start + n, num_prompt - 1)  # position p predicts prompt token p + 1
            prompt_spans.append((i, len(logit_rows), end - start, row.all_token_ids[start + 1 : end + 1]))
            logit_rows.extend(range(query_start[i], query_start[i] + end - start))
        inputs.logit_rows = torch.tensor(logit_rows, dtype=torch.long)
        inputs.due, inputs.prompt_spans = due, prompt_spans
        return inputs

    def _sample(self, rows, due, prompt_spans, logits, masks=None) -> StepResult:
        result = StepResult([-1] * len(rows), [None] * len(rows))
        if due:
            try:
                self._sample_rows(rows, due, logits[: len(due)], result, masks)
            except Exception as batch_error:  # noqa: BLE001 - narrowed to the rows that fail on their own below
                # A value of one request that slipped past validation must fail that request, not the step: sample
                # row by row to find which. If every row samples alone, the fault is the batch's: the step fails.
                for j, i in enumerate(due):
                    try:
                        self._sample_rows(rows, [i], logits[j : j + 1], result, masks)
                    except Exception as e:  # noqa: BLE001
                        result.failed[i] = e
                if not result.failed:
                    raise batch_error
        for i, offset, count, targets in prompt_spans:
            try:
                result.prompt_logprobs[i] = _prompt_logprobs(logits[offset : offset + count], targets,
                                                             rows[i].params.prompt_logprobs)
            except Exception as e:  # noqa: BLE001 - this row's own failure
                result.failed[i] = e
        return result

    def _sample_rows(self, rows, due: list[int], logits: torch.Tensor, result: StepResult, masks=None) -> None:
        """Sample the `due` rows (logits (len(due), V)) into `result`; `masks`: row -> its grammar bitmask."""
        meta = SamplingMetadata.from_requests([rows[i] for i in due], logits.shape[1], self.device)
        if masks:
            masked = [j for j, i in enumerate(due) if i in masks]
            if masked:
                meta.grammar = (torch.tensor(masked, dtype=torch.long, device=logits.device),
                                torch.stack([masks[due[j]] for j in masked]))
        out = sample(logits, meta, self.generator)
        tokens = out.token_ids.tolist()
        for j, i in enumerate(due):
            result.sampled[i] = tokens[j]
        if out.logprobs is None:
            return
        chosen = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for j, i in enumerate(due):
            k = rows[i].params.logprobs
            if k is None:
                continue
            alternatives = dict(zip(top_ids[j][:k], top_lps[j][:k])) if k and top_ids else {}
            alternatives.setdefault(tokens[j], chosen[j])
            result.logprobs[i] = (chosen[j], alternatives)

    def _run(self, inputs: StepInputs) -> torch.Tensor | None:
        """Forward the step and compute the requested logits; rank 0 first sends the step to the other ranks."""
        if self.group is None:
            if self._closed:
                raise EngineDeadError("the engine was shut down; create a new one")
            return self._forward(inputs)
        with self._lock:
            earlier = self.failure or (self.heartbeat and self.heartbeat.error)
            if earlier:
                raise DistributedError(f"the deployment lost a rank earlier: {earlier}")
            try:
                dead = self.group.dead_children()
                if dead:
                    raise DistributedError(f"rank 0: {'; '.join(dead)}")
                self.group.send(STEP, inputs.pack())
                logits = self._forward(inputs)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # NCCL is asynchronous: surface its errors in this step
                return logits
            except BaseException as e:
                # Whatever failed, the ranks' collective sequences no longer match: nothing more can run.
                self.failure = self._step_failure(e)
                raise self.failure from e
            finally:
                if self.heartbeat:
                    self.heartbeat.touch()

    def _step_failure(self, error: BaseException) -> DistributedError:
        if isinstance(error, DistributedError):
            return error
        if _is_communication_error(error):
            return self.group.lost(error)
        failure = DistributedError(f"rank {self.group.rank} failed during a step ({error!r}); the other ranks are "
                                   "left mid-step, so the deployment stops")
        self.group.report_failure(failure)
        return failure

    def _forward(self, inputs: StepInputs) -> torch.Tensor | None:
        with PROFILER.section("prepare"):
            batch = build_forward_batch(inputs, self.block_size, self.device, self.backend)
        with PROFILER.section("model"):
            hidden = self.backend.forward(self.model, batch.input_ids, batch.positions, batch.attn, self.kv_caches)
        if inputs.logit_rows.numel() == 0:
            return None
        with PROFILER.section("logits"):
            return self.model.compute_logits(hidden[inputs.logit_rows.to(self.device)])  # (N, V) on rank 0

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """Ranks other than 0: run rank 0's steps until it says stop; raise DistributedError when it is lost."""
        assert self.group is not None and self.group.rank != 0
        logger.info("rank %d ready: waiting for rank 0's steps", self.group.rank)
        while True:
            command, payload = self.group.receive()
            if command == STOP:
                logger.info("rank %d: stop received", self.group.rank)
                return
            if command == STEP:
                try:
                    self._forward(StepInputs.unpack(payload))
                except BaseException as e:
                    raise self._step_failure(e) from e

    def shutdown(self) -> None:
        """Stop the other ranks (rank 0) and the processes this one started, leave the process group, drop the model
        and the KV cache; later steps raise EngineDeadError. Safe to call twice."""
        self._closed = True
        if self.group is not None and self.failure is not None:
            self.group.failed = True  # the ranks' collective sequences no longer match: no STOP
        if self._release is not None:
            self._release()  # runs once, here or when collected
        self.group = self.heartbeat = None
        self.model = self.kv_caches = self.backend = None

    def _num_blocks(self, cache: CacheConfig, max_model_len: int, max_num_seqs: int) -> int:
        if cache.num_blocks is not None:
            if cache.num_blocks < 1:
                raise ConfigError(f"num_kv_blocks={cache.num_blocks} must be >= 1")
            return cache.num_blocks
        if cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
            num = budget // self.bytes_per_block
        else:
            # A share of free memory, but never more than every sequence at full length could use.
            budget = int(_free_memory(self.device) * cache.kv_cache_fraction)
            if self.device.type == "cpu":
                budget //= len(self.parallel.node_ranks)  # the ranks of a node share its memory
            useful = max_num_seqs * -(-max_model_len // self.block_size)
            num = min(budget // self.bytes_per_block, useful)
        if num < 1:
            raise ConfigError(
                f"the KV cache budget of {budget / 2**20:.1f} MiB holds no block of {self.bytes_per_block / 2**20:.2f} MiB; "
                "raise --kv-cache-memory or lower --block-size"
            )
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB)", num, self.block_size, num * self.bytes_per_block / 2**20)
        return int(num)


def freeze_startup_heap() -> None:
    """For a process that serves one engine until it exits (`dsserve serve`, a worker rank): collect once, then move
    every object alive now (torch and the other modules, the model's Python objects, the tokenizer) out of the
    garbage collector's reach, so that its full passes walk only what serving creates. Left in, the startup heap made
    the first full pass after start-up take 74 ms on the HTTP thread, holding the GIL and stalling the engine step
    under way (docs/benchmarks.md); vLLM's engine core freezes its startup heap the same way."""
    gc.collect()
    gc.freeze()


def _is_communication_error(error: BaseException) -> bool:
    """A failed collective (peer gone, timeout) rather than this rank's own bug or resource error."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "Gloo", "NCCL", "HCCL", "Connection"))


def _prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Logprob of each prompt token given the ones before it, and its top-k alternatives."""
    lps = logits.log_softmax(dim=-1)  # (P, V)
    target = torch.tensor(targets, device=lps.device)
    chosen = lps.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
    top = lps.topk(k, dim=-1) if k else None
    entries = []
    for j, token in enumerate(targets):
        alternatives = dict(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else {}
        alternatives.setdefault(token, chosen[j])
        entries.append((chosen[j], alternatives))
    return entries


def _device_of_rank(device: str, parallel: ParallelConfig) -> torch.device:
    """One device per rank: cuda -> cuda:LOCAL_RANK when there are several ranks on the node."""
    dev = torch.device(device)
    if dev.type != "cpu" and dev.index is None and parallel.enabled:
        return torch.device(dev.type, parallel.local_rank)
    return dev


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 4 * 2**30


def default_num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)

