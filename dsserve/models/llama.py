"""Llama (and the R1-Distill-Llama models): GQA attention with rotary, SwiGLU MLP, RMSNorm; readable top to bottom."""

from __future__ import annotations

import torch
from torch import nn

from dsserve.config import ModelConfig
from dsserve.errors import ConfigError
from dsserve.layers.linear import MLP, Linear
from dsserve.layers.parallel import SINGLE, TensorParallel
from dsserve.layers.rotary import RotaryEmbedding
from dsserve.models.base import CausalLM, DecoderLayer


def kv_heads_of_rank(num_kv_heads: int, tp: TensorParallel) -> slice:
    """This rank's KV heads: an even share, or (fewer KV heads than ranks) one head shared by size / Hkv ranks."""
    if num_kv_heads % tp.size == 0:
        return tp.shard(num_kv_heads, "num_key_value_heads")
    if tp.size % num_kv_heads == 0:
        head = tp.rank * num_kv_heads // tp.size
        return slice(head, head + 1)
    raise ConfigError(
        f"num_key_value_heads = {num_kv_heads} and --tensor-parallel-size {tp.size} do not divide one another; "
        "choose a size that divides the KV heads or is a multiple of them"
    )


class LlamaAttention(nn.Module):
    """Tensor parallel: each rank has 1/size of the query heads and their KV heads (q/k/v column-parallel,
    o_proj row-parallel); its KV cache holds only those KV heads."""

    def __init__(self, config: ModelConfig, prefix: str, rotary: RotaryEmbedding, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        self.head_dim = d = config.head_dim
        heads = tp.shard(config.num_attention_heads, "num_attention_heads")
        kv_heads = kv_heads_of_rank(config.num_key_value_heads, tp)
        self.num_heads, self.num_kv_heads = heads.stop - heads.start, kv_heads.stop - kv_heads.start
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        q_rows, kv_rows = slice(heads.start * d, heads.stop * d), slice(kv_heads.start * d, kv_heads.stop * d)
        self.qkv_proj = Linear(
            config.hidden_size,
            [(f"{prefix}.q_proj", q_size, q_rows), (f"{prefix}.k_proj", kv_size, kv_rows),
             (f"{prefix}.v_proj", kv_size, kv_rows)] if tp.size > 1
            else [(f"{prefix}.q_proj", q_size), (f"{prefix}.k_proj", kv_size), (f"{prefix}.v_proj", kv_size)],
            config.qkv_bias,
            dtype,
        )
        self.o_proj = Linear(config.num_attention_heads * d, [(f"{prefix}.o_proj", config.hidden_size)], config.o_proj_bias, dtype,
                             in_shard=q_rows if tp.size > 1 else None, tp=tp)
        self.rotary = rotary  # shared by all layers
        self.scale = self.head_dim**-0.5
        self.split = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta, cache: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k are adjacent columns: rotate them as one (T, H + Hkv, D) tensor
        qk = qkv[:, : self.split[0] + self.split[1]].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, qk)[0].split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.split[0] + self.split[1] :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.attention(self, q, k, v, cache, meta)  # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__(config, dtype, tp)
        rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions, interleaved=False, dtype=dtype)
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = LlamaAttention(config, f"{prefix}.self_attn", rotary, dtype, tp)
            mlp = MLP(config.hidden_size, config.intermediate_size, f"{prefix}.mlp", dtype, tp)
            self.layers.append(DecoderLayer(config, i, attn, mlp, dtype))
        kv_heads = kv_heads_of_rank(config.num_key_value_heads, tp)
        self.kv_cache_entry_shape = (2, kv_heads.stop - kv_heads.start, config.head_dim)
