"""Weight-only quantization formats (`--quantization`): the schemes, quantizing a float weight, and the plain-torch
dequantization every quantized kernel is tested against.

int8: one float32 scale per output row, q in [-127, 127] (W8A16, as vLLM's and llama.cpp's Q8_0 idea, per channel).
int4: one float16 scale per group of `group_size` inputs of a row, q in [0, 15]; symmetric (q - 8) or with a uint8
zero point per group (AWQ / GPTQ's asymmetric form). w = (q - z) * scale. Activations stay float32 in both.
w8a8: int8's weights, and each row of activations quantized on the fly to int8 with one float32 scale per row
(max |x| / 127, symmetric); the product is summed in int32 and scaled by both scales (`reference_linear`).
fp8: float8 e4m3 values with float32 scales: one per block of 128 x 128 (DeepSeek-V3/R1's own checkpoint format, whose
`weight_scale_inv` is this scale; what `quantize_fp8` makes), or one per output row per 128 inputs (what a merged
gate/up or a per-channel scaled checkpoint needs): w = float(q) * scale[n / rows_per_scale, k / 128]. The kernels
read x in float32 for one row and rounded to bf16 for several (`reference_linear` defines both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dsserve.errors import ConfigError

_FP16_MAX = 65504.0
_CHUNK_VALUES = 1 << 24
INT4_GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = 128  # rows and columns per fp8 scale
FP8_MAX = 448.0  # largest finite float8 e4m3fn
QUANTIZATION_FORMS = ("int8", "w8a8", "fp8", "int4", "int4-g64", "int4-g128", "int4-zp", "int4-g64-zp", "int4-g128-zp")
_NAME = re.compile(r"^int4(?:-g(?P<group>\d+))?(?P<zp>-zp)?$")


@dataclass(frozen=True)
class QuantScheme:
    """How linear weights are quantized."""

    bits: int  # 8 or 4
    group_size: int | None = None  # int4: inputs per scale (32, 64, 128); int8: None (one scale per output row)
    zero_point: bool = False  # int4: a zero point per group (asymmetric); else symmetric around 8
    activations: bool = False  # w8a8: activations quantized per row to int8 too (int8 weights only)
    float8: bool = False  # fp8: e4m3 values, float32 scales per 128 x 128 block

    @classmethod
    def parse(cls, name: str) -> "QuantScheme":
        """'int8', 'w8a8', 'fp8', 'int4' (group 32, symmetric), 'int4-g64', 'int4-g128', the int4 forms with '-zp'
        (zero points)."""
        if name == "int8":
            return cls(8)
        if name == "w8a8":
            return cls(8, activations=True)
        if name == "fp8":
            return cls(8, float8=True)
        match = _NAME.match(name)
        group = int(match.group("group") or 32) if match else None
        if group not in INT4_GROUP_SIZES:
            raise ConfigError(f"--quantization {name!r} is not supported: the forms are {', '.join(QUANTIZATION_FORMS)}"
                              " (docs/quantization.md)")
        return cls(4, group, bool(match.group("zp")))

    @property
    def name(self) -> str:
        if self.float8:
            return "fp8"
        if self.bits == 8:
            return "w8a8" if self.activations else "int8"
        return "int4" + (f"-g{self.group_size}" if self.group_size != 32 else "") + ("-zp" if self.zero_point else "")

    @property
    def head(self) -> "QuantScheme":
        """The LM head's form under this scheme: w8a8's own (int8 tiles at every batch size), int8 per row for the
        others (the logits are the product most sensitive to weight error; llama.cpp's Q4_K_M keeps its output
        matrix at 6 bits for the same reason)."""
        return self if self.activations else QuantScheme(8)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """`weight` (N, K) quantized, rows a chunk at a time (a big weight's float temporaries stay ~64 MB)."""
        step = max(1, _CHUNK_VALUES // max(1, weight.shape[1]))
        if self.float8:  # chunks of whole 128-row blocks
            step = -(-step // FP8_BLOCK) * FP8_BLOCK
        parts = [quantize_fp8(weight[i : i + step]) if self.float8 else
                 quantize_int8(weight[i : i + step], self) if self.bits == 8 else
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
    q: torch.Tensor  # int8 / w8a8: int8 (N, K); int4: uint8 (N, groups * group_size) values 0..15, columns past K
    #                  zero; fp8: float8_e4m3fn (N, K)
    scales: torch.Tensor  # int8 / w8a8: float32 (N,); int4: float16 (N, groups); fp8: float32 (ceil(N/128), ceil(K/128))
    #                       (128 x 128 blocks) or (N, ceil(K/128)) (a scale per row per 128 inputs)
    zeros: torch.Tensor | None  # int4 with zero points: uint8 (N, groups); else None
    in_features: int

    def __post_init__(self):
        if self.scheme.float8:
            rows, cols = self.q.shape
            blocks = -(-cols // FP8_BLOCK)
            if self.scales.dim() != 2 or self.scales.shape[1] != blocks or \
                    self.scales.shape[0] not in (rows, -(-rows // FP8_BLOCK)):
                raise ValueError(f"an fp8 ({rows}, {cols}) weight takes scales of shape ({-(-rows // FP8_BLOCK)}, "
                                 f"{blocks}) (128 x 128 blocks) or ({rows}, {blocks}) (per row per 128 inputs), "
                                 f"got {tuple(self.scales.shape)}")

    @property
    def shape(self) -> torch.Size:
        """(N, K) of the float weight."""
        return torch.Size((self.q.shape[0], self.in_features))

    def row_scales(self) -> torch.Tensor:
        """The scales with one entry per output row: int8 (N,), int4 (N, groups), fp8 float32 (N, ceil(K / 128))
        (a 128 x 128 block's scale repeated over its rows)."""
        rows = self.q.shape[0]
        if not self.scheme.float8:
            return self.scales
        if self.scales.shape[0] == rows:
            return self.scales.float()
        return self.scales.float().repeat_interleave(FP8_BLOCK, 0)[:rows]

    def select_rows(self, rows: slice) -> QuantizedWeight:
        """The weight of the output rows `rows` alone (its scales per row)."""
        return QuantizedWeight(self.scheme, self.q[rows], self.row_scales()[rows],
                               None if self.zeros is None else self.zeros[rows], self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight: the plain-torch twin of every weight-only quantized kernel (w8a8's kernels
        also quantize the activations: `reference_linear`)."""
        if self.scheme.float8:
            return self.q.float() * self.row_scales().repeat_interleave(FP8_BLOCK, 1)[:, : self.q.shape[1]]
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


def reference_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float @ W^T (+ bias) as the quantized kernels compute it, in plain torch: the twin each kernel is
    tested against. Weight-only forms: F.linear on the dequantized weight. w8a8: each row of x quantized to int8
    (`quantize_activations`), the integer products summed exactly (float64 holds int8 x int8 sums of any real K
    exactly), then scaled by the row's and the weight row's scales. fp8: for each block of 128 inputs the fp32 sum
    of x times the e4m3 values (exact in bf16), times the row's scale for that block, summed over the blocks; x
    as it is for one row (the GEMV), rounded to bf16 for several (the AMX tiles)."""
    if weight.scheme.float8:
        return _fp8_linear(x, weight, bias)
    if not weight.scheme.activations:
        return torch.nn.functional.linear(x.float(), weight.dequantize(), None if bias is None else bias.float())
    xq, x_scales = quantize_activations(x.float())
    sums = xq.double() @ weight.q.double().t()
    y = (sums * x_scales.double().unsqueeze(-1) * weight.scales.double()).float()
    return y if bias is None else y + bias.float()


def _fp8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).float()
    if rows.shape[0] > 1:
        rows = rows.bfloat16().float()
    q, scales = weight.q.float(), weight.row_scales()  # (N, K), (N, blocks)
    y = torch.zeros(rows.shape[0], q.shape[0], device=q.device)
    for b in range(scales.shape[1]):
        inputs = slice(b * FP8_BLOCK, (b + 1) * FP8_BLOCK)
        y += (rows[:, inputs] @ q[:, inputs].t()) * scales[:, b]
    y = y.view(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias.float()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w8a8's activations: per row scale = max |x| / 127, q = round(x / scale) in [-127, 127] (round half to even).
    Returns (int8 q, float32 scales of shape x.shape[:-1])."""
    scales = x.abs().amax(dim=-1) / 127.0
    q = torch.round(x / _nonzero(scales).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int8(weight: torch.Tensor, scheme: QuantScheme | None = None) -> QuantizedWeight:
    """Per output row: scale = max |w| / 127, q = round(w / scale). `scheme`: int8 (default) or w8a8."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / _nonzero(scales).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(scheme or QuantScheme(8), q, scales, None, w.shape[1])


def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    """Per block of 128 x 128: scale = max |w| / 448 (float32), q = float8_e4m3fn(w / scale) (round to nearest even),
    as DeepSeek's own FP8 checkpoints hold their weights (`weight_scale_inv` = scale)."""
    w = weight.detach().float()
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = torch.nn.functional.pad(w, (0, bc * FP8_BLOCK - cols, 0, br * FP8_BLOCK - rows))
    blocks = padded.view(br, FP8_BLOCK, bc, FP8_BLOCK)
    scales = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    q = (blocks / _nonzero(scales)[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = q.view(br * FP8_BLOCK, bc * FP8_BLOCK)[:rows, :cols].to(torch.float8_e4m3fn)
    return QuantizedWeight(QuantScheme(8, float8=True), q.contiguous(), scales, None, cols)


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
