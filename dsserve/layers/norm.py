"""RMSNorm, computed in float32 as transformers does (one C call on CPU: kernels/elementwise.c)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.layers.linear import bind, empty_param


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, name: str, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = bind(empty_param(size, dtype=dtype), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.fused_ops_usable(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused call, the same products in the same order
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
