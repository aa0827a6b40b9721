"""Tensor and expert parallelism on CPU (gloo, local processes): the same greedy tokens as one rank, and the
start-up checks that name what is wrong instead of hanging."""

import dataclasses
import json

import pytest
import torch

from dsserve import LLM, SamplingParams
from dsserve.config import ModelConfig, ParallelConfig, parallel_from_env
from dsserve.engine.engine import build_engine_config
from dsserve.errors import ConfigError, DistributedError
from dsserve.mindie.ranktable import generate, topology
from dsserve.runner.batch import StepInputs

# Mixed lengths, and a small token budget so that steps mix prompt chunks with decodes.
PROMPTS = [[5, 17, 33, 9, 100 + i, 7, 250, 3][: 2 + i % 6] * (1 + i % 4) for i in range(7)]
GREEDY = SamplingParams(max_tokens=16, temperature=0)
OPTIONS = dict(num_kv_blocks=256, max_num_batched_tokens=24, step_timeout=30, connect_timeout=60)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("name,expert_parallel", [
    ("deepseek_v3", False), ("deepseek_v3", True), ("qwen2_untied", False), ("qwen2_tied", True),
    ("llama_bias", False),  # row-parallel o_proj with a bias: added once, by rank 0
])
def test_tp2_greedy_tokens_equal_one_rank(model_dir, name, expert_parallel):
    path = model_dir(name)
    single = LLM(path, **OPTIONS)
    expected = _tokens(single)
    logprobs_params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2)
    expected_lp = single.generate(PROMPTS[3], logprobs_params)[0]
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **OPTIONS)
    children = [proc for _, proc in llm.engine.runner.group.children]
    assert len(children) == 1
    try:
        assert llm.engine.config.parallel.world_size == 2
        assert _tokens(llm) == expected
        got_lp = llm.generate(PROMPTS[3], logprobs_params)[0]
        assert got_lp.outputs[0].token_ids == expected_lp.outputs[0].token_ids
        for (a, _), (b, _) in zip(got_lp.outputs[0].logprobs, expected_lp.outputs[0].logprobs):
            assert a == pytest.approx(b, abs=1e-4)
        for a, b in zip(got_lp.prompt_logprobs[1:], expected_lp.prompt_logprobs[1:]):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and set(a[1]) == set(b[1])
    finally:
        llm.engine.shutdown()
    assert children[0].poll() == 0  # rank 1 stopped cleanly on rank 0's STOP


def test_each_rank_holds_its_share(model_dir):
    """Rank 0 of 2 holds half the heads, half of every expert (TP) or half the experts (EP), half the vocabulary."""
    from dsserve.layers.parallel import TensorParallel
    from dsserve.models.registry import model_class

    config = ModelConfig.from_path(model_dir("deepseek_v3"))
    full = model_class(config)(config, 64, torch.float32)
    for ep in (False, True):
        half = model_class(config)(config, 64, torch.float32, TensorParallel(0, 2, ep))
        n_full = sum(p.numel() for p in full.parameters())
        n_half = sum(p.numel() for p in half.parameters())
        assert n_half < 0.6 * n_full
        moe = half.layers[1].mlp.experts
        assert (moe.num_local, moe.intermediate_size) == ((4, 32) if ep else (8, 16))
        assert half.layers[0].self_attn.num_heads == 2
        assert half.embed_tokens.weight.shape[0] == config.vocab_size // 2
        slices = half.checkpoint_slices()
        assert ("model.layers.1.mlp.experts.7.gate_proj.weight" in slices) == (not ep)


def test_step_inputs_round_trip():
    inputs = StepInputs.build([[1, 2, 3], [4], [5, 6]], [0, 7, 2], [[3], [1, 2], [9, 8, 7]])
    inputs.logit_rows = torch.tensor([2, 3, 5])
    back = StepInputs.unpack(inputs.pack())
    for field in dataclasses.fields(StepInputs):
        if field.name in ("due", "prompt_spans"):  # rank 0's own bookkeeping, not sent
            continue
        assert torch.equal(getattr(back, field.name), getattr(inputs, field.name)), field.name


