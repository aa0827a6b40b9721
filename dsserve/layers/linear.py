"""Linear layers whose parameters know which checkpoint tensors fill them (merged q/k/v, gate/up, expert stacks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Selector = tuple  # index into a parameter: () whole, (slice,) rows, (expert, slice) one expert's rows


def bind(param: nn.Parameter, checkpoint_name: str, selector: Selector = ()) -> nn.Parameter:
    """Record that `checkpoint_name` fills `param[selector]`; the model's loader reads these records."""
    if not hasattr(param, "sources"):
        param.sources = []
    param.sources.append((checkpoint_name, selector))
    return param


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Parameters are filled from the checkpoint: no random init (it costs minutes on large models).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). `parts` names the checkpoint tensors stacked along the output rows, in order."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool, dtype: torch.dtype):
        super().__init__()
        out_features = sum(size for _, size in parts)
        self.weight = empty_param(out_features, in_features, dtype=dtype)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None
        offset = 0
        for prefix, size in parts:
            rows = slice(offset, offset + size)
            bind(self.weight, f"{prefix}.weight", (rows,))
            if self.bias is not None:
                bind(self.bias, f"{prefix}.bias", (rows,))
            offset += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(
            hidden_size, [(f"{prefix}.gate_proj", intermediate_size), (f"{prefix}.up_proj", intermediate_size)], False, dtype
        )
        self.down_proj = Linear(intermediate_size, [(f"{prefix}.down_proj", hidden_size)], False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, name: str, dtype: torch.dtype):
        super().__init__()
        self.weight = bind(empty_param(vocab_size, hidden_size, dtype=dtype), name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
