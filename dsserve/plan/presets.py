"""Published config.json values of the DeepSeek family (as config fields, never as answers) and device sizes."""

from __future__ import annotations

_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "max_position_embeddings": 163840, "tie_word_embeddings": False,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}
_V2_COMMON = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": False, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "torch_dtype": "bfloat16", "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
}


def _distill(model_type, layers, hidden, heads, kv, inter, vocab, theta, eps, **extra):
    return {"model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "rope_theta": theta,
            "rms_norm_eps": eps, "max_position_embeddings": 131072, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", **extra}


_LLAMA3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}

PRESETS: dict[str, dict] = {
    "deepseek-r1": _V3,
    "deepseek-v3": _V3,
    "deepseek-v2": {**_V2_COMMON, "hidden_size": 5120, "num_hidden_layers": 60, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "q_lora_rank": 1536, "intermediate_size": 12288,
                    "moe_intermediate_size": 1536, "n_routed_experts": 160, "n_group": 8, "topk_group": 3,
                    "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0},
    "deepseek-v2-lite": {**_V2_COMMON, "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "q_lora_rank": None, "intermediate_size": 10944,
                         "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_group": 1, "topk_group": 1,
                         "topk_method": "greedy", "routed_scaling_factor": 1.0},
    "r1-distill-qwen-1.5b": _distill("qwen2", 28, 1536, 12, 2, 8960, 151936, 10000, 1e-6),
    "r1-distill-qwen-7b": _distill("qwen2", 28, 3584, 28, 4, 18944, 152064, 10000, 1e-6),
    "r1-distill-qwen-14b": _distill("qwen2", 48, 5120, 40, 8, 13824, 152064, 1e6, 1e-5),
    "r1-distill-qwen-32b": _distill("qwen2", 64, 5120, 40, 8, 27648, 152064, 1e6, 1e-5),
    "r1-distill-llama-8b": _distill("llama", 32, 4096, 32, 8, 14336, 128256, 500000, 1e-5, **_LLAMA3),
    "r1-distill-llama-70b": _distill("llama", 80, 8192, 64, 8, 28672, 128256, 500000, 1e-5, **_LLAMA3),
}

# Memory an application can allocate, in GiB (nvidia-smi's totals; Ascend 910B's 64 GB card).
DEVICES: dict[str, float] = {
    "h100-80g": 81559 / 1024, "h800-80g": 81559 / 1024, "h200-141g": 143771 / 1024, "a100-40g": 40960 / 1024,
    "a100-80g": 81920 / 1024, "rtx4090-24g": 24564 / 1024, "910b-64g": 64.0,
}