def test_sizes_that_do_not_divide_are_refused_before_start(model_dir):
    path = model_dir("deepseek_v3")  # 4 heads, 8 experts, moe_intermediate 32
    with pytest.raises(ConfigError, match="does not divide num_attention_heads = 4"):
        build_engine_config(path, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="n_routed_experts = 8"):
        build_engine_config(path, tensor_parallel_size=16, enable_expert_parallel=True)
    with pytest.raises(ConfigError, match="num_key_value_heads = 2 do not divide"):
        ParallelConfig(world_size=3, node_ranks=(0, 1, 2)).parallel_checks(ModelConfig.from_path(model_dir("qwen2_tied")))
    with pytest.raises(ConfigError, match="disagrees with the rank table"):
        table = generate(["10.0.0.1", "10.0.0.2"], 2)
        build_engine_config(path, tensor_parallel_size=2, topology=topology(table, 1))


def test_rank_table_topology():
    table = generate(["10.0.0.1", "10.0.0.2"], 4)
    node1 = topology(table, 1)
    assert node1["world_size"] == 8 and node1["rank"] == 4 and node1["node_ranks"] == (4, 5, 6, 7)
    assert node1["master_addr"] == "10.0.0.1" and node1["node_addr"] == "10.0.0.2"
    with pytest.raises(ConfigError, match="--node-rank 2 is outside"):
        topology(table, 2)
    table["server_list"][0]["device"][0]["rank_id"] = "9"
    with pytest.raises(ConfigError, match="rank table is invalid"):
        topology(table, 0)


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29511"}
    fields = parallel_from_env(env)
    assert fields["node_ranks"] == (4, 5, 6, 7) and fields["node_rank"] == 1 and not fields["spawn"]
    assert fields["master_port"] == 29511
    assert parallel_from_env({}) is None
    with pytest.raises(ConfigError, match="RANK"):
        parallel_from_env({**env, "RANK": "x"})


def test_engine_config_travels_as_json(model_dir):
    config = build_engine_config(model_dir("qwen2_tied"), tensor_parallel_size=2, max_model_len=256)
    back = type(config).from_json(config.to_json())
    assert back.parallel == config.parallel and back.scheduler == config.scheduler and back.model == config.model
    assert json.loads(config.to_json())["parallel"]["world_size"] == 2


