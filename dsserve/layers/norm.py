"""RMSNorm, computed in float32 as transformers does."""

from __future__ import annotations

import torch
from torch import nn

from dsserve.layers.linear import bind, empty_param


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, name: str, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = bind(empty_param(size, dtype=dtype), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight."""
        return self.backend.rms_norm(self, x)
