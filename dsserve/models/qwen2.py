"""Qwen2 (the R1-Distill-Qwen models): Llama's layout with a bias on the q/k/v projections (ModelConfig.qkv_bias)."""

from __future__ import annotations

from dsserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Identical maths to Llama once `qkv_bias` is set; `sliding_window` is off in every R1-Distill config."""
