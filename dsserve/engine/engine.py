"""LLMEngine: add_request / step / abort. One step is schedule -> run -> update."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parallel_from_env,
    parse_memory,
    resolve_backend,
    resolve_dtype,
    resolve_kv_cache_dtype,
    resolve_weight_dtype,
)
from dsserve.engine.detokenizer import IncrementalDetokenizer
from dsserve.engine.kv_cache import KVCacheManager
from dsserve.engine.request import Request, RequestStatus, SamplingParams
from dsserve.engine.scheduler import Scheduler, SchedulerOutput
from dsserve.engine.tokenizer import Tokenizer
from dsserve.errors import ConfigError, EngineDeadError, InvalidRequestError
from dsserve.formats.quantization import QuantScheme
from dsserve.formats.quantized import checkpoint_reader
from dsserve.options import EngineArgs
from dsserve.profiling import PROFILER
from dsserve.runner.model_runner import ModelRunner, StepResult, default_num_threads

if TYPE_CHECKING:
    from dsserve.engine.structured import GrammarCompiler

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # set when this request failed inside the engine (finished; the others went on)


@dataclass
class _Group:
    """A user request: its n samples and their detokenizers."""

    request_id: str
    prompt: str | None
    params: SamplingParams
    samples: list[Request] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer | None] = field(default_factory=list)
    error: str | None = None  # what failed, for the client (the cause is logged with the request id)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_config = config.model
        if config.parallel.rank != 0:
            raise ConfigError(
                f"this process is rank {config.parallel.rank}; only rank 0 runs the engine. Start every rank with "
                "`dsserve serve` (it runs the other ranks' compute loop) or let rank 0 start them (-tp N)"
            )
        self.tokenizer = _load_tokenizer(config)
        self.runner = ModelRunner(config)
        # The runner reads max_model_len only while it builds (rotary table, cache budget) and keeps none; the KV
        # cache it sized may lower a defaulted max_model_len, and from here on that fitted config is the only one.
        try:
            config = self.config = _fit_max_model_len(config, self.runner.num_blocks)
        except BaseException:
            self.runner.shutdown()
            raise
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.eos_token_ids = (
            self.tokenizer.eos_token_ids(config.model.eos_token_ids) if self.tokenizer else config.model.eos_token_ids
        )
        self.sampling_defaults = self.tokenizer.sampling_defaults() if self.tokenizer else {}
        self.groups: dict[str, _Group] = {}
        self._arrivals = itertools.count()
        self._grammar_compiler: GrammarCompiler | None = None  # built by the first request with a grammar
        self._mask_thread: ThreadPoolExecutor | None = None  # grammar masks, computed beside the forward pass

    @classmethod
    def from_options(cls, model: str | Path, **options: Any) -> "LLMEngine":
        return cls(build_engine_config(model, **options))

    # ---- the loop -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        with PROFILER.section("step"):
            outputs = self._step()
        PROFILER.step_done()
        return outputs

    def _step(self) -> list[RequestOutput]:
        with PROFILER.section("schedule"):
            plan = self.scheduler.schedule()
        if not plan:
            if self.scheduler.num_unfinished:
                raise EngineDeadError(
                    f"no request could be scheduled although {self.scheduler.num_unfinished} are queued "
                    f"({self.kv_cache.pool.num_free} of {self.kv_cache.num_blocks} KV blocks free); this is a bug"
                )
            return []
        result = self._run(plan)
        with PROFILER.section("update"):
            return self._update(plan, result)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def check_health(self) -> None:
        """Raise the failure of a lost rank noticed while idle (the heartbeat), so the owner can stop."""
        heartbeat = self.runner.heartbeat
        if heartbeat is not None and heartbeat.error is not None:
            raise heartbeat.error

    def shutdown(self) -> None:
        """Stop the other ranks of a tensor-parallel deployment and free the model and the KV cache; later steps
        raise EngineDeadError. Safe to call twice."""
        self.runner.shutdown()
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=False)

    # ---- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Validate and queue a request; raises InvalidRequestError (nothing queued) when it cannot run."""
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params = (params or SamplingParams()).with_defaults(self.sampling_defaults)
        params.check_vocab(self.model_config.vocab_size)
        prompt_text, token_ids = self._tokenize(prompt)
        max_len = self.config.scheduler.max_model_len
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        if len(token_ids) >= max_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {max_len}, which must leave room for "
                "at least one generated token; shorten the prompt or raise --max-model-len"
            )
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}); got {min(token_ids)}..{max(token_ids)}")
        max_total = min(len(token_ids) + (params.max_tokens or max_len), max_len)
        if -(-max_total // self.kv_cache.block_size) > self.kv_cache.num_blocks:
            raise InvalidRequestError(
                f"the request may grow to {max_total} tokens but the KV cache holds only "
                f"{self.kv_cache.num_blocks * self.kv_cache.block_size}; lower max_tokens or raise --kv-cache-memory"
            )
        grammar = self._grammars().compile(params.structured) if params.structured is not None else None
        group = _Group(request_id, prompt_text, params)
        for i in range(params.n):
            sample = Request(
                request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                prompt_token_ids=list(token_ids),
                params=params,
                eos_token_ids=self.eos_token_ids,
                arrival_index=next(self._arrivals),
                max_total_tokens=max_total,
                prompt=prompt_text,
                parent_id=request_id,
                sample_index=i,
                generator=_generator(params.seed, i, self.runner.device),
                wait_for=group.samples[0] if i > 0 and self.config.cache.enable_prefix_caching else None,
            )
            if grammar is not None:
                sample.constraint = self._grammars().matcher(grammar, params.structured)
            group.samples.append(sample)
            group.detokenizers.append(
                IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens, params.stop,
                                       params.include_stop_str_in_output)
                if self.tokenizer else None
            )
        self.groups[request_id] = group
        for sample in group.samples:
            self.scheduler.add(sample)

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for sample in group.samples:
            self.scheduler.finish(sample, RequestStatus.FINISHED_ABORTED)

    # ---- internals ----------------------------------------------------------------------------------

    def _run(self, plan: SchedulerOutput) -> StepResult:
        with PROFILER.section("schedule"):
            tables = [self.kv_cache.block_ids(r.request_id) for r in plan.requests]
            computed = [r.num_computed_tokens for r in plan.requests]
            masks = self._grammar_masks(plan)
        return self.runner.execute(plan.requests, plan.num_new_tokens, tables, computed, masks)

    def _grammars(self) -> "GrammarCompiler":
        if self._grammar_compiler is None:
            from dsserve.engine.structured import GrammarCompiler  # llguidance: imported by the first grammar

            if self.tokenizer is None:
                raise InvalidRequestError("structured outputs need the model's tokenizer.json, which this model folder "
                                          "lacks", param="response_format")
            self._grammar_compiler = GrammarCompiler(self.tokenizer.to_json(), self.eos_token_ids,
                                                     self.model_config.vocab_size)
        return self._grammar_compiler

    def _grammar_masks(self, plan: SchedulerOutput) -> Future | None:
        """The token masks of this step's sampled rows that follow a grammar, computed on a thread while the forward
        pass runs: a Future of (rows, bitmask), or None when no row needs one (then nothing is paid)."""
        rows = [i for i, (r, n) in enumerate(zip(plan.requests, plan.num_new_tokens))
                if r.constraint is not None and r.constraint.is_active and r.num_computed_tokens + n >= r.num_tokens]
        if not rows:
            return None
        constraints = [plan.requests[i].constraint for i in rows]
        if self.runner.device.type == "cpu" and not _spare_core():
            # Every core runs the forward pass: a mask thread beside it preempts one of its OpenMP threads, and each
            # parallel region waits for that one (64 json_schema rows on the demo model, 2 cores: 76% of the
            # unconstrained throughput overlapped, 84% computed here, all rows in one vectorised call). On a GPU
            # the host waits for the device meanwhile: the masks overlap it.
            done: Future = Future()
            done.set_result((rows, self._grammar_compiler.fill_masks(constraints)))
            return done
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsserve-grammar")
        return self._mask_thread.submit(lambda: (rows, self._grammar_compiler.fill_masks(constraints)))

    def _update(self, plan: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        for row, entries in result.prompt_logprobs.items():
            # Entries cover positions from num_computed_tokens on; after a preemption the recompute repeats
            # positions already recorded, which are skipped.
            request = plan.requests[row]
            overlap = len(request.prompt_logprobs) - request.num_computed_tokens
            if overlap >= 0:
                request.prompt_logprobs.extend(entries[overlap:])
        touched: dict[str, _Group] = {}
        for row, error in result.failed.items():
            self._fail(plan.requests[row], "sampling", error, touched)
        advanced = self.scheduler.update(plan, result.sampled)
        row_of = {id(r): i for i, r in enumerate(plan.requests)}
        for request in advanced:
            group = self.groups.get(request.parent_id)
            if group is None or group.error is not None:
                continue
            row = row_of[id(request)]
            if result.logprobs[row] is not None:
                request.logprobs.append(result.logprobs[row])
            if request.constraint is not None:
                try:
                    request.constraint.advance(request.output_token_ids[-1])
                except Exception as e:  # noqa: BLE001 - this request's own failure: it ends, the step goes on
                    self._fail(request, "following its grammar", e, touched)
                    continue
            detok = group.detokenizers[request.sample_index]
            try:
                with PROFILER.section("detokenize"):
                    stopped = detok is not None and detok.append(request.output_token_ids[-1]) is not None
            except Exception as e:  # noqa: BLE001 - this request's own failure: it ends, the step goes on
                self._fail(request, "detokenizing", e, touched)
                continue
            if stopped and not request.is_finished:
                request.stop_reason = detok.stopped_by
                self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            output = self._output(group)
            if output.finished:
                del self.groups[group.request_id]
            outputs.append(output)
        return outputs

    def _fail(self, request: Request, stage: str, error: BaseException, touched: dict[str, _Group]) -> None:
        """End the request `request` belongs to (all its samples) with an error; the other requests go on."""
        group = self.groups.get(request.parent_id)
        if group is None:
            return
        logger.error("request %s failed while %s and was ended (the other requests go on): %r", group.request_id,
                     stage, error, exc_info=error)
        group.error = f"the engine failed while {stage} this request"
        for sample in group.samples:
            self.scheduler.finish(sample, RequestStatus.FINISHED_ERROR)
        touched[group.request_id] = group

    def _output(self, group: _Group) -> RequestOutput:
        completions = []
        for sample, detok in zip(group.samples, group.detokenizers):
            finished = sample.is_finished
            completions.append(CompletionOutput(
                index=sample.sample_index,
                text=detok.visible_text(finished) if detok else "",
                token_ids=list(sample.output_token_ids),
                finish_reason=sample.status.value if finished else None,
                stop_reason=sample.stop_reason,
                logprobs=list(sample.logprobs) if sample.params.logprobs is not None else None,
                cumulative_logprob=sum(lp for lp, _ in sample.logprobs) if sample.params.logprobs is not None else None,
            ))
        first = group.samples[0]
        prompt_logprobs = [None, *first.prompt_logprobs] if group.params.prompt_logprobs is not None else None
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=all(c.finished for c in completions),
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=first.num_cached_prompt_tokens,
            error=group.error,
        )

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"the model folder {self.model_config.path} has no tokenizer.json, so text prompts cannot be "
                    "encoded; send {'prompt_token_ids': [...]} or add the tokenizer files"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, _token_list(prompt)
        raise InvalidRequestError(f"a prompt is a string, a list of token ids or {{'prompt_token_ids': [...]}}; got {type(prompt).__name__}")


