"""The only code that knows the device: builds the model, sizes and owns the KV cache, runs one step."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from dsserve.config import CacheConfig, ModelConfig
from dsserve.errors import ConfigError
from dsserve.models.loader import iter_checkpoint
from dsserve.models.registry import model_class
from dsserve.runner.batch import build_forward_batch
from dsserve.runner.sampler import SamplingMetadata, SamplingRow, sample

logger = logging.getLogger(__name__)

TokenLogprobs = tuple[float, dict[int, float]]  # (logprob of the token, {alternative: logprob})


@dataclass
class StepResult:
    sampled: list[int]  # one per scheduled sequence; -1 where no token was due (a prompt chunk)
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # row -> entries for this chunk


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dtype: str, device: str, max_model_len: int,
                 max_num_seqs: int = 256, num_threads: int | None = None, seed: int = 0):
        self.config = model_config
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.block_size = cache_config.block_size
        started = time.perf_counter()
        with torch.device(self.device):
            self.model = model_class(model_config)(model_config, max_model_len, self.dtype)
        self.model.load_weights(iter_checkpoint(model_config, self.dtype))
        self.model.eval()
        logger.info("loaded %s (%s) in %.1fs", model_config.path, dtype, time.perf_counter() - started)
        self.num_blocks = self._num_blocks(cache_config, max_model_len, max_num_seqs)
        shape = (self.num_blocks, self.block_size, *model_config.kv_cache_entry_shape)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(model_config.num_hidden_layers)]
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.config.kv_cache_elements_per_token * self.dtype.itemsize

    @torch.inference_mode()
    def execute(self, rows: list[SamplingRow], num_new_tokens: list[int], block_tables: list[list[int]],
                num_computed: list[int]) -> StepResult:
        """Compute `num_new_tokens[i]` tokens of each row after its `num_computed[i]`; sample rows that reach the end."""
        chunks = [row.all_token_ids[start : start + n] for row, start, n in zip(rows, num_computed, num_new_tokens)]
        batch = build_forward_batch(chunks, num_computed, block_tables, self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_caches)  # (T, D)

        due = [i for i, (row, start, n) in enumerate(zip(rows, num_computed, num_new_tokens))
               if start + n == len(row.all_token_ids)]
        sampled: list[int] = [-1] * len(rows)
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if due:
            logits = self.model.compute_logits(hidden[batch.last_token_index[due]])  # (B_due, V)
            meta = SamplingMetadata.from_requests([rows[i] for i in due], logits.shape[1], self.device)
            out = sample(logits, meta, self.generator)
            tokens = out.token_ids.tolist()
            for j, i in enumerate(due):
                sampled[i] = tokens[j]
            if out.logprobs is not None:
                chosen = out.logprobs.tolist()
                top_ids = out.top_ids.tolist() if out.top_ids is not None else None
                top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
                for j, i in enumerate(due):
                    k = rows[i].params.logprobs
                    if k is None:
                        continue
                    alternatives = dict(zip(top_ids[j][:k], top_lps[j][:k])) if k and top_ids else {}
                    alternatives.setdefault(tokens[j], chosen[j])
                    logprobs[i] = (chosen[j], alternatives)
        result = StepResult(sampled, logprobs)
        self._prompt_logprobs(rows, num_new_tokens, num_computed, batch.query_start, hidden, result)
        return result

    def _prompt_logprobs(self, rows, num_new_tokens, num_computed, query_start, hidden, result: StepResult) -> None:
        """Logprob of each prompt token (from position 1) given the ones before it, for rows that ask."""
        for i, row in enumerate(rows):
            k = row.params.prompt_logprobs
            num_prompt = len(row.all_token_ids) - row.num_output_tokens
            start, n = num_computed[i], num_new_tokens[i]
            if k is None or start >= num_prompt - 1:
                continue
            end = min(start + n, num_prompt - 1)  # position p predicts prompt token p + 1
            flat = torch.arange(query_start[i], query_start[i] + end - start, device=self.device)
            targets = torch.tensor(row.all_token_ids[start + 1 : end + 1], device=self.device)
            lps = self.model.compute_logits(hidden[flat]).log_softmax(dim=-1)  # (P, V)
            chosen = lps.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            top = lps.topk(k, dim=-1) if k else None
            entries = []
            for j, token in enumerate(targets.tolist()):
                alternatives = dict(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else {}
                alternatives.setdefault(token, chosen[j])
                entries.append((chosen[j], alternatives))
            result.prompt_logprobs[i] = entries

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
            useful = max_num_seqs * -(-max_model_len // self.block_size)
            num = min(budget // self.bytes_per_block, useful)
        if num < 1:
            raise ConfigError(
                f"the KV cache budget of {budget / 2**20:.1f} MiB holds no block of {self.bytes_per_block / 2**20:.2f} MiB; "
                "raise --kv-cache-memory or lower --block-size"
            )
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB)", num, self.block_size, num * self.bytes_per_block / 2**20)
        return int(num)


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

