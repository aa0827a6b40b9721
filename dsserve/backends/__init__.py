"""Kernel backends, picked once per process by the runner: `select(name, device, weight_dtype)`.

`torch` (backends/torch.py) is the plain-torch reference; `cpu` (backends/cpu/) adds packed weights, dsserve's C
kernels and fused decode steps. The interface is backends/base.py's `Backend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsserve.backends.base import Backend
from dsserve.errors import ConfigError

if TYPE_CHECKING:
    import torch
# (no runtime `import torch` here: it would shadow the submodule dsserve.backends.torch)

NAMES = ("cpu", "torch")


def select(name: str, device: torch.device, weight_dtype: torch.dtype | None = None,
           quantization: str | None = None) -> Backend:
    """The backend `name` for `device` ("cpu" needs a CPU device; `weight_dtype`: how it packs linear weights,
    float32 by default; `quantization`: a formats/quantization.py scheme: dsserve's kernels on "cpu", the plain-torch
    reference products on "torch", any device)."""
    if name == "torch":
        from dsserve.backends.torch import TorchBackend

        return TorchBackend(device, quantization)
    if name == "cpu":
        if device.type != "cpu":
            raise ConfigError(f"the cpu backend runs on a CPU device, not {device}; use --backend torch")
        from dsserve.backends.cpu.backend import CpuBackend

        return CpuBackend(quantization=quantization) if weight_dtype is None else CpuBackend(weight_dtype, quantization)
    raise ConfigError(f"--backend {name!r} is not one of {', '.join(NAMES)}")
