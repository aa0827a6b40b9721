"""Llama (and the R1-Distill-Llama models): GQA attention with rotary, SwiGLU MLP, RMSNorm; readable top to bottom."""

from __future__ import annotations

import torch
from torch import nn

from dsserve.config import ModelConfig
from dsserve.layers.attention import AttentionMetadata, paged_attention
from dsserve.layers.linear import MLP, Linear
from dsserve.layers.rotary import RotaryEmbedding
from dsserve.models.base import CausalLM, DecoderLayer


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            [(f"{prefix}.q_proj", q_size), (f"{prefix}.k_proj", kv_size), (f"{prefix}.v_proj", kv_size)],
            config.qkv_bias,
            dtype,
        )
        self.o_proj = Linear(q_size, [(f"{prefix}.o_proj", config.hidden_size)], False, dtype)
        self.rotary = rotary  # shared by all layers
        self.scale = self.head_dim**-0.5
        self.split = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v, cache, meta, self.scale)  # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype):
        super().__init__(config, dtype)
        rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions, interleaved=False, dtype=dtype)
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = LlamaAttention(config, f"{prefix}.self_attn", rotary, dtype)
            mlp = MLP(config.hidden_size, config.intermediate_size, f"{prefix}.mlp", dtype)
            self.layers.append(DecoderLayer(config, i, attn, mlp, dtype))
