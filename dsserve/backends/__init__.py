"""Kernel backends, picked once per process by the runner: `select(name, device, weight_dtype)`.

`torch` (backends/torch.py) is the plain-torch reference; `cpu` (backends/cpu/) adds packed weights, dsserve's C
kernels and fused decode steps. The interface is backends/base.py's `Backend`.
"""

from __future__ import annotations

import torch

from dsserve.backends.base import Backend
from dsserve.errors import ConfigError

NAMES = ("cpu", "torch")


def select(name: str, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> Backend:
    """The backend `name` for `device` ("cpu" needs a CPU device)."""
    if name == "torch":
        from dsserve.backends.torch import TorchBackend

        return TorchBackend(device)
    if name == "cpu":
        if device.type != "cpu":
            raise ConfigError(f"the cpu backend runs on a CPU device, not {device}; use --backend torch")
        from dsserve.backends.cpu.backend import CpuBackend

        return CpuBackend(weight_dtype)
    raise ConfigError(f"--backend {name!r} is not one of {', '.join(NAMES)}")
