"""Pre-quantized checkpoint formats: which one a config.json `quantization_config` names, which tensors make up one
quantized linear, and how they become the QuantizedWeight the CPU kernels hold (`quantization.py`).

- compressed-tensors `pack-quantized` int4 (group 32 / 64 / 128, symmetric or with zero points, actorder) -> int4;
  `pack-quantized` int8 per channel -> int8; `int-quantized` / `naive-quantized` int8 per channel with dynamic
  per-token int8 activations -> w8a8 (without activations -> int8); `float-quantized` -> left to the FP8 path.
- AWQ (GEMM packing, 4 bits, zero points, group 32 / 64 / 128) -> int4 with zero points.
- GPTQ 4 bits (group 32 / 64 / 128, sym or not, desc_act) -> int4; 8 bits per channel, sym -> int8.
- SGLang's `w8a8_int8` (int8 weight, float32 scale per output row) -> w8a8.
The table, the layouts and what is refused: docs/quantization.md "Checkpoint formats".

A linear is quantized when its marker tensor is there (`weight_packed`, `weight_scale` or `qweight`); the rest of a
checkpoint (embeddings, norms, routers, the layers a format's ignore list names) holds plain `.weight` tensors, read
as without quantization. A bias stays `.bias` beside the quantized tensors.

Tensor parallelism (the slicing `slice_tensors` applies to the tensors of one linear before `convert`):
- Column-parallel (a slice of output rows n0:n1): compressed-tensors `weight_packed`, `weight_scale`, int8 `weight`
  rows n0:n1 and `weight_shape` [n1 - n0, K]; its packed `weight_zero_point` holds 8 rows per int32 along dim 0, so
  n0 and n1 must be multiples of 8. AWQ `qweight`, `qzeros` (8 outputs per int32 along dim 1) columns n0/8:n1/8 and
  `scales` columns n0:n1. GPTQ `qweight` and `scales` columns n0:n1, `qzeros` columns n0/pf:n1/pf (pf = 32 / bits).
  Scales are per output row, so a slice converts to the same values as the whole.
- Row-parallel (a slice of inputs k0:k1): k0 and k1 must be multiples of the group size (8 bits: of 4, per int32),
  so each rank holds whole groups: compressed-tensors `weight_packed` columns k0/8:k1/8 (4 bits), `weight_scale` and
  `weight_zero_point` columns k0/g:k1/g; AWQ `qweight` rows k0:k1, `qzeros` and `scales` rows k0/g:k1/g; GPTQ
  `qweight` rows k0/pf:k1/pf, `qzeros` / `scales` rows k0/g:k1/g, `g_idx` entries k0:k1 minus k0/g. int8 per-row
  scales cover the whole row, so a row-parallel int8 slice keeps them as they are.
- desc_act / actorder group (a `g_idx` that is not k // g): the groups are spread over the inputs, so a slice of
  inputs does not hold whole groups; such a linear can only be split column-parallel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsserve.errors import ConfigError, WeightsError
from dsserve.formats.quantization import FP8_BLOCK, INT4_GROUP_SIZES, QuantizedWeight, QuantScheme

_FP16_MAX = 65504.0
_AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ packs outputs 0,2,4,6,1,3,5,7 into nibbles 0..7 of an int32
_DOCS = 'docs/quantization.md "Checkpoint formats"'


@dataclass(frozen=True)
class ConvertedLinear:
    """One quantized linear as dsserve holds it."""

    weight: QuantizedWeight  # (N, K) in dsserve's form
    input_order: torch.Tensor | None  # int64 (K,): the layer computes x[..., input_order] @ W^T (GPTQ desc_act); None
    #                                   when the inputs keep their order


@dataclass(frozen=True)
class Fp8Checkpoint:
    """A float8 checkpoint: detected here, read by the loader's FP8 path rather than by a reader in this module."""

    method: str  # "fp8" (DeepSeek's block-scaled) or "compressed-tensors float-quantized"
    quantization_config: dict[str, Any]