def build_engine_config(model: str | Path, **options: Any) -> EngineConfig:
    """`LLM(model, **options)`'s options (the fields of options.EngineArgs) resolved into the frozen EngineConfig;
    an unknown option is a ConfigError that lists the known ones."""
    return resolve_engine_args(model, EngineArgs.from_options(options))


def resolve_engine_args(model: str | Path, args: EngineArgs) -> EngineConfig:
    """Resolve every 'auto' value and check the options against each other; the result is frozen.

    Parallelism: `tensor_parallel_size` ranks on this node (this process is rank 0 and starts the others),
    or a multi-node `topology` (the fields `mindie.ranktable.topology` derives from a rank table), or, when neither
    says otherwise and `from_env` is set (`dsserve serve` sets it), torchrun's variables (RANK, WORLD_SIZE, ...):
    an offline `LLM` inside some other torchrun job stays a single-device engine.
    """
    model_config = ModelConfig.from_path(model)
    parallel = _parallel_config(args.tensor_parallel_size, args.enable_expert_parallel, args.topology,
                                args.master_port, args.dist_backend, args.connect_timeout, args.step_timeout,
                                args.from_env)
    parallel.parallel_checks(model_config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.block_size < 1 or args.block_size > 1024:
        raise ConfigError(f"--block-size {args.block_size} must be in [1, 1024] (16 is the default, MindIE uses 128)")
    max_model_len = args.max_model_len or model_config.max_position_embeddings
    if max_model_len < 2:
        raise ConfigError(f"--max-model-len {max_model_len} must be >= 2")
    if max_model_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}); lower it"
        )
    chunked = args.enable_chunked_prefill
    batched = args.max_num_batched_tokens or (2048 if chunked else max(2048, max_model_len))
    if not chunked and batched < max_model_len:
        raise ConfigError(
            f"--max-num-batched-tokens {batched} is below --max-model-len {max_model_len} with chunked prefill off: "
            "long prompts could never be scheduled; raise it or enable chunked prefill"
        )
    if args.max_num_seqs < 1:
        raise ConfigError(f"--max-num-seqs {args.max_num_seqs} must be >= 1")
    if not 0 < args.kv_cache_fraction <= 1:
        raise ConfigError(f"kv_cache_fraction {args.kv_cache_fraction} must be in (0, 1]")
    compute_dtype = resolve_dtype(args.dtype, model_config.checkpoint_dtype, device)
    backend = resolve_backend(args.backend, device)
    return EngineConfig(
        model=model_config,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=parse_memory(args.kv_cache_memory),
            kv_cache_fraction=args.kv_cache_fraction,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            fit_max_model_len=args.max_model_len is None,
        ),
        dtype=compute_dtype,
        weight_dtype=resolve_weight_dtype(args.weight_dtype, model_config.checkpoint_dtype, device, compute_dtype,
                                          native_bf16=device == "cpu" and _native_bf16()),
        kv_cache_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, device, compute_dtype),
        backend=backend,
        quantization=_resolve_quantization(args.quantization, backend, compute_dtype),
        checkpoint_quantization=_checkpoint_quantization(model_config),
        device=device,
        num_threads=args.num_threads or max(1, default_num_threads() // len(parallel.node_ranks)),
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        parallel=parallel,
    )


