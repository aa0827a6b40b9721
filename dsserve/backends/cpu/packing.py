"""Weights packed for the CPU kernels: each linear layer, routed expert and LM head in a kernel's own layout.

float32: oneDNN's reordered weight (`_linear_pointwise`), 1.3-2.3x faster than F.linear at decode sizes.
float16: dsserve's panel-packed fp16 layout (csrc/linear_f16.c, AVX2 + F16C), widened to fp32 inside the kernel:
activations and accumulation stay fp32, half the bytes per decode step; FBGEMM's packed fp16 GEMM where the library
could not be built. bfloat16: csrc/linear_bf16.c's AMX tiles (activations rounded to bf16), else oneDNN's bf16 GEMM.
MLA's kv_b_proj is read by attention itself: its two halves are packed per head in fp16 for the absorbed decode.
int8 / int4 / w8a8 (`--quantization`, formats/quantization.py): every other linear and routed expert quantized as it
is packed, the LM head in int8 or w8a8 (csrc/linear_quant.c, AVX-512; w8a8: csrc/linear_w8a8.c, AMX int8 tiles and
AVX512-VNNI); the fused decoders and moe.c read int8 and int4 panels too (not w8a8's).
fp8 (`--quantization fp8`, or an FP8 checkpoint's weights kept as stored): e4m3 bytes with a scale per row per 128
inputs (csrc/linear_fp8.c, AMX). A pre-quantized checkpoint tensor reaches the packer as the `quantized` staging
of a parameter this packer marked `keeps_quantized` (models/base.py fills it) and is packed as it is.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.backends.cpu import kernels
from dsserve.errors import ConfigError, WeightsError
from dsserve.layers.linear import Linear, VocabParallel
from dsserve.formats.quantization import QuantizedWeight, QuantScheme, reference_linear
from dsserve.layers.moe import ExpertMLP, Experts
from dsserve.models.deepseek import MultiHeadLatentAttention

logger = logging.getLogger(__name__)

_PACK_BATCH_HINT = 64  # the layout oneDNN picks for this M is the fastest here from M = 1 to several hundred
_FP16_MAX = 65504.0


class Kind(enum.Enum):
    F16 = "dsserve fp16"  # csrc/linear_f16.c
    BF16 = "dsserve bf16"  # csrc/linear_bf16.c
    FBGEMM_F16 = "fbgemm fp16"
    ONEDNN_BF16 = "onednn bf16"
    ONEDNN_F32 = "onednn fp32"
    INT8 = "dsserve int8"  # csrc/linear_quant.c
    INT4 = "dsserve int4"
    FP8 = "dsserve fp8"  # csrc/linear_fp8.c
    W8A8 = "dsserve w8a8"  # csrc/linear_w8a8.c

    @property
    def own(self) -> bool:
        """In dsserve's own packing: the fused decoders can read it."""
        return self in (Kind.F16, Kind.BF16)