class CheckpointFormat(ABC):
    """The reader of one pre-quantized format: which tensors make up a quantized linear, and their conversion."""

    method: str  # the format as config.json names it, for messages
    scheme: QuantScheme  # the dsserve form its linears convert to
    marker: str  # the suffix (in place of `weight`) whose presence marks a linear as quantized
    suffixes: tuple[str, ...]  # every tensor one quantized linear must have
    optional: tuple[str, ...] = ()  # tensors it may have

    def linears(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """Module prefix -> {suffix: full tensor name} for each quantized linear among `names` (tensor names of a
        whole checkpoint); a missing tensor of a quantized linear is a WeightsError naming it."""
        names = set(names)
        found: dict[str, dict[str, str]] = {}
        for name in sorted(names):
            prefix, _, suffix = name.rpartition(".")
            if suffix != self.marker:
                continue
            group = {}
            for part in (*self.suffixes, *self.optional):
                if f"{prefix}.{part}" in names:
                    group[part] = f"{prefix}.{part}"
                elif part in self.suffixes:
                    raise WeightsError(f"{prefix}.{part} is missing: a {self.method} linear has "
                                       f"{', '.join(self.suffixes)}; the checkpoint is incomplete, download it again")
            found[prefix] = group
        return found

    @abstractmethod
    def convert(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> ConvertedLinear:
        """The tensors of one linear (keyed by suffix, e.g. {"qweight": ..., "scales": ...}) -> dsserve's form, with
        the same dequantized values the format's own dequantization gives. `prefix` names the linear in errors."""

    @abstractmethod
    def slice_tensors(self, tensors: Mapping[str, torch.Tensor], parallel: str, start: int, stop: int,
                      prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors of one linear cut to output rows start:stop (`parallel` "column") or inputs start:stop
        ("row"), so that `convert` of the slice is that slice of `convert` of the whole (the module docstring's
        slicing). A boundary inside a packed int32 or a group is a WeightsError naming the linear."""


def detect_format(config: Mapping[str, Any]) -> CheckpointFormat | Fp8Checkpoint | None:
    """The format a config.json (as a dict) declares in `quantization_config`; None without one. A variant dsserve
    does not hold is a ConfigError naming the field and its value."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    if method == "awq":
        return _awq(quant)
    if method == "gptq":
        return _gptq(quant)
    if method == "w8a8_int8":
        scheme = quant.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise _refuse("activation_scheme", scheme, "dsserve's w8a8 quantizes activations per row at run time "
                                                        "(activation_scheme 'dynamic')")
        return ChannelInt8("w8a8_int8", QuantScheme.parse("w8a8"))
    if method == "fp8":
        return Fp8Checkpoint("fp8", dict(quant))
    raise _refuse("quant_method", method, "dsserve reads compressed-tensors, awq, gptq, w8a8_int8 and fp8 checkpoints")


class PackedInt(CheckpointFormat):
    """compressed-tensors `pack-quantized`: values packed 32 / bits to an int32 along the inputs (the first in the
    low bits), stored unsigned (q + 2^(bits-1)); w = (q - zero_point) * scale with q and zero_point signed. Zero
    points (asymmetric only) are packed the same way along the output rows."""

    method = "compressed-tensors pack-quantized"
    marker = "weight_packed"
    suffixes = ("weight_packed", "weight_scale", "weight_shape")
    optional = ("weight_zero_point", "weight_g_idx")

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme

    def convert(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> ConvertedLinear:
        rows, cols = (int(x) for x in tensors["weight_shape"].tolist())
        bits = self.scheme.bits
        packed = _expect(tensors, "weight_packed", prefix, torch.int32, (rows, -(-cols * bits // 32)))
        values = _unpack(packed, bits, dim=1)[:, :cols]  # (N, K) unsigned
        scales = _expect(tensors, "weight_scale", prefix, None, None)
        if bits == 8:
            _check_shape(scales, (rows, 1), f"{prefix}.weight_scale")
            q = (values - 128).to(torch.int8)
            return ConvertedLinear(QuantizedWeight(self.scheme, q, scales.float().view(rows), None, cols), None)
        group = self.scheme.group_size
        groups = -(-cols // group)
        _check_shape(scales, (rows, groups), f"{prefix}.weight_scale")
        zeros = None
        if self.scheme.zero_point:
            packed_zeros = _expect(tensors, "weight_zero_point", prefix, torch.int32, (-(-rows // 8), groups))
            zeros = _unpack(packed_zeros, 4, dim=0)[:rows].to(torch.uint8)  # zero point + 8, as q
        order = _group_order(tensors.get("weight_g_idx"), group, cols, prefix)
        return _int4(self.scheme, values, scales, zeros, order, prefix)

    def slice_tensors(self, tensors, parallel, start, stop, prefix=""):
        rows, cols = (int(x) for x in tensors["weight_shape"].tolist())
        out = dict(tensors)
        per_int = 32 // self.scheme.bits
        if _is_column(parallel):
            _check_bounds(start, stop, rows, 8 if self.scheme.zero_point else 1, prefix, "output rows")
            out["weight_packed"] = tensors["weight_packed"][start:stop]
            out["weight_scale"] = tensors["weight_scale"][start:stop]
            if "weight_zero_point" in tensors:  # eight rows per int32
                out["weight_zero_point"] = tensors["weight_zero_point"][start // 8 : -(-stop // 8)]
            out["weight_shape"] = torch.tensor([stop - start, cols])
            return out
        _row_parallel_check(tensors.get("weight_g_idx"), self.scheme.group_size or cols, cols, prefix)
        unit = per_int if self.scheme.bits == 8 else self.scheme.group_size
        _check_bounds(start, stop, cols, unit, prefix, "inputs")
        out["weight_packed"] = tensors["weight_packed"][:, start // per_int : -(-stop // per_int)]
        if self.scheme.bits == 4:
            groups = slice(start // unit, -(-stop // unit))
            out["weight_scale"] = tensors["weight_scale"][:, groups]
            if "weight_zero_point" in tensors:
                out["weight_zero_point"] = tensors["weight_zero_point"][:, groups]
        out.pop("weight_g_idx", None)  # natural order (checked above): the slice's own is k // group again
        out["weight_shape"] = torch.tensor([rows, stop - start])
        return out


class ChannelInt8(CheckpointFormat):
    """int8 weights with one scale per output row: compressed-tensors `int-quantized` (and `naive-quantized`), and
    SGLang's `w8a8_int8`. w = q * scale[n]."""

    marker = "weight_scale"
    suffixes = ("weight", "weight_scale")

    def __init__(self, method: str, scheme: QuantScheme):
        self.method, self.scheme = method, scheme

    def convert(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> ConvertedLinear:
        q = _expect(tensors, "weight", prefix, torch.int8, None)
        rows, cols = q.shape
        scales = tensors["weight_scale"]
        if scales.numel() != rows or scales.shape[0] != rows:
            raise WeightsError(f"{prefix}.weight_scale has shape {tuple(scales.shape)}; a per-channel scale of a "
                               f"{rows}-row weight is ({rows}, 1); the checkpoint is not per-channel int8")
        weight = QuantizedWeight(self.scheme, q.contiguous(), scales.float().view(rows), None, cols)
        return ConvertedLinear(weight, None)

    def slice_tensors(self, tensors, parallel, start, stop, prefix=""):
        weight, scales = tensors["weight"], tensors["weight_scale"]
        if _is_column(parallel):
            _check_bounds(start, stop, weight.shape[0], 1, prefix, "output rows")
            return {"weight": weight[start:stop], "weight_scale": scales[start:stop]}
        _check_bounds(start, stop, weight.shape[1], 1, prefix, "inputs")
        return {"weight": weight[:, start:stop], "weight_scale": scales}  # a row's scale covers all its inputs


class AwqGemm(CheckpointFormat):
    """AutoAWQ's GEMM layout: qweight int32 (K, N/8), eight outputs per int32 in the order 0,2,4,6,1,3,5,7 from the
    low nibble up; qzeros int32 (K/g, N/8) the same way; scales (K/g, N). w[n, k] = (q - z) * s (no offset)."""

    method = "awq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales")

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme

    def convert(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> ConvertedLinear:
        qweight = _expect(tensors, "qweight", prefix, torch.int32, None)
        cols, rows = qweight.shape[0], qweight.shape[1] * 8
        group = self.scheme.group_size
        if cols % group:
            raise WeightsError(f"{prefix}.qweight has {cols} inputs, not a multiple of group_size {group}; AWQ "
                               "checkpoints hold whole groups: the tensor is not AWQ GEMM-packed")
        qzeros = _expect(tensors, "qzeros", prefix, torch.int32, (cols // group, rows // 8))
        scales = _expect(tensors, "scales", prefix, None, (cols // group, rows))
        values = _awq_unpack(qweight).t()  # (N, K)
        zeros = _awq_unpack(qzeros).t().to(torch.uint8)  # (N, K/g)
        return _int4(self.scheme, values, scales.t(), zeros, None, prefix)

    def slice_tensors(self, tensors, parallel, start, stop, prefix=""):
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        if _is_column(parallel):  # outputs on dim 1, eight per int32
            _check_bounds(start, stop, qweight.shape[1] * 8, 8, prefix, "output rows")
            packed = slice(start // 8, stop // 8)
            return {"qweight": qweight[:, packed], "qzeros": qzeros[:, packed], "scales": scales[:, start:stop]}
        group = self.scheme.group_size
        _check_bounds(start, stop, qweight.shape[0], group, prefix, "inputs")
        groups = slice(start // group, stop // group)
        return {"qweight": qweight[start:stop], "qzeros": qzeros[groups], "scales": scales[groups]}


class Gptq(CheckpointFormat):
    """AutoGPTQ / GPTQModel: qweight int32 (K / pf, N), pf = 32 / bits inputs per int32 from the low bits up; qzeros
    int32 (groups, N / pf) packed the same way along the outputs; scales (groups, N); g_idx (K,) the group of each
    input. w[n, k] = (q - z) * s with s, z those of group g_idx[k]. checkpoint_format `gptq` (v1) stores z - 1,
    `gptq_v2` stores z. With sym true the zero point is 2^(bits-1) and qzeros is not read (as vLLM does)."""

    method = "gptq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales")
    optional = ("g_idx",)

    def __init__(self, scheme: QuantScheme, zero_offset: int):
        self.scheme = scheme
        self.zero_offset = zero_offset  # added to the stored zero point: 1 for v1, 0 for v2

    def convert(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> ConvertedLinear:
        bits = self.scheme.bits
        per_int = 32 // bits
        qweight = _expect(tensors, "qweight", prefix, torch.int32, None)
        cols, rows = qweight.shape[0] * per_int, qweight.shape[1]
        values = _unpack(qweight, bits, dim=0).t()  # (N, K) unsigned
        if bits == 8:
            scales = _expect(tensors, "scales", prefix, None, (1, rows))
            q = (values - 128).to(torch.int8)
            return ConvertedLinear(QuantizedWeight(self.scheme, q.contiguous(), scales.float().view(rows), None, cols),
                                   None)
        group = self.scheme.group_size
        groups = -(-cols // group)
        scales = _expect(tensors, "scales", prefix, None, (groups, rows))
        zeros = None
        if self.scheme.zero_point:
            qzeros = _expect(tensors, "qzeros", prefix, torch.int32, (groups, -(-rows // per_int)))
            zeros = (_unpack(qzeros, bits, dim=1)[:, :rows] + self.zero_offset).t().to(torch.uint8)
        order = _group_order(tensors.get("g_idx"), group, cols, prefix)
        return _int4(self.scheme, values, scales.t(), zeros, order, prefix)

    def slice_tensors(self, tensors, parallel, start, stop, prefix=""):
        per_int = 32 // self.scheme.bits
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        out = dict(tensors)
        if _is_column(parallel):  # outputs on dim 1; qzeros holds 32 / bits of them per int32
            _check_bounds(start, stop, qweight.shape[1], per_int, prefix, "output rows")
            out.update(qweight=qweight[:, start:stop], scales=scales[:, start:stop],
                       qzeros=qzeros[:, start // per_int : -(-stop // per_int)])
            return out
        cols = qweight.shape[0] * per_int
        group = self.scheme.group_size or cols  # 8 bits: one group of all inputs
        _row_parallel_check(tensors.get("g_idx"), group, cols, prefix)
        _check_bounds(start, stop, cols, per_int if self.scheme.bits == 8 else group, prefix, "inputs")
        out["qweight"] = qweight[start // per_int : stop // per_int]
        if self.scheme.bits == 4:
            groups = slice(start // group, -(-stop // group))
            out.update(qzeros=qzeros[groups], scales=scales[groups])
        if "g_idx" in tensors:
            out["g_idx"] = tensors["g_idx"][start:stop] - (start // group if self.scheme.bits == 4 else 0)
        return out


def fp8_block_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     index: tuple) -> QuantizedWeight | None:
    """DeepSeek's FP8 checkpoint tensor (e4m3 `weight` and its float32 `weight_scale_inv` per `block`) as a
    QuantizedWeight of the stored bytes and scales, its `index` slice (the loader's, for tensor parallelism) taken on
    whole 128 x 128 blocks; None where it cannot be kept as is (other block sizes, a slice boundary inside a block:
    the loader dequantizes it instead)."""
    if tuple(block) != (FP8_BLOCK, FP8_BLOCK):
        return None
    q, scales = weight, scale_inv.float()
    for dim, part in enumerate(index):
        start, stop, step = part.indices(q.shape[dim])
        if step != 1 or start % FP8_BLOCK or (stop % FP8_BLOCK and stop != q.shape[dim]):
            return None
        q, scales = q.narrow(dim, start, stop - start), scales.narrow(dim, start // FP8_BLOCK, -(-stop // FP8_BLOCK)
                                                                       - start // FP8_BLOCK)
    try:
        return QuantizedWeight(QuantScheme.parse("fp8"), q.contiguous(), scales.contiguous(), None, q.shape[1])
    except ValueError as e:  # the scales do not fit the weight
        raise WeightsError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
                           f"with 128x128 blocks ({e}); the checkpoint is inconsistent") from e


def checkpoint_reader(quantization_config: Mapping[str, Any] | None) -> CheckpointFormat | None:
    """The reader of a checkpoint's quantized linears where another tool quantized it (config.json's
    `quantization_config`, as ModelConfig keeps it); None without one. DeepSeek's FP8 checkpoints never come here
    (ModelConfig routes them to the loader's FP8 path); a compressed-tensors FP8 one, or a variant no reader holds,
    is a ConfigError naming the field."""
    if not quantization_config:
        return None
    fmt = detect_format({"quantization_config": quantization_config})
    if isinstance(fmt, Fp8Checkpoint):
        raise ConfigError(
            f"config.json quantization_config is {fmt.method}, which dsserve does not load yet: of the FP8 "
            f"checkpoints it loads DeepSeek's block-quantized ones (quant_method 'fp8' with weight_block_size); {_DOCS}"
        )
    return fmt


def convert_slice(reader: CheckpointFormat, prefix: str, tensors: Mapping[str, torch.Tensor],
                  index: tuple) -> QuantizedWeight | ConvertedLinear:
    """One quantized linear's checkpoint tensors -> a tensor-parallel rank's slice (`index`: output rows, then
    inputs, as a model's `checkpoint_slices` gives its `<prefix>.weight`) in dsserve's form: the QuantizedWeight, or
    the ConvertedLinear where the layer must reorder its inputs. `slice_tensors` cuts on the format's packing and
    group boundaries (a WeightsError naming the linear where the slice falls inside them)."""
    for dim, part in enumerate(index):
        if part != slice(None):
            if part.step not in (None, 1):
                raise WeightsError(f"{prefix}: a quantized linear is sliced in whole ranges, not {part}")
            tensors = reader.slice_tensors(tensors, ("column", "row")[dim], part.start, part.stop, prefix)
    converted = reader.convert(tensors, prefix)
    return converted.weight if converted.input_order is None else converted


def _compressed_tensors(quant: Mapping[str, Any]) -> CheckpointFormat | Fp8Checkpoint:
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if quant.get(key):
            raise _refuse(key, quant[key], "dsserve reads dense weights and keeps its KV cache in the model's dtype")
    groups = quant.get("config_groups") or {}
    if not groups:
        raise ConfigError("quantization_config.config_groups is empty; a compressed-tensors config names at least "
                          "one group of weights (the checkpoint's config.json is incomplete)")
    name, group = next(iter(groups.items()))
    for other, scheme in groups.items():
        if (scheme.get("weights"), scheme.get("input_activations")) != (group.get("weights"),
                                                                          group.get("input_activations")):
            raise _refuse(f"config_groups.{other}", scheme, f"its scheme differs from config_groups.{name}'s; dsserve "
                                                            "holds one form per checkpoint")
    field = f"config_groups.{name}"
    weights = group.get("weights") or {}
    activations = group.get("input_activations")
    fmt = group.get("format") or quant.get("format")
    if weights.get("type") == "float" or fmt == "float-quantized":
        return Fp8Checkpoint("compressed-tensors float-quantized", dict(quant))
    if group.get("output_activations"):
        raise _refuse(f"{field}.output_activations", group["output_activations"], "dsserve keeps outputs in float")
    if weights.get("type", "int") != "int":
        raise _refuse(f"{field}.weights.type", weights.get("type"), "dsserve reads int and float weights")
    if weights.get("dynamic"):
        raise _refuse(f"{field}.weights.dynamic", weights["dynamic"], "weights must be stored quantized")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    symmetric = weights.get("symmetric", True)
    if fmt == "pack-quantized":
        if activations:
            raise _refuse(f"{field}.input_activations", activations, "pack-quantized is weight-only in dsserve")
        if bits == 8:
            _need(f"{field}.weights.strategy", strategy, ("channel",), "8-bit weights have one scale per output row")
            _need(f"{field}.weights.symmetric", symmetric, (True,), "dsserve's int8 has no zero points")
            return PackedInt(QuantScheme.parse("int8"))
        _need(f"{field}.weights.num_bits", bits, (4, 8), "dsserve holds 4-bit (grouped) and 8-bit weights")
        _need(f"{field}.weights.strategy", strategy, ("group",), "dsserve's int4 has one scale per group of inputs")
        _need(f"{field}.weights.group_size", weights.get("group_size"), INT4_GROUP_SIZES, "dsserve's int4 groups")
        _need(f"{field}.weights.actorder", weights.get("actorder"), (None, False, "weight", "group", True),
              "the orders are weight and group")
        return PackedInt(QuantScheme(4, weights["group_size"], not symmetric))
    if fmt in ("int-quantized", "naive-quantized"):
        _need(f"{field}.weights.num_bits", bits, (8,), "int-quantized weights dsserve holds are int8")
        _need(f"{field}.weights.strategy", strategy, ("channel",), "dsserve's int8 has one scale per output row")
        _need(f"{field}.weights.symmetric", symmetric, (True,), "dsserve's int8 has no zero points")
        if not activations:
            return ChannelInt8(f"compressed-tensors {fmt}", QuantScheme.parse("int8"))
        act = f"{field}.input_activations"
        _need(f"{act}.type", activations.get("type", "int"), ("int",), "dsserve's w8a8 activations are int8")
        _need(f"{act}.num_bits", activations.get("num_bits"), (8,), "dsserve's w8a8 activations are int8")
        _need(f"{act}.strategy", activations.get("strategy"), ("token",), "dsserve's w8a8 scales each row (token)")
        _need(f"{act}.dynamic", activations.get("dynamic"), (True,), "dsserve's w8a8 quantizes activations at run time")
        _need(f"{act}.symmetric", activations.get("symmetric", True), (True,),
              "dsserve's w8a8 activations are symmetric")
        return ChannelInt8(f"compressed-tensors {fmt}", QuantScheme.parse("w8a8"))
    raise _refuse("format", fmt, "dsserve reads compressed-tensors pack-quantized, int-quantized, naive-quantized "
                                 "and float-quantized checkpoints")


def _awq(quant: Mapping[str, Any]) -> AwqGemm:
    bits = quant.get("bits", quant.get("w_bit"))
    group = quant.get("group_size", quant.get("q_group_size"))
    _need("bits", bits, (4,), "dsserve holds AWQ's 4-bit weights")
    _need("version", str(quant.get("version", "gemm")).lower(), ("gemm",), "dsserve reads AWQ's GEMM packing")
    _need("zero_point", quant.get("zero_point", True), (True,), "dsserve reads AWQ's zero-point form")
    _need("group_size", group, INT4_GROUP_SIZES, "dsserve's int4 groups")
    return AwqGemm(QuantScheme(4, group, True))


def _gptq(quant: Mapping[str, Any]) -> Gptq:
    bits, group, sym = quant.get("bits"), quant.get("group_size"), quant.get("sym", True)
    if quant.get("dynamic"):
        raise _refuse("dynamic", quant["dynamic"], "dsserve holds one form per checkpoint (no per-module overrides)")
    offsets = {"gptq": 1, "gptq_v2": 0}
    checkpoint_format = quant.get("checkpoint_format", "gptq")
    _need("checkpoint_format", checkpoint_format, tuple(offsets), "dsserve reads GPTQ's own packing (v1 and v2)")
    _need("bits", bits, (4, 8), "dsserve holds 4-bit (grouped) and 8-bit (per row) weights")
    if bits == 8:
        _need("group_size", group, (-1,), "dsserve's int8 has one scale per output row (group_size -1)")
        _need("sym", sym, (True,), "dsserve's int8 has no zero points")
        return Gptq(QuantScheme.parse("int8"), offsets[checkpoint_format])
    _need("group_size", group, INT4_GROUP_SIZES, "dsserve's int4 groups")
    return Gptq(QuantScheme(4, group, not sym), offsets[checkpoint_format])


def _int4(scheme: QuantScheme, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          order: torch.Tensor | None, prefix: str) -> ConvertedLinear:
    """dsserve's int4 QuantizedWeight from unsigned values (N, K), scales (N, groups) and zero points (N, groups)
    or None (symmetric: 8), the inputs first put in `order` (so each group is contiguous)."""
    rows, cols = values.shape
    group = scheme.group_size
    groups = -(-cols // group)
    if order is not None:
        values = values[:, order]
    q = torch.zeros(rows, groups * group, dtype=torch.uint8)  # columns past K stay zero, as quantize_int4 leaves them
    q[:, :cols] = values
    if zeros is not None and zeros.shape != (rows, groups):
        raise WeightsError(f"{prefix}'s zero points have shape {tuple(zeros.shape)}, not ({rows}, {groups})")
    return ConvertedLinear(QuantizedWeight(scheme, q, _fp16_scales(scales, prefix), zeros, cols), order)


def _group_order(g_idx: torch.Tensor | None, group: int, cols: int, prefix: str) -> torch.Tensor | None:
    """The input order that makes each group contiguous, from `g_idx` (the group of each input); None when the
    groups already are (g_idx[k] = k // group, as checkpoints without desc_act / actorder group store it)."""
    if g_idx is None:
        return None
    natural = torch.arange(cols) // group
    g_idx = g_idx.long().view(-1)
    if g_idx.shape == natural.shape and torch.equal(g_idx, natural):
        return None
    groups = natural[-1].item() + 1
    if (g_idx.shape != natural.shape or g_idx.min() < 0 or g_idx.max() >= groups
            or not torch.equal(torch.bincount(g_idx, minlength=groups), torch.bincount(natural))):
        raise WeightsError(f"{prefix} g_idx does not give each of the {groups} groups {group} of the {cols} inputs; "
                           "the checkpoint's g_idx is inconsistent with its group_size")
    return torch.argsort(g_idx, stable=True)


def _is_column(parallel: str) -> bool:
    if parallel not in ("column", "row"):
        raise ValueError(f"parallel must be 'column' or 'row', not {parallel!r}")
    return parallel == "column"


def _check_bounds(start: int, stop: int, total: int, unit: int, prefix: str, what: str) -> None:
    """start:stop must lie in 0..total and fall on multiples of `unit` (stop may also be the end)."""
    if not (0 <= start < stop <= total) or start % unit or (stop % unit and stop != total):
        raise WeightsError(f"{prefix}: cannot take {what} {start}:{stop} of {total}; a slice of this linear's {what} "
                           f"must start and end on multiples of {unit} (the values one scale or one packed int32 "
                           "covers): pick a tensor-parallel size that splits it so")


def _row_parallel_check(g_idx: torch.Tensor | None, group: int, cols: int, prefix: str) -> None:
    if _group_order(g_idx, group, cols, prefix) is not None:
        raise WeightsError(f"{prefix} has desc_act / actorder group (a g_idx that scatters its groups over the "
                           "inputs): a slice of its inputs does not hold whole groups, so it cannot be split "
                           "row-parallel; serve it without tensor parallelism")


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 values holding 32 / bits unsigned fields each, the first in the low bits, unpacked along `dim` ->
    int32 with that dimension 32 / bits times longer."""
    per_int = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 1:
        fields = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # (R, C, per_int)
        return fields.reshape(packed.shape[0], packed.shape[1] * per_int)
    fields = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # (R, per_int, C)
    return fields.reshape(packed.shape[0] * per_int, packed.shape[1])


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's (R, C) int32 -> (R, 8 C) nibbles in column order (undoing its 0,2,4,6,1,3,5,7 interleave)."""
    fields = _unpack(packed, 4, dim=1).view(packed.shape[0], packed.shape[1], 8)
    return fields[:, :, list(_AWQ_REVERSE_ORDER)].reshape(packed.shape[0], packed.shape[1] * 8)


def _fp16_scales(scales: torch.Tensor, prefix: str) -> torch.Tensor:
    """int4 scales as float16 (dsserve's int4 form): float16 scales as they are; bfloat16 ones in float16's normal
    range convert exactly; float32 ones are rounded."""
    if not torch.isfinite(scales).all() or scales.float().abs().max() > _FP16_MAX:
        raise WeightsError(f"{prefix} has int4 scales beyond float16's range (or not finite); dsserve's int4 holds "
                           "float16 scales: this checkpoint cannot be read as int4")
    return scales.to(torch.float16).contiguous()


def _expect(tensors: Mapping[str, torch.Tensor], suffix: str, prefix: str, dtype: torch.dtype | None,
            shape: tuple[int, ...] | None) -> torch.Tensor:
    tensor = tensors[suffix]
    if dtype is not None and tensor.dtype != dtype:
        raise WeightsError(f"{prefix}.{suffix} is {tensor.dtype}, not {dtype}; the checkpoint does not match the "
                           "format its config.json declares")
    if shape is not None:
        _check_shape(tensor, shape, f"{prefix}.{suffix}")
    return tensor


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise WeightsError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from the other tensors "
                           "of its layer and the quantization_config; the checkpoint is inconsistent")


def _need(field: str, value: Any, allowed: tuple, why: str) -> None:
    if value not in allowed:
        raise _refuse(field, value, f"{why} (supported: {', '.join(repr(a) for a in allowed)})")


def _refuse(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"quantization_config.{field}={value!r} is not supported: {why} ({_DOCS})")
