"""Write a tiny random-weight DeepSeek-V3-architecture checkpoint with an R1-style byte-level tokenizer.

It has the real layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with R1's chat
template, generation_config.json), so every loading and serving path runs on it; its text is noise.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL = [BOS, EOS]  # removed by skip_special_tokens
MARKERS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]  # not special in R1: they survive decoding


def r1_chat_template() -> str:
    return resources.files("dsserve.assets").joinpath("r1_chat_template.jinja").read_text(encoding="utf-8")


def byte_level_tokenizer() -> Tokenizer:
    """A BPE with no merges over the 256 byte symbols: any UTF-8 text round-trips, one token per byte."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL + MARKERS)}
    vocab.update({symbol: len(SPECIAL) + len(MARKERS) + i for i, symbol in enumerate(alphabet)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tokenizer


def write_tokenizer(folder: Path, model_max_length: int = 2048) -> None:
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": r1_chat_template(),
    }, ensure_ascii=False, indent=1))


def tiny_config(vocab_size: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 48,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "bos_token_id": 0, "eos_token_id": 1,
    }


def write_tiny_model(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the checkpoint into `folder` atomically (a temporary sibling renamed at the end)."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    vocab_size = byte_level_tokenizer().get_vocab_size(with_added_tokens=True)
    config = tiny_config(vocab_size)
    (staging / "config.json").write_text(json.dumps(config, indent=1))
    (staging / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    write_tokenizer(staging)
    save_file(_random_weights(config, seed), str(staging / "model.safetensors"), metadata={"format": "pt"})
    try:
        staging.rename(folder)
    except OSError:  # another process won the race
        if not (folder / "model.safetensors").exists():
            raise
    return folder


def _random_weights(c: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.08

    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    t = {"model.embed_tokens.weight": w(c["vocab_size"], hidden), "model.norm.weight": torch.ones(hidden),
         "lm_head.weight": w(c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        t[p + "self_attn.q_a_proj.weight"] = w(c["q_lora_rank"], hidden)
        t[p + "self_attn.q_a_layernorm.weight"] = torch.ones(c["q_lora_rank"])
        t[p + "self_attn.q_b_proj.weight"] = w(heads * qk, c["q_lora_rank"])
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = w(c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden)
        t[p + "self_attn.kv_a_layernorm.weight"] = torch.ones(c["kv_lora_rank"])
        t[p + "self_attn.kv_b_proj.weight"] = w(heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * c["v_head_dim"])
        if i < c["first_k_dense_replace"]:
            mlps = {"mlp.": c["intermediate_size"]}
        else:
            t[p + "mlp.gate.weight"] = w(c["n_routed_experts"], hidden)
            t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(c["n_routed_experts"])
            mlps = {f"mlp.experts.{j}.": c["moe_intermediate_size"] for j in range(c["n_routed_experts"])}
            mlps["mlp.shared_experts."] = c["moe_intermediate_size"] * c["n_shared_experts"]
        for name, inter in mlps.items():
            t[p + name + "gate_proj.weight"] = w(inter, hidden)
            t[p + name + "up_proj.weight"] = w(inter, hidden)
            t[p + name + "down_proj.weight"] = w(hidden, inter)
    return t