class PackedLinear:
    """One linear layer's weight (and bias) in a CPU kernel's layout: `packed(x)` = x W^T + b, float32."""

    __slots__ = ("kind", "data", "bias", "out_features")

    def __init__(self, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, weight_dtype: torch.dtype,
                 scheme: QuantScheme | None = None):
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        if scheme is not None and not isinstance(weight, QuantizedWeight):  # quantized here, one weight at a time
            weight = scheme.quantize(weight)
        if isinstance(weight, QuantizedWeight):
            form = weight.scheme
            self.kind = (Kind.FP8 if form.float8 else Kind.W8A8 if form.activations else Kind.INT8 if form.bits == 8
                         else Kind.INT4)
            self.data = kernels.pack_quantized(weight)
        elif weight_dtype == torch.float16 and kernels.linear_f16_usable():
            self.kind, self.data = Kind.F16, kernels.pack_f16(weight)
        elif weight_dtype == torch.float16:
            self.kind = Kind.FBGEMM_F16
            self.data = torch.ops.quantized.linear_prepack_fp16(weight.detach(), self.bias)
        elif weight_dtype == torch.bfloat16 and kernels.linear_bf16_usable():
            self.kind, self.data = Kind.BF16, kernels.pack_bf16(weight)
        elif weight_dtype == torch.bfloat16:
            self.kind = Kind.ONEDNN_BF16
            self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), _PACK_BATCH_HINT)
        else:
            self.kind = Kind.ONEDNN_F32
            self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind is Kind.INT8 or kind is Kind.INT4:
            return kernels.linear_quant(x, self.data, self.out_features, self.bias)
        if kind is Kind.FP8:
            return kernels.linear_fp8(x, self.data, self.out_features, self.bias)
        if kind is Kind.W8A8:
            return kernels.linear_w8a8(x, self.data, self.out_features, self.bias)
        if kind is Kind.F16:
            return kernels.linear_f16(x, self.data, self.out_features, self.bias)
        if kind is Kind.BF16:
            return kernels.linear_bf16(x, self.data, self.out_features, self.bias)
        if kind is Kind.FBGEMM_F16:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.data)
        if kind is Kind.ONEDNN_BF16:
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.data, None, "none", [], "").float()
            return y if self.bias is None else y.add_(self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.data, self.bias, "none", [], "")

    @property
    def fuses_swiglu(self) -> bool:
        """As a gate_up weight (gate rows, then as many up rows), the kernel can apply SwiGLU to its product on the
        way out (`kernels.linear_bf16_swiglu`, `kernels.linear_w8a8_swiglu`): bf16 on AMX or w8a8, no bias, whole
        panels of each half."""
        return (self.kind in (Kind.BF16, Kind.W8A8) and self.bias is None
                and self.out_features % (2 * kernels.PANEL) == 0)

    @property
    def own_data(self) -> torch.Tensor | None:
        """The packed tensor where it is in dsserve's own layout (what a fused decoder reads), else None."""
        return self.data if self.kind.own else None


