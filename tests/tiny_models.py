"""Tiny random-weight checkpoints written by transformers' save_pretrained: the oracle for every architecture."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320

YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {**YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}


def _finish(model, path: Path, seed: int) -> Path:
    # Larger-than-default init spreads the logits, so greedy ties (which any reordering of float sums may break
    # differently) do not occur.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return path


def deepseek_v3(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_scaling=YARN_V3, max_position_embeddings=2560, bos_token_id=0, eos_token_id=1,
    ), **overrides})
    torch.manual_seed(seed)
    return _finish(DeepseekV3ForCausalLM(cfg), path, seed)


def deepseek_v2(path: Path, seed: int = 0, **overrides) -> Path:
    """V2 with softmax group_limited_greedy routing and q_lora_rank null (as V2-Lite)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(**{**dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, topk_method="group_limited_greedy", q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, routed_scaling_factor=16.0,
        norm_topk_prob=False, rope_scaling=YARN_V2, max_position_embeddings=2560, bos_token_id=0, eos_token_id=1,
    ), **overrides})
    torch.manual_seed(seed)
    return _finish(DeepseekV2ForCausalLM(cfg), path, seed)


def qwen2(path: Path, tied: bool, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=tied, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(cfg), path, seed)


def llama(path: Path, seed: int = 0, attention_bias: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        attention_bias=attention_bias,
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(cfg), path, seed)


BUILDERS = {
    "deepseek_v3": deepseek_v3,
    "deepseek_v2": deepseek_v2,
    # a latent + rope entry of 48 values: a multiple of the attention kernel's vector width with AVX-512 too (16)
    "deepseek_v3_rope16": lambda p: deepseek_v3(p, qk_rope_head_dim=16),
    "deepseek_v3_rope16_no_q_lora": lambda p: deepseek_v3(p, qk_rope_head_dim=16, q_lora_rank=None),
    # experts 64 wide: halves of 32 under -tp 2, whole int4 groups (tests/runner/test_parallel.py)
    "deepseek_v3_moe64": lambda p: deepseek_v3(p, moe_intermediate_size=64),
    "deepseek_v2_rope16": lambda p: deepseek_v2(p, qk_rope_head_dim=16),
    # V2-Lite's routing: softmax, plain greedy top-k over all experts, weights renormalized
    "deepseek_v2_lite_rope16": lambda p: deepseek_v2(p, qk_rope_head_dim=16, topk_method="greedy", n_group=1,
                                                     topk_group=1, norm_topk_prob=True, num_experts_per_tok=3),
    "qwen2_tied": lambda p: qwen2(p, tied=True),
    "qwen2_untied": lambda p: qwen2(p, tied=False),
    "llama3": llama,
    "llama_bias": lambda p: llama(p, attention_bias=True),  # q/k/v and o_proj biases
}


def hf_greedy(path: Path, prompt: list[int], num_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own greedy decode with its KV cache: tokens and the logits of every step."""
    from transformers import AutoModelForCausalLM

    model = _hf_model(path)
    ids = torch.tensor([prompt])
    out_tokens, out_logits = [], []
    past = None
    with torch.no_grad():
        for _ in range(num_new):
            result = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = result.past_key_values
            logits = result.logits[0, -1].float()
            token = int(logits.argmax())
            out_tokens.append(token)
            out_logits.append(logits)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out_tokens, out_logits


_HF_CACHE: dict[str, object] = {}


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    key = str(path)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_CACHE[key]
