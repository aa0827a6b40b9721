"""The planner against an independent calculation from the formulas, and the seed guide's rules of thumb."""

import json

import pytest

from dsserve.errors import ConfigError
from dsserve.plan.planner import count_params, kv_bytes_per_token, load_model_config, plan, weight_bytes
from dsserve.plan.presets import PRESETS


def _dense_params(c) -> float:
    """Llama/Qwen2: embeddings (+ head), per layer q,k,v,o + 3 MLP matrices + 2 norms (+ qkv bias), final norm."""
    h, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * c["intermediate_size"] + 2 * h
    if c["model_type"] == "qwen2":
        per_layer += q + 2 * kv
    return 2 * c["vocab_size"] * h + c["num_hidden_layers"] * per_layer + h


def _mla_moe_params(c) -> tuple[float, float]:
    """DeepSeek: (total, active) from the config fields, written out term by term."""
    h, n = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if c["q_lora_rank"]:
        q = h * c["q_lora_rank"] + c["q_lora_rank"] + c["q_lora_rank"] * n * qk
    else:
        q = h * n * qk
    attn = q + h * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"] \
        + c["kv_lora_rank"] * n * (c["qk_nope_head_dim"] + c["v_head_dim"]) + n * c["v_head_dim"] * h
    dense = 3 * h * c["intermediate_size"]
    expert = 3 * h * c["moe_intermediate_size"]
    router = c["n_routed_experts"] * h + (c["n_routed_experts"] if c["model_type"] == "deepseek_v3" else 0)
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
    common = 2 * c["vocab_size"] * h + h + c["num_hidden_layers"] * (attn + 2 * h)
    total = common + c["first_k_dense_replace"] * dense + moe_layers * (
        (c["n_routed_experts"] + c["n_shared_experts"]) * expert + router)
    active = common + c["first_k_dense_replace"] * dense + moe_layers * (
        (c["num_experts_per_tok"] + c["n_shared_experts"]) * expert + router)
    return total, active


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_match_the_formulas(name):
    raw = PRESETS[name]
    _, config = load_model_config(name)
    counted = count_params(config)
    if raw["model_type"].startswith("deepseek"):
        total, active = _mla_moe_params(raw)
        assert counted.active == pytest.approx(active, rel=0.01)
    else:
        total = _dense_params(raw)
        assert counted.active == counted.total
    assert counted.total == pytest.approx(total, rel=0.01)


@pytest.mark.parametrize("name,billions,kv_kib", [
    ("deepseek-r1", 671.03, 68.6), ("deepseek-v2-lite", 15.71, 30.4), ("r1-distill-qwen-1.5b", 1.78, 28),
    ("r1-distill-qwen-7b", 7.62, 56), ("r1-distill-llama-8b", 8.03, 128), ("r1-distill-qwen-14b", 14.77, 192),
    ("r1-distill-qwen-32b", 32.76, 256), ("r1-distill-llama-70b", 70.55, 320),
])
def test_published_sizes(name, billions, kv_kib):
    _, c = load_model_config(name)
    assert count_params(c).total / 1e9 == pytest.approx(billions, rel=0.01)
    raw = PRESETS[name]
    if raw["model_type"].startswith("deepseek"):
        kv = (raw["kv_lora_rank"] + raw["qk_rope_head_dim"]) * raw["num_hidden_layers"] * 2
    else:
        kv = 2 * raw["num_key_value_heads"] * (raw["hidden_size"] // raw["num_attention_heads"]) * raw["num_hidden_layers"] * 2
    assert kv_bytes_per_token(c) == kv
    assert kv / 1024 == pytest.approx(kv_kib, rel=0.01)


def test_mla_cache_is_replicated_but_gqa_splits():
    _, r1 = load_model_config("deepseek-r1")
    assert kv_bytes_per_token(r1, tp=16) == kv_bytes_per_token(r1, tp=1)
    _, qwen = load_model_config("r1-distill-qwen-32b")  # 8 KV heads
    assert kv_bytes_per_token(qwen, tp=4) * 4 == kv_bytes_per_token(qwen, tp=1)
    assert kv_bytes_per_token(qwen, tp=16) == kv_bytes_per_token(qwen, tp=8)  # at least one head per rank


def test_the_seed_rules_of_thumb():
    """BF16 R1 needs 4 nodes of 8 x 64 GB (2 cannot hold the weights, 3 = 24 cards is no valid split);
    W8A8 needs 2 nodes; INT4 fits one node."""
    bf16 = plan("deepseek-r1", "910b-64g", dtype="bf16")
    assert (bf16.devices, bf16.nodes) == (32, 4)
    assert any(r.startswith("16 devices") and "exceed" in r for r in bf16.reasons)
    assert any(r.startswith("24 devices") and "divides neither" in r for r in bf16.reasons)
    assert plan("deepseek-r1", "910b-64g", dtype="w8a8").nodes == 2
    assert plan("deepseek-r1", "910b-64g", dtype="int4").nodes == 1
    fp8 = weight_bytes(count_params(load_model_config("deepseek-r1")[1]), "fp8") / 2**30
    assert fp8 == pytest.approx(627, rel=0.01)


def test_does_not_fit_says_why():
    p = plan("deepseek-r1", "rtx4090-24g", devices_per_node=1, dtype="bf16", max_nodes=4)
    assert not p.fits and "exceed" in p.reasons[-1]


def test_cli_json(tmp_path):
    from typer.testing import CliRunner

    from dsserve.cli import app

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["r1-distill-qwen-7b"]))
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "config.json"), "--device", "a100-80g", "--json",
                                      "--max-model-len", "32768", "--concurrency", "8"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["fits"] and data["devices"] == 1 and data["max_concurrent_sequences"] >= 8