def _parallel_config(tp: int | None, expert_parallel: bool, topology: dict[str, Any] | None, master_port: int | None,
                     backend: str | None, connect_timeout: float, step_timeout: float,
                     from_env: bool) -> ParallelConfig:
    fields: dict[str, Any] = {}
    env = parallel_from_env() if topology is None and from_env else None
    if topology is not None:
        fields.update(topology)
    elif env is not None and env["world_size"] > 1:
        fields.update(env)  # started by torchrun: it set every rank's variables
    else:
        size = tp or 1
        fields.update(world_size=size, node_ranks=tuple(range(size)))
    if tp is not None and tp != fields["world_size"]:
        source = "the rank table" if topology is not None else "torchrun's WORLD_SIZE"
        raise ConfigError(f"--tensor-parallel-size {tp} disagrees with {source} ({fields['world_size']} ranks); "
                          "leave it out or make them match")
    if master_port is not None:
        fields["master_port"] = master_port
    elif topology is not None and fields["world_size"] > len(fields["node_ranks"]):
        fields["master_port"] = 29500
    config = ParallelConfig(enable_expert_parallel=expert_parallel, backend=backend, connect_timeout_s=connect_timeout,
                            step_timeout_s=step_timeout, **fields)
    config.check()
    return config


def _fit_max_model_len(config: EngineConfig, num_blocks: int) -> EngineConfig:
    """One sequence of max_model_len tokens must fit the KV cache. A default (the model's context) is lowered to
    what fits, with a warning; an explicit --max-model-len that cannot fit is an error at start, not per request."""
    capacity = num_blocks * config.cache.block_size
    max_len = config.scheduler.max_model_len
    if max_len <= capacity:
        return config
    if not config.scheduler.fit_max_model_len:
        raise ConfigError(
            f"--max-model-len {max_len} does not fit the KV cache ({num_blocks} blocks x {config.cache.block_size} "
            f"= {capacity} tokens); raise --kv-cache-memory or lower --max-model-len"
        )
    logger.warning("max_model_len lowered from %d (the model's context) to %d, what the KV cache holds; raise "
                   "--kv-cache-memory for longer requests", max_len, capacity)
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_model_len=capacity))


