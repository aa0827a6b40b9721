"""The interface every backend implements: what the runner calls once per process and per step, and the ops the
layers call through the backend they are bound to.

A layer never imports a backend. `prepare(model)` binds the backend to every module of the model (`module.backend`),
and the layers' forward passes call its ops with themselves as the first argument (`self.backend.linear(self, x)`),
so that a backend can keep per-layer state (a packed weight, a fused decoder's view of the layer) keyed by the layer
without the layer knowing what it is. The torch backend (backends/torch.py) is the plain reference every other
backend's op is tested against; the CPU backend (backends/cpu/) overrides the ops its C kernels serve and falls back
to the reference for the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Backend(ABC):
    """One per process, picked by the runner (`dsserve.backends.select`)."""

    name: str = ""

    # ---- the runner's side ----------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self, model: nn.Module) -> None:
        """After the model is built, before its weights load: bind to the model's modules."""

    def module_loaded(self, module: nn.Module) -> None:
        """Each module as soon as its own weights are loaded (the loader calls it): a backend may move them into
        its own layout now, so that loading never holds the whole model twice."""

    def weights_loaded(self, model: nn.Module) -> None:
        """Every weight is in, before the KV cache is sized."""

    def set_kv_caches(self, model: nn.Module, kv_caches: list[torch.Tensor]) -> None:
        """After the KV cache is allocated: whatever depends on it (the CPU backend's fused decoders)."""

    @abstractmethod
    def attention_metadata(self, query_lens: torch.Tensor, starts: torch.Tensor, tables: torch.Tensor,
                           positions: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                           device: torch.device) -> Any:
        """What this backend's attention needs to know about a step (its own type): built once per step on CPU
        tensors (query_lens, starts (B,), tables (B, max_blocks), the tokens' positions and cache slots (T,)) and
        passed to every attention layer."""

    def forward(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """The model's final hidden states (T, D) for one step."""
        return model(input_ids, positions, meta, kv_caches)

    def describe(self) -> str:
        """One line for the log: which paths this backend runs on this machine."""
        return self.name

    # ---- the layers' side: each op takes the calling layer first --------------------------------------------------

    @abstractmethod
    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of an embedding table (`layer.weight`), in the table's compute dtype."""

    @abstractmethod
    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b) for a layer with `weight` (N, K) and `bias` (N,) or None; this rank's part, not reduced."""

    @abstractmethod
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(N, 2 I) -> silu(gate) * up (N, I)."""

    def gated_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU's first half: silu(gate) * up of the gate_up Linear `layer` (gate rows, then up rows), (N, I).
        A backend whose kernel applies the activation to the product as it leaves overrides it; the result is read
        once, by down_proj, and may be a buffer the backend reuses at the next call."""
        return self.silu_and_mul(self.linear(layer, x))

    @abstractmethod
    def rms_norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + layer.eps) * layer.weight, in float32 as transformers computes it."""

    @abstractmethod
    def rotary(self, layer: nn.Module, positions: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each x (T, heads, dim) rotated by layer.cos / layer.sin at `positions` (layers/rotary.py: the layouts)."""

    @abstractmethod
    def route(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A MoE router: x (T, D) -> weights (T, k) float32 and expert ids (T, k)."""

    @abstractmethod
    def experts(self, layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts this rank holds: x (T, D), weights / ids (T, k) -> (T, D), this rank's partial sum."""

    @abstractmethod
    def attention(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                  meta: Any) -> torch.Tensor:
        """MHA / GQA over the paged cache, this step's k and v stored first: q (T, H, D), k, v (T, Hkv, D),
        cache (blocks, block_size, 2, Hkv, D), scale `layer.scale`. Returns (T, H, D)."""

    @abstractmethod
    def mla_attention(self, layer: nn.Module, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                      k_pe: torch.Tensor, cache: torch.Tensor, meta: Any) -> torch.Tensor:
        """MLA over a cache of normalized latents + rope keys, the step's entries stored first: q_nope (T, H, N),
        q_pe (T, H, R), latent (T, C), k_pe (T, R); the up-projection is `layer.kv_b_proj.weight` (H * (N + V), C),
        the scale `layer.scale`. Returns (T, H, V)."""