@dataclass
class Packs:
    """What `pack_model` made, keyed by the layer it belongs to."""

    linears: dict[nn.Module, PackedLinear] = field(default_factory=dict)  # Linear and the LM head
    experts: dict[Experts, list[tuple[PackedLinear, PackedLinear]]] = field(default_factory=dict)  # (w13, w2) each
    expert_tables: dict[Experts, kernels.ExpertTable] = field(default_factory=dict)  # all fp16, bf16 or int8/4: moe.c
    absorbed: dict[MultiHeadLatentAttention, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    embeddings: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # a bf16-exact input embedding, in bf16
    # MLA's kv_b_proj in bf16 for prompt attention's expansion of latents into keys and values (bf16 weights only;
    # its float32 weight stays for the other paths)
    expanders: dict[MultiHeadLatentAttention, PackedLinear] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Matrices packed."""
        return (len(self.linears) + sum(2 * len(pairs) for pairs in self.experts.values())
                + sum(a.shape[0] + b.shape[0] for a, b in self.absorbed.values()) + len(self.expanders))


def resolve_weight_dtype(weight_dtype: torch.dtype) -> torch.dtype | None:
    """The weight dtype packing can honour on this machine (bf16 -> fp16 -> fp32 with a warning each), or None."""
    reason = kernels.packed_weights_unavailable(weight_dtype)
    if reason is not None and weight_dtype == torch.bfloat16:
        logger.warning("bfloat16 weights unavailable (%s): packing float16 weights instead", reason)
        weight_dtype, reason = torch.float16, kernels.packed_weights_unavailable(torch.float16)
    if reason is not None and weight_dtype == torch.float16:
        logger.warning("float16 weights unavailable (%s): packing float32 weights for oneDNN instead", reason)
        weight_dtype, reason = torch.float32, kernels.packed_weights_unavailable(torch.float32)
    if reason is not None:
        logger.warning("weight packing unavailable (%s): linear layers stay on F.linear (slower; correct)", reason)
        return None
    return weight_dtype


class Packer:
    """Packs a model's layers one at a time, each as soon as its weights are loaded (`module_loaded`, called by the
    model's loader), so that loading holds the float32 weights of one layer at a time, not of the whole model.

    Every float32 Linear, every routed expert and the LM head on CPU get a `PackedLinear`; MLA's kv_b_proj keeps its
    weight (attention reads it) and gets the absorbed per-head packing. `weight_dtype` float16 stores fp16 (a layer
    whose weights exceed fp16's range stays float32, logged); float32 oneDNN's layout. The plain weights are dropped
    where nothing else reads them (a tied LM head keeps its weight: the embedding reads it). Each packed layer is
    checked against F.linear on the same (rounded) weight before it is used; a kernel that disagrees or fails stops
    the packing and the remaining layers stay on F.linear (slower, correct).

    With `quantization`, each of those weights is quantized as it is packed (its plain weight then dropped, so
    loading holds one float layer at a time): Linears and routed experts in that scheme, the LM head in
    `scheme.head` (int8 per row, w8a8 under w8a8: formats/quantization.py says why). MLA's kv_b_proj keeps its float weight and packing (attention reads it), and so do the embedding, the
    norms and the routers.

    Pre-quantized checkpoint tensors (an FP8 checkpoint's weights): where a quantized kernel is built, every weight
    above that would be packed (Linears but kv_b_proj, routed experts) gets a `stage_quantized` (`QuantizedStaging`);
    the model's loader hands it each `QuantizedWeight` arriving for that parameter, as stored (models/base.py), and
    the weight is packed from there in its own form, whatever `quantization` says (which still applies to the float
    weights). A form with no kernel here, or a parameter whose parts came partly float, is dequantized and packed as
    a float weight.
    """

    def __init__(self, model: nn.Module, weight_dtype: torch.dtype, quantization: QuantScheme | None = None):
        if quantization is not None:
            _check_kernels(quantization)
        self.packs = Packs()
        self.scheme, self.head_scheme = quantization, quantization.head if quantization is not None else None
        self.weight_dtype = resolve_weight_dtype(weight_dtype)
        if quantization is not None and self.weight_dtype is None:
            raise ConfigError(f"--quantization {quantization.name} needs packed weights, unavailable on this machine "
                              "(the warning above says why); drop --quantization")
        self.failed: PackingFailed | None = None
        self.mla_of = {m.kv_b_proj: m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)}
        self.experts_of = {mlp: (experts, e) for experts in model.modules() if isinstance(experts, Experts)
                           for e, mlp in enumerate(experts.mlps)}  # an expert -> its Experts and local index
        self.expert_pairs: dict[Experts, dict[int, tuple[PackedLinear, PackedLinear]]] = {}
        self.embedding, self.head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
        self.staged: set[int] = set()  # ids of the parameters loaded straight into bf16
        self.freed_bytes = 0  # plain weights dropped after packing (the backend returns the heap's pages now and then)
        if self.weight_dtype == torch.bfloat16:
            self._stage_in_bf16(model)
        if self.weight_dtype is not None and (kernels.linear_fp8_usable() or kernels.linear_quant_usable()):
            self._keep_quantized(model)

    def _keep_quantized(self, model: nn.Module) -> None:
        """Mark the weights that may arrive pre-quantized and be packed as they are (see the class docstring)."""
        for module in model.modules():
            if isinstance(module, Linear) and module not in self.mla_of:
                names = ("weight",)
            elif isinstance(module, ExpertMLP):
                names = ("w13", "w2")
            else:
                continue
            for name in names:
                param = getattr(module, name)
                if self._packable(param):
                    param.stage_quantized = QuantizedStaging(param.shape[0])

    def _weight(self, module: nn.Module, name: str) -> torch.Tensor | QuantizedWeight:
        """`module`'s weight `name` as loaded: what its staging holds where every part came quantized in a form this
        build runs, else the float parameter (quantized parts dequantized into it)."""
        param = getattr(module, name)
        staging = getattr(param, "stage_quantized", None)
        if staging is None or staging.weight is None:
            return param
        if len(staging.rows) == len(param.sources) and _has_kernel(staging.weight.scheme):
            return staging.weight
        logger.warning("a pre-quantized %s %s weight is packed as a float weight (%s)", staging.weight.scheme.name,
                       tuple(param.shape), "some of its parts are float" if len(staging.rows) != len(param.sources)
                       else "no CPU kernel for that form here")
        staging.dequantize_into(param)
        return param

    def _stage_in_bf16(self, model: nn.Module) -> None:
        """With bf16 weights, every weight that is packed and then dropped is loaded straight into bf16 (its float32
        storage is not touched yet, so nothing is freed or copied): a layer waits for packing at half its float32
        bytes. The packing rounds to the same bf16 values either way. An untied input embedding is staged too where
        the checkpoint declares bf16 (its values are then exactly bf16, the table it is kept as): V3's 129280 x 7168
        table would otherwise pass through 3.5 GiB of float32 while loading."""
        config = getattr(model, "config", None)
        bf16_checkpoint = getattr(config, "checkpoint_dtype", None) in ("bf16", "bfloat16")
        for module in model.modules():
            if isinstance(module, Linear) and module not in self.mla_of:
                names = ("weight",)  # (kv_b_proj keeps its float32 weight: MLA prefill reads it)
            elif isinstance(module, ExpertMLP):
                names = ("w13", "w2")
            elif module is self.head and module is not self.embedding and isinstance(module, VocabParallel):
                names = ("weight",)
            elif module is self.embedding and module is not self.head and bf16_checkpoint:
                names = ("weight",)  # looked up only: kept as the checkpoint's own bf16 values (no float32 copy)
            else:
                continue
            for name in names:
                param = getattr(module, name)
                if _is_cpu_fp32(param):
                    staged = nn.Parameter(torch.empty(param.shape, dtype=torch.bfloat16), requires_grad=False)
                    staged.sources = getattr(param, "sources", [])
                    setattr(module, name, staged)
                    self.staged.add(id(staged))

    def module_loaded(self, module: nn.Module) -> None:
        """`module`'s own weights are all loaded: pack them now."""
        if self.weight_dtype is None:
            return
        if self.failed is None:
            try:
                self._pack(module, self.weight_dtype)
            except PackingFailed as e:
                if self.scheme is not None:  # serving float weights instead of the quantized ones asked for: refuse
                    raise ConfigError(f"--quantization {self.scheme.name}: {e}; drop --quantization") from e
                self.failed = e
                logger.warning("%s: the remaining linear layers stay on F.linear (slower; correct)", e)
        if self.failed is not None:  # unpacked: F.linear takes float32 weights
            for name, param in list(module.named_parameters(recurse=False)):
                if getattr(param, "stage_quantized", None) is not None:  # its values may be in the staging
                    param.stage_quantized.dequantize_into(param)
                if id(param) in self.staged:
                    setattr(module, name, nn.Parameter(param.float(), requires_grad=False))

    def _pack(self, module: nn.Module, weight_dtype: torch.dtype) -> None:
        packs = self.packs
        if module in self.mla_of:
            absorbed = _pack_absorbed(self.mla_of[module], weight_dtype)
            if absorbed is not None:
                packs.absorbed[self.mla_of[module]] = absorbed
            if weight_dtype == torch.bfloat16 and _is_cpu_fp32(module.weight):  # prompt attention's expansion
                packs.expanders[self.mla_of[module]] = pack_checked(module.weight, None, weight_dtype)
        elif isinstance(module, Linear) and self._packable(module.weight):
            packs.linears[module] = pack_checked(self._weight(module, "weight"), module.bias, weight_dtype, self.scheme)
            self._drop(module, "weight")
        elif isinstance(module, ExpertMLP) and self._packable(module.w13):
            experts, index = self.experts_of[module]
            pairs = self.expert_pairs.setdefault(experts, {})
            pairs[index] = (pack_checked(self._weight(module, "w13"), None, weight_dtype, self.scheme),
                            pack_checked(self._weight(module, "w2"), None, weight_dtype, self.scheme))
            self._drop(module, "w13", "w2")
            if len(pairs) == experts.num_local:  # the layer's last expert: the routed experts run packed from now
                packs.experts[experts] = ordered = [pairs[e] for e in range(experts.num_local)]
                del self.expert_pairs[experts]
                kinds = {p.kind for pair in ordered for p in pair}
                if kinds == {Kind.F16} or kinds == {Kind.BF16} or kinds <= {Kind.INT8, Kind.INT4}:
                    packs.expert_tables[experts] = kernels.ExpertTable(
                        [w13.data for w13, _ in ordered], [w2.data for _, w2 in ordered], experts.intermediate_size,
                        experts.hidden_size, bf16=kinds == {Kind.BF16})
        elif module is self.head and isinstance(module, VocabParallel) and self._packable(module.weight):
            packs.linears[module] = pack_checked(module.weight, None, weight_dtype, self.head_scheme)
            if module is not self.embedding:
                self._drop(module, "weight")
        elif module is self.embedding and module.weight is not None and id(module.weight) in self.staged:
            packs.embeddings[module] = module.weight.data  # the checkpoint's bf16 values, as loaded
            module.weight = None
        elif module is self.embedding and _is_cpu_fp32(module.weight):
            # An untied input embedding is only looked up: a bf16 checkpoint's table (its values exactly bf16) is
            # kept in bf16, half its float32 bytes, and widened row by row as it is read (the same values).
            table = module.weight.bfloat16()
            if torch.equal(table.float(), module.weight):
                packs.embeddings[module] = table
                self._drop(module, "weight")


    def _packable(self, weight: torch.Tensor | None) -> bool:
        """A CPU weight in float32, or one this packer staged in bf16 (a model computing in bf16 keeps its own)."""
        return _is_cpu_fp32(weight) or (weight is not None and id(weight) in self.staged)

    def _drop(self, module: nn.Module, *names: str) -> None:
        """The plain weights `names` of `module` are packed: nothing reads them any more."""
        for name in names:
            self.freed_bytes += getattr(module, name).nbytes
            setattr(module, name, None)


def pack_model(model: nn.Module, weight_dtype: torch.dtype) -> Packs:
    """Every layer of a loaded model packed at once (`Packer`)."""
    packer = Packer(model, weight_dtype)
    for module in model.modules():
        packer.module_loaded(module)
    return packer.packs


def _pack_absorbed(attn: MultiHeadLatentAttention, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """With 16-bit weights, kv_b_proj's two halves packed per head in float16 (W_UK^T and W_UV) for the absorbed
    decode; the plain weight stays (prefill expands the latents with it). With bfloat16 weights too: a bf16
    checkpoint's values are exact in fp16's normal range, and the per-head fp16 GEMVs replace two float32 einsums
    over the whole weight at every decode step."""
    if (weight_dtype not in (torch.float16, torch.bfloat16) or not kernels.linear_f16_usable()
            or attn.kv_lora_rank % kernels.PANEL or attn.v_dim % kernels.PANEL):
        return None
    w = attn.kv_b_proj.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.abs().amax().item() > _FP16_MAX:
        return None
    w = w.view(attn.num_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
    return (kernels.pack_heads_f16(w[:, : attn.nope_dim].transpose(1, 2)),
            kernels.pack_heads_f16(w[:, attn.nope_dim :]))


class QuantizedStaging:
    """A parameter's pre-quantized parts as they load (models/base.py calls it with each part's row selector and
    QuantizedWeight): one QuantizedWeight of the parameter's rows holding a scale per row, so that the parts of a
    merged parameter (gate and up) need not share a block grid."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.weight: QuantizedWeight | None = None  # made at the first part, in its form
        self.rows: list[slice] = []  # the parts staged so far

    def __call__(self, selector: tuple, part: QuantizedWeight) -> None:
        rows = selector[0] if selector else slice(None)
        if len(selector) > 1 or rows.step not in (None, 1):
            raise WeightsError(f"a quantized checkpoint tensor fills whole rows of a parameter, not {selector}")
        scales = part.row_scales()
        if self.weight is None:
            n = self.num_rows
            zeros = None if part.zeros is None else torch.zeros((n, *part.zeros.shape[1:]), dtype=part.zeros.dtype)
            self.weight = QuantizedWeight(part.scheme, torch.zeros((n, *part.q.shape[1:]), dtype=torch.uint8).view(
                part.q.dtype), torch.zeros((n, *scales.shape[1:]), dtype=scales.dtype), zeros, part.in_features)
        elif part.scheme != self.weight.scheme or part.q.shape[1:] != self.weight.q.shape[1:]:
            raise WeightsError(f"the parts of one parameter come in different quantized forms ({part.scheme.name}, "
                               f"{self.weight.scheme.name}); the checkpoint is inconsistent")
        self.weight.q.view(torch.uint8)[rows] = part.q.view(torch.uint8)  # (index_put has no float8 kernel)
        self.weight.scales[rows] = scales
        if part.zeros is not None:
            self.weight.zeros[rows] = part.zeros
        self.rows.append(rows)

    def dequantize_into(self, param: nn.Parameter) -> None:
        """The staged parts' values into the float parameter; the staging emptied."""
        for rows in self.rows:
            param.data[rows] = self.weight.select_rows(rows).dequantize().to(param.dtype)
        self.weight, self.rows = None, []


class PackingFailed(Exception):
    pass


def _is_cpu_fp32(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32




def pack_checked(weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, weight_dtype: torch.dtype,
                 scheme: QuantScheme | None = None) -> PackedLinear:
    """`PackedLinear(weight, bias, weight_dtype, scheme)` checked against F.linear on a sample of its outputs (a
    quantized one, pre-quantized or quantized here by `scheme`, against its twin `reference_linear` on those rows);
    float32 for a weight beyond float16's range (logged), `weight_dtype` for one beyond int4's float16 scales.
    Raises PackingFailed where the kernel fails or disagrees."""
    if scheme is not None and not isinstance(weight, QuantizedWeight):
        try:
            weight = scheme.quantize(weight)
        except ValueError as e:  # a scale beyond float16 (formats/quantization.py): this layer stays unquantized
            logger.warning("%s: that layer keeps %s weights", e, weight_dtype)
            return pack_checked(weight, bias, weight_dtype)
    quantized = isinstance(weight, QuantizedWeight)
    if not quantized and weight_dtype == torch.float16 and weight.abs().amax().item() > _FP16_MAX:
        logger.warning("a %s weight exceeds float16's range: that layer keeps float32 weights", tuple(weight.shape))
        weight_dtype = torch.float32
    what = weight.scheme.name if quantized else str(weight_dtype)
    try:
        packed = PackedLinear(weight, bias, weight_dtype)
        rows = slice(None, None, max(1, weight.shape[0] // 64))  # a sample of the outputs: no copy of a big weight
        probe = torch.randn(3, weight.shape[1])
        sampled_bias = None if bias is None else bias[rows]
        if quantized:  # against its plain-torch twin (w8a8's quantizes the probe's rows too)
            expected = reference_linear(probe, weight.select_rows(rows), sampled_bias)
            agrees = torch.allclose(packed(probe)[:, rows], expected, rtol=1e-4,
                                    atol=1e-4 * (1.0 + expected.abs().amax().item()))
        elif weight_dtype == torch.bfloat16:  # activations rounded to bf16 too, and each output
            expected = F.linear(probe.bfloat16().float(), weight[rows].to(weight_dtype).float())
            tolerance = 2**-7 * (expected.abs() + 1e-3 * expected.abs().amax())
            agrees = bool(((packed(probe)[:, rows] - (expected if bias is None else expected + sampled_bias)).abs()
                           <= tolerance).all())
        else:
            expected = F.linear(probe, weight[rows].to(weight_dtype).float(), sampled_bias)
            agrees = torch.allclose(packed(probe)[:, rows], expected, rtol=1e-4, atol=1e-4)
    except (RuntimeError, NotImplementedError) as e:  # this torch build cannot pack it
        raise PackingFailed(f"packing a {tuple(weight.shape)} weight as {what} failed ({e})") from e
    if not agrees:  # never trust a kernel that disagrees
        raise PackingFailed(f"the packed {what} linear disagrees with F.linear for a {tuple(weight.shape)} weight")
    return packed


def _has_kernel(scheme: QuantScheme) -> bool:
    """This build runs weights of `scheme`."""
    if scheme.float8:
        return kernels.linear_fp8_usable()
    if scheme.activations:
        return kernels.linear_w8a8_usable()
    return kernels.linear_quant_usable()


def _check_kernels(scheme: QuantScheme) -> None:
    """--quantization `scheme` runs here (its kernel, and linear_quant.c for the int8 LM head), or a ConfigError."""
    why = kernels.why_unavailable()
    if not kernels.linear_quant_usable():
        raise ConfigError(f"--quantization {scheme.name} needs dsserve's int8/int4 CPU kernels (csrc/linear_quant.c, "
                          f"AVX-512), unavailable here ({why or 'this CPU or build has no AVX-512'}); drop "
                          "--quantization")
    if scheme.float8 and not kernels.linear_fp8_usable():
        raise ConfigError(f"--quantization fp8 needs dsserve's fp8 CPU kernel (csrc/linear_fp8.c, AMX tiles and "
                          f"AVX512-BF16), unavailable here ({why or 'this CPU, build or kernel has no AMX'}); use "
                          "--quantization int8, or drop --quantization")
    if scheme.activations and not kernels.linear_w8a8_usable():
        raise ConfigError(f"--quantization {scheme.name} needs dsserve's w8a8 CPU kernel (csrc/linear_w8a8.c, "
                          f"AVX512-VNNI), unavailable here ({why or 'this CPU or build has no AVX512-VNNI'}); use "
                          "--quantization int8 (int8 weights, float activations) instead")