def _native_bf16() -> bool:
    from dsserve.backends.cpu import kernels as cpu_kernels

    return cpu_kernels.native_bf16()


def _load_tokenizer(config: EngineConfig) -> Tokenizer | None:
    folder = Path(config.tokenizer_path or config.model.path)
    if not (folder / "tokenizer.json").exists():
        if config.tokenizer_path:
            raise ConfigError(f"--tokenizer {folder} has no tokenizer.json")
        logger.warning("%s has no tokenizer.json: only token-id prompts are accepted", folder)
        return None
    return Tokenizer(folder)


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + index)  # n > 1: distinct but reproducible samples
    return generator


def _token_list(ids: Any) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequestError("prompt_token_ids must be a list of integers")
    return list(ids)


def _spare_core() -> bool:
    """A core this process may run on that the forward pass's threads leave free (grammar masks can overlap it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def _checkpoint_quantization(model_config) -> str | None:
    """The form a pre-quantized checkpoint's linears load as, or None; a format no reader holds refused here."""
    reader = checkpoint_reader(model_config.quantization_config)
    return None if reader is None else reader.scheme.name


def _resolve_quantization(requested: str | None, backend: str, dtype: str) -> str | None:
    """The --quantization scheme's canonical name (formats/quantization.py), checked against where it can run."""
    if requested is None:
        return None
    name = QuantScheme.parse(requested).name
    if backend == "cpu" and dtype != "float32":
        raise ConfigError(f"--quantization {requested} on the cpu backend computes in float32 (here --dtype {dtype}); "
                          "drop --dtype, or use --backend torch (the plain-torch reference products, slower)")
    return name
