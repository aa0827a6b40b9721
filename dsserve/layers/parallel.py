"""Tensor / expert parallelism as the layers see it: this rank's index, the group size, two collectives.

The runner creates the process group (dsserve/runner/parallel.py) and hands every layer a `TensorParallel`;
with `size == 1` (the default) every collective is a no-op and every shard is the whole tensor, so the
single-device path is the same code. Shards are even splits: a dimension that does not divide is a
configuration error, raised before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dsserve.errors import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # MoE layers: whole experts per rank instead of a slice of every expert
    group: Any = None  # torch.distributed ProcessGroup; None: the default group

    def shard(self, total: int, what: str) -> slice:
        """This rank's contiguous 1/size of `total` (rows, heads, experts...)."""
        if total % self.size:
            raise ConfigError(
                f"{what} = {total} does not divide by the tensor-parallel size {self.size}; "
                f"choose a --tensor-parallel-size that divides it"
            )
        part = total // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's (N, P) along the last dim on rank 0 (N, P * size); None on the others."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if dist.get_backend(self.group) == "gloo":  # gloo has gather: only rank 0 receives
            parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
            dist.gather(x, parts, dst=0, group=self.group)
            return torch.cat(parts, dim=-1) if parts is not None else None
        # NCCL / HCCL: all_gather_into_tensor is what every device backend implements
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=self.group)
        return torch.cat(out.unbind(0), dim=-1) if self.rank == 0 else None


SINGLE = TensorParallel()