def test_a_rank_that_never_joins_is_named(model_dir):
    """Node 0 of a two-node rank table started alone: an error naming the missing rank, not a hang."""
    table = generate(["127.0.0.1", "127.0.0.2"], 1)
    with pytest.raises(DistributedError, match=r"rank\(s\) 1 of 2 did not check in"):
        LLM(model_dir("qwen2_tied"), topology=topology(table, 0), master_port=_free_port(), connect_timeout=2,
            num_kv_blocks=16)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_variables_only_count_when_asked(model_dir, monkeypatch):
    """An offline LLM inside someone else's torchrun job stays on one device; `dsserve serve` opts in."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = model_dir("qwen2_tied")
    assert build_engine_config(path).parallel.world_size == 1
    assert build_engine_config(path, tensor_parallel_size=1).parallel.world_size == 1
    assert build_engine_config(path, from_env=True).parallel.world_size == 2


def test_a_failure_on_rank_0_mid_step_stops_the_deployment_at_once(model_dir, monkeypatch):
    """Rank 0 raising after it sent a step (here: building the batch) leaves rank 1 inside that step's collectives:
    the engine must say so and refuse further steps immediately, not hang on the next one."""
    import time

    import dsserve.runner.model_runner as model_runner

    llm = LLM(model_dir("qwen2_tied"), tensor_parallel_size=2, **OPTIONS)
    (child,) = [proc for _, proc in llm.engine.runner.group.children]
    real = model_runner.build_forward_batch
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_runner, "build_forward_batch", failing)
    try:
        with pytest.raises(DistributedError, match="rank 0 failed during a step .*injected"):
            llm.generate(PROMPTS, GREEDY)
        started = time.monotonic()
        with pytest.raises(DistributedError, match="lost a rank earlier"):
            llm.generate(PROMPTS[0], GREEDY)
        assert time.monotonic() - started < 2
    finally:
        started = time.monotonic()
        llm.engine.shutdown()
        assert time.monotonic() - started < 10
    assert child.poll() is not None


def test_a_rank_that_stops_loading_is_named(monkeypatch):
    """A rank whose process dies while loading (no error published: SIGKILL, OOM killer) is noticed from its
    stopped heartbeat instead of being waited for up to the load timeout."""
    import datetime
    import time

    import torch.distributed as dist

    import dsserve.runner.parallel as parallel

    monkeypatch.setattr(parallel, "_stall_s", lambda config: 3.0)  # beats come every 2 s
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, datetime.timedelta(seconds=10), wait_for_workers=False)
    group = object.__new__(parallel.Distributed)
    group.store, group.rank, group.world_size, group.children, group._stopping = store, 0, 2, [], False
    group.config = ParallelConfig(world_size=2, node_ranks=(0, 1))
    store.add("dsserve/alive/1", 1)  # rank 1 started loading, then went silent
    started = time.monotonic()
    with group.loading():
        with pytest.raises(DistributedError, match="rank 1 stopped loading its weights"):
            group.agree_min("num_blocks", 10)
    assert time.monotonic() - started < 8
    # A rank that keeps beating and then reports is waited for, and the smallest value wins.
    rank1 = parallel._LoadingBeat(store, "dsserve/alive/1")
    with rank1:
        import threading

        threading.Timer(4.5, lambda: store.set("dsserve/kv/1", "7")).start()  # longer than the stall limit
        with group.loading():
            assert group.agree_min("kv", 10) == 7


def test_fp16_weights_under_tp_and_engines_one_after_another(model_dir):
    """float16 weights split over ranks give one rank's tokens; a second -tp engine in the same process starts and
    shuts down cleanly after the first (the first's store must not close the second's listening socket)."""
    path = model_dir("deepseek_v3")
    expected = _tokens(LLM(path, weight_dtype="float16", **OPTIONS))
    for expert_parallel in (False, True):
        llm = LLM(path, weight_dtype="float16", tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
                  **OPTIONS)
        children = [proc for _, proc in llm.engine.runner.group.children]
        try:
            assert _tokens(llm) == expected
        finally:
            llm.engine.shutdown()
        assert children[0].poll() == 0


@pytest.mark.skipif(not __import__("dsserve.backends.cpu.kernels", fromlist=["x"]).native_bf16(),
                    reason="needs a CPU with native bf16 (AMX or AVX512-BF16)")
def test_bf16_weights_under_tp_match_one_rank(model_dir):
    """bfloat16 weights split over two ranks: the row-parallel partial sums add up to one rank's log-probabilities
    (within the summation order's rounding)."""
    from dsserve import SamplingParams

    path = model_dir("qwen2_untied")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompt = [5, 17, 33, 9, 100, 7, 3, 4, 250, 11, 12]

    def logprobs(llm):
        return [entry[0] for entry in llm.generate([prompt], params)[0].prompt_logprobs[1:]]

    expected = logprobs(LLM(path, weight_dtype="bfloat16", **OPTIONS))
    llm = LLM(path, weight_dtype="bfloat16", tensor_parallel_size=2, **OPTIONS)
    try:
        assert logprobs(llm) == pytest.approx(expected, abs=2e-3)
    finally:
        llm.engine.shutdown()


@pytest.mark.skipif(not __import__("dsserve.backends.cpu.kernels", fromlist=["x"]).linear_quant_usable(),
                    reason="the quantized linears need AVX-512")
@pytest.mark.parametrize("name,expert_parallel", [("qwen2_untied", False), ("deepseek_v3_moe64", False),
                                                  ("deepseek_v3_moe64", True)])
def test_quantized_weights_under_tp_match_one_rank(model_dir, name, expert_parallel):
    """Each rank quantizes its own slice as it loads. int4's groups lie within a slice where the row-parallel split
    falls on a group boundary (here: every split is a multiple of 32), so two ranks hold one rank's values: the same greedy tokens and log-probabilities. int8's
    scale is per output row of the slice, so a row-parallel layer's values differ slightly from one rank's (as
    each rank of any engine quantizing at load gets): the log-probabilities agree within that rounding."""
    path = model_dir(name)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, prompt_logprobs=0)

    def logprobs(llm):
        out = llm.generate(PROMPTS[3], params)[0]
        return [e[0] for e in out.prompt_logprobs[1:]] + [e[0] for e in out.outputs[0].logprobs], out.outputs[0].token_ids

    for quantization, tolerance in (("int4", 1e-4), ("int8", 0.1)):
        expected_tokens = _tokens(single := LLM(path, quantization=quantization, **OPTIONS))
        expected, _ = logprobs(single)
        single.shutdown()
        llm = LLM(path, quantization=quantization, tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
                  **OPTIONS)
        try:
            got, _ = logprobs(llm)
            assert got == pytest.approx(expected, abs=tolerance)
            if quantization == "int4":
                assert _tokens(llm) == expected_tokens
        finally:
            llm.engine.shutdown()
