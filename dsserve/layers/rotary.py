"""Rotary position embedding: default, linear, llama3 and DeepSeek's YaRN; half-split (NeoX) or interleaved pairs."""

from __future__ import annotations

import math

import torch
from torch import nn

from dsserve.config import RopeConfig


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for positions [0, max_positions); `apply` rotates q and k in place of the given dims."""

    def __init__(self, dim: int, rope: RopeConfig, max_positions: int, interleaved: bool, dtype: torch.dtype):
        super().__init__()
        self.interleaved = interleaved
        inv_freq, scale = _inv_freq(dim, rope)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, dim/2)
        self.register_buffer("cos", (freqs.cos() * scale).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each x is (T, heads, dim), rotated at `positions` (T,). Half-split (NeoX) pairs (i, i + dim/2), or
        interleaved pairs (2i, 2i + 1) whose output is kept as [evens | odds] (as transformers does for DeepSeek)."""
        return self.backend.rotary(self, positions, xs)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_scale(head_dim: int, rope: RopeConfig) -> float:
    """Softmax scale; DeepSeek's YaRN multiplies it by mscale(factor, mscale_all_dim)^2."""
    scale = head_dim**-0.5
    if rope.rope_type == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


def _inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin scale, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or 8192
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope.rope_type == "yarn":
        factor = rope.factor
        old_len = rope.original_max_position_embeddings or 4096
        if rope.mscale and rope.mscale_all_dim:
            scale = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            scale = yarn_mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(rope.beta_fast)), 0)
        high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency, 0: divide by factor
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, scale
    return inv_freq, 1.0
