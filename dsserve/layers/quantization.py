"""Weight-only quantization formats (`--quantization`): the schemes, quantizing a float weight, and the plain-torch
dequantization every quantized kernel is tested against.

int8: one float32 scale per output row, q in [-127, 127] (W8A16, as vLLM's and llama.cpp's Q8_0 idea, per channel).
int4: one float16 scale per group of `group_size` inputs of a row, q in [0, 15]; symmetric (q - 8) or with a uint8
zero point per group (AWQ / GPTQ's asymmetric form). w = (q - z) * scale. Activations stay float32 in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dsserve.errors import ConfigError

_FP16_MAX = 65504.0
_CHUNK_VALUES = 1 << 24
INT4_GROUP_SIZES = (32, 64, 128)
QUANTIZATION_FORMS = ("int8", "int4", "int4-g64", "int4-g128", "int4-zp", "int4-g64-zp", "int4-g128-zp")
_NAME = re.compile(r"^int4(?:-g(?P<group>\d+))?(?P<zp>-zp)?$")


@dataclass(frozen=True)
class QuantScheme:
    """How linear weights are quantized."""

    bits: int  # 8 or 4
    group_size: int | None = None  # int4: inputs per scale (32, 64, 128); int8: None (one scale per output row)
    zero_point: bool = False  # int4: a zero point per group (asymmetric); else symmetric around 8

    @classmethod
    def parse(cls, name: str) -> "QuantScheme":
        """'int8', 'int4' (group 32, symmetric), 'int4-g64', 'int4-g128', any of these with '-zp' (zero points)."""
        if name == "int8":
            return cls(8)
        match = _NAME.match(name)
        group = int(match.group("group") or 32) if match else None
        if group not in INT4_GROUP_SIZES:
            raise ConfigError(f"--quantization {name!r} is not supported: the forms are {', '.join(QUANTIZATION_FORMS)}"
                              " (w8a8 and fp8 are not implemented yet; docs/quantization.md)")
        return cls(4, group, bool(match.group("zp")))

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return "int4" + (f"-g{self.group_size}" if self.group_size != 32 else "") + ("-zp" if self.zero_point else "")

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """`weight` (N, K) quantized, rows a chunk at a time (a big weight's float temporaries stay ~64 MB)."""
        step = max(1, _CHUNK_VALUES // max(1, weight.shape[1]))
        parts = [quantize_int8(weight[i : i + step]) if self.bits == 8 else
                 quantize_int4(weight[i : i + step], self.group_size, self.zero_point)
                 for i in range(0, weight.shape[0], step)]
        if len(parts) == 1:
            return parts[0]
        zeros = torch.cat([p.zeros for p in parts]) if self.zero_point else None
        return QuantizedWeight(self, torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                               weight.shape[1])


@dataclass
class QuantizedWeight:
    """A (N, K) weight as integers and scales (the layout the formats above describe, row-major, not packed)."""

    scheme: QuantScheme
    q: torch.Tensor  # int8 (N, K); int4: uint8 (N, groups * group_size) values 0..15, columns past K zero
    scales: torch.Tensor  # int8: float32 (N,); int4: float16 (N, groups)
    zeros: torch.Tensor | None  # int4 with zero points: uint8 (N, groups); else None
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight the kernels compute with: the plain-torch twin of every quantized kernel."""
        if self.scheme.bits == 8:
            return self.q.float() * self.scales.float().unsqueeze(1)
        group = self.scheme.group_size
        zeros = self.zeros.float() if self.zeros is not None else torch.full_like(self.scales, 8, dtype=torch.float32)
        rows, padded = self.q.shape
        q = self.q.float().view(rows, padded // group, group)
        w = (q - zeros.unsqueeze(2)) * self.scales.float().unsqueeze(2)
        return w.view(rows, padded)[:, : self.in_features].contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes held: int4 values two per byte."""
        values = self.q.numel() // 2 if self.scheme.bits == 4 else self.q.numel()
        return values + self.scales.nbytes + (self.zeros.nbytes if self.zeros is not None else 0)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Per output row: scale = max |w| / 127, q = round(w / scale)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / _nonzero(scales).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(QuantScheme(8), q, scales, None, w.shape[1])


def quantize_int4(weight: torch.Tensor, group_size: int, zero_point: bool) -> QuantizedWeight:
    """Per group of `group_size` inputs of a row (the last group of a K that is not a multiple is zero-padded).
    Symmetric: scale = max |w| / 7 rounded to float16, q = round(w / scale) + 8 clamped to [0, 15]. With zero points:
    scale = (max - min) / 15, z = round(-min / scale), q = round(w / scale) + z, clamped. The scale is rounded to
    float16 before q is computed, so q fits the stored scale."""
    w = weight.detach().float()
    rows, cols = w.shape
    groups = -(-cols // group_size)
    if groups * group_size != cols:
        w = torch.nn.functional.pad(w, (0, groups * group_size - cols))
    w = w.view(rows, groups, group_size)
    if zero_point:
        low, high = w.amin(dim=2), w.amax(dim=2)
        scales = _to_fp16_scale((high - low) / 15.0, weight.shape)
        zeros = torch.round(-low / _nonzero(scales.float())).clamp_(0, 15)
        q = torch.round(w / _nonzero(scales.float()).unsqueeze(2)) + zeros.unsqueeze(2)
        zeros = zeros.to(torch.uint8)
    else:
        scales = _to_fp16_scale(w.abs().amax(dim=2) / 7.0, weight.shape)
        q = torch.round(w / _nonzero(scales.float()).unsqueeze(2)) + 8
        zeros = None
    q = q.clamp_(0, 15).to(torch.uint8).view(rows, groups * group_size)
    if groups * group_size != cols:
        q[:, cols:] = 0
    return QuantizedWeight(QuantScheme(4, group_size, zero_point), q, scales, zeros, cols)


def _to_fp16_scale(scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if scales.amax().item() > _FP16_MAX:
        raise ValueError(f"a {tuple(shape)} weight's int4 scale exceeds float16's range (weights beyond ~4.5e5)")
    return scales.half()


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """The scales to divide by: an all-zero row or group (scale 0) quantizes to q = 0 (or its zero point)."""
    return torch.where(scales == 0, torch.ones_like(scales), scales)