def test_bytes_per_device_match_what_a_rank_loads(model_dir):
    """The planner's per-device weights for 2 ranks equal the parameter bytes of rank 0's model in the engine
    (split heads, experts and vocabulary; whole MLA down-projections, norms and float32 routers)."""
    import torch

    from dsserve.config import ModelConfig
    from dsserve.layers.parallel import TensorParallel
    from dsserve.models.registry import model_class
    from dsserve.plan.planner import weight_bytes_per_device

    config = ModelConfig.from_path(model_dir("deepseek_v3"))
    params = count_params(config)
    for ep in (False, True):
        rank0 = model_class(config)(config, 64, torch.bfloat16, TensorParallel(0, 2, ep))
        loaded = sum(p.numel() * p.element_size() for p in rank0.parameters())
        assert weight_bytes_per_device(params, "bf16", 2) == pytest.approx(loaded, rel=1e-9)
    single = model_class(config)(config, 64, torch.bfloat16)
    assert weight_bytes_per_device(params, "bf16", 1) == sum(p.numel() * p.element_size() for p in single.parameters())


def test_the_plan_says_how_to_launch():
    assert "--rank-table" in plan("deepseek-r1", "910b-64g", dtype="bf16").launch
    assert "--enable-expert-parallel" in plan("deepseek-r1", "910b-64g", dtype="bf16").launch
    assert plan("deepseek-r1", "910b-64g", dtype="int4").launch == "dsserve serve MODEL -tp 8 --enable-expert-parallel"
    assert plan("r1-distill-qwen-32b", "a100-80g", max_model_len=32768, concurrency=8).launch == "dsserve serve MODEL -tp 2"


def test_cpu_plan_states_the_load_peak(tmp_path):
    """On CPU the plan says what loading peaks at: the weights and the LM head staged in bf16
    (benchmarks/load_memory.py measured 3.59 GiB above the interpreter for this shape)."""
    import json

    config = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = plan(str(tmp_path), device="cpu", devices_per_node=1)
    assert result.fits and 3.5 <= result.load_peak_gib <= 3.9
    assert plan(str(tmp_path), device="910b-64g").load_peak_gib == 0.0  # only the CPU path packs while loading


def test_dsserve_quantization_sizes():
    """int8 / int4: the linears at 8 / 4.5 / 4.75 bits (per-row or per-group scales) and the LM head in int8; the
    launch line carries the --quantization flag."""
    p = count_params(load_model_config("r1-distill-qwen-1.5b")[1])
    bf16, int8, int4 = (weight_bytes(p, d) for d in ("bf16", "int8", "int4"))
    head_int8 = p.head + 4 * p.head_rows
    assert int8 == p.linear + 4 * p.linear_rows + 2 * (p.total - p.linear - p.head) + head_int8
    assert int4 == p.linear // 2 + 2 * (p.linear // 32) + 2 * (p.total - p.linear - p.head) + head_int8
    assert weight_bytes(p, "int4-g128-zp") == int4 - 2 * (p.linear // 32) + 3 * (p.linear // 128)
    assert int4 < weight_bytes(p, "w8a8") < bf16 and int8 < weight_bytes(p, "w8a8")  # w8a8 keeps a bf16 head
    assert plan("r1-distill-qwen-1.5b", "cpu", devices_per_node=1, dtype="int4").launch == \
        "dsserve serve MODEL --quantization int4"
    with pytest.raises(ConfigError, match="'int4-g48' is not one of"):
        weight_bytes(p, "int4-g48")
