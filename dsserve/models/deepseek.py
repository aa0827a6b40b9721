"""DeepSeek V2 / V2-Lite / V3 / R1: MLA attention over a latent cache, YaRN rotary, DeepSeekMoE. Reads top to bottom."""

from __future__ import annotations

import torch
from torch import nn

from dsserve.config import ModelConfig
from dsserve.layers.linear import MLP, Linear
from dsserve.layers.moe import DeepseekMoE
from dsserve.layers.norm import RMSNorm
from dsserve.layers.parallel import SINGLE, TensorParallel
from dsserve.layers.rotary import RotaryEmbedding, attention_scale
from dsserve.models.base import CausalLM, DecoderLayer


class MultiHeadLatentAttention(nn.Module):
    """q = q_b(norm(q_a(x))) or q_proj(x); the cache holds norm(c_kv) (kv_lora_rank) + rope(k_pe) (qk_rope_head_dim).

    Tensor parallel: the heads are split (q_b / q_proj and kv_b column-parallel by head, o_proj row-parallel);
    the low-rank down-projections (q_a, kv_a) are small and replicated, and so is the latent cache: every
    rank keeps the whole 576-value entry and attends with its own heads.
    """

    def __init__(self, config: ModelConfig, prefix: str, rotary: RotaryEmbedding, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        c = config
        heads = tp.shard(c.num_attention_heads, "num_attention_heads")
        self.num_heads = heads.stop - heads.start
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank

        def by_head(name: str, per_head: int) -> list:
            rows = (f"{prefix}.{name}", self.num_heads * per_head)
            return [(*rows, slice(heads.start * per_head, heads.stop * per_head))] if tp.size > 1 else [rows]

        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, by_head("q_proj", c.qk_head_dim), False, dtype)
        else:
            self.q_a_proj = Linear(c.hidden_size, [(f"{prefix}.q_a_proj", c.q_lora_rank)], c.qkv_bias, dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6, f"{prefix}.q_a_layernorm.weight", dtype)
            self.q_b_proj = Linear(c.q_lora_rank, by_head("q_b_proj", c.qk_head_dim), False, dtype)
        self.kv_a_proj_with_mqa = Linear(
            c.hidden_size, [(f"{prefix}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim)], c.qkv_bias, dtype
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6, f"{prefix}.kv_a_layernorm.weight", dtype)
        # attention reads its weight itself: absorbed into q for decode, expanding the latents for prompts
        self.kv_b_proj = Linear(c.kv_lora_rank, by_head("kv_b_proj", c.qk_nope_head_dim + c.v_head_dim), False, dtype)
        self.kv_b_proj.accepts_input_order = False  # attention reads its weight itself
        v_cols = slice(heads.start * c.v_head_dim, heads.stop * c.v_head_dim)
        self.o_proj = Linear(c.num_attention_heads * c.v_head_dim, [(f"{prefix}.o_proj", c.hidden_size)], c.qkv_bias,
                             dtype, in_shard=v_cols if tp.size > 1 else None, tp=tp)
        self.rotary = rotary  # shared by all layers; rotates only the qk_rope_head_dim dims
        self.scale = attention_scale(c.qk_head_dim, c.rope)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta, cache: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (T, C)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.unsqueeze(1))  # k_pe: one head shared by all heads
        out = self.backend.mla_attention(self, q_nope, q_pe, latent, k_pe.squeeze(1), cache, meta)  # (T, H, V)
        return self.o_proj(out.reshape(num_tokens, -1))


class DeepseekForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__(config, dtype, tp)
        self.kv_cache_entry_shape = (config.kv_lora_rank + config.qk_rope_head_dim,)
        rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope, max_positions, config.rope_interleave, dtype)
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = MultiHeadLatentAttention(config, f"{prefix}.self_attn", rotary, dtype, tp)
            if config.is_moe_layer(i):
                mlp = DeepseekMoE(config, f"{prefix}.mlp", dtype, tp)
            else:
                mlp = MLP(config.hidden_size, config.intermediate_size, f"{prefix}.mlp", dtype, tp)
            self.layers.append(DecoderLayer(config, i, attn, mlp, dtype))
