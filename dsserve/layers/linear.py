"""Linear layers whose parameters know which checkpoint tensors (and which slice of them) fill them.

A parameter records `(checkpoint name, selector, source)`: the checkpoint tensor's `source` slice (its
rows or columns owned by this rank; () for all of it) is copied into `param[selector]`. Merged q/k/v,
gate/up and expert stacks are several records on one parameter; tensor parallelism is a `source` slice,
so each rank reads only its part of the checkpoint.

Column-parallel: the output rows are split over the ranks, no communication. Row-parallel: the input
columns are split, each rank computes a partial sum, one all-reduce makes it whole (the bias is added
by rank 0 only, before the reduce).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.layers.parallel import SINGLE, TensorParallel

logger = logging.getLogger(__name__)

Selector = tuple  # index into a parameter: () whole, (slice,) rows, (expert, slice) one expert's rows
Part = tuple  # (checkpoint prefix, rows) or (checkpoint prefix, rows, slice of the checkpoint tensor's rows)


def bind(param: nn.Parameter, checkpoint_name: str, selector: Selector = (), source: tuple = ()) -> nn.Parameter:
    """Record that `checkpoint[name][source]` fills `param[selector]`; the model's loader reads these records."""
    if not hasattr(param, "sources"):
        param.sources = []
    param.sources.append((checkpoint_name, selector, source))
    return param


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Parameters are filled from the checkpoint: no random init (it costs minutes on large models).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def column_parts(parts: list[tuple[str, int]], tp: TensorParallel) -> list[Part]:
    """Split each part's rows evenly over the ranks: this rank's share of every part, in order."""
    if tp.size == 1:
        return list(parts)
    out = []
    for prefix, rows in parts:
        own = tp.shard(rows, f"the output rows of {prefix}")
        out.append((prefix, own.stop - own.start, own))
    return out


class Linear(nn.Module):
    """y = x W^T (+ b). `parts` names the checkpoint tensors stacked along the output rows, in order.

    `in_shard` makes it row-parallel: this rank holds those input columns and the output is all-reduced
    over `tp` (unless `reduce=False`: the caller sums several partial results and reduces once).
    """

    def __init__(self, in_features: int, parts: list[Part], bias: bool, dtype: torch.dtype, *,
                 in_shard: slice | None = None, tp: TensorParallel = SINGLE, reduce: bool = True):
        super().__init__()
        out_features = sum(part[1] for part in parts)
        local_in = in_features if in_shard is None else in_shard.stop - in_shard.start
        self.weight = empty_param(out_features, local_in, dtype=dtype)
        self.row_parallel = in_shard is not None and tp.size > 1
        self.tp, self.reduce = tp, reduce
        # Row-parallel: only rank 0 adds the bias (the partial sums are added up after).
        has_bias = bias and not (self.row_parallel and tp.rank != 0)
        self.bias = empty_param(out_features, dtype=dtype) if has_bias else None
        offset = 0
        for prefix, size, *rows in parts:
            rows = rows[0] if rows else slice(None)
            cols = () if in_shard is None else (in_shard,)
            dst = slice(offset, offset + size)
            bind(self.weight, f"{prefix}.weight", (dst,), (rows, *cols) if (rows != slice(None) or cols) else ())
            if self.bias is not None:
                bind(self.bias, f"{prefix}.bias", (dst,), (rows,) if rows != slice(None) else ())
            offset += size

    packed: "PackedLinear | None" = None  # the weight in a CPU kernel's own layout (see `prepack_for_cpu`)
    packable = True  # False where the weight is read directly (MLA's kv_b_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = self.packed(x)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.row_parallel and self.reduce:
            self.tp.all_reduce(y)
        return y


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one matmul; tensor-parallel over the
    intermediate dimension (gate/up column-parallel, down row-parallel)."""

    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE, reduce: bool = True):
        super().__init__()
        own = tp.shard(intermediate_size, f"the intermediate size of {prefix}")
        self.intermediate_size = own.stop - own.start
        self.gate_up_proj = Linear(
            hidden_size, column_parts([(f"{prefix}.gate_proj", intermediate_size), (f"{prefix}.up_proj", intermediate_size)], tp),
            False, dtype,
        )
        self.down_proj = Linear(intermediate_size, [(f"{prefix}.down_proj", hidden_size)], False, dtype,
                                in_shard=own if tp.size > 1 else None, tp=tp, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(N, 2 I) -> silu(gate) * up (N, I): one C call on CPU in float32 (kernels/elementwise.c), else torch."""
    if gate_up.dim() == 2 and cpu_kernels.fused_ops_usable(gate_up):
        return cpu_kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class VocabParallel(nn.Module):
    """A (vocab, hidden) matrix split by rows over the ranks: rank r holds tokens [r * P, (r + 1) * P), P = ceil(V / size).

    As the input embedding each rank looks up the ids it holds (zeros for the rest) and an all-reduce sums
    them; as the LM head each rank computes its columns of the logits and rank 0 gathers them.
    """

    def __init__(self, vocab_size: int, hidden_size: int, name: str, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        per_rank = -(-vocab_size // tp.size)
        self.start = min(tp.rank * per_rank, vocab_size)
        self.end = min(self.start + per_rank, vocab_size)
        # Padding rows (the last rank's, when V does not divide) stay zero: never looked up, logits cut off.
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size, dtype=dtype), requires_grad=False)
        if self.end > self.start:
            rows = slice(self.start, self.end)
            bind(self.weight, name, (slice(0, self.end - self.start),), (rows,) if tp.size > 1 else ())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))
        return self.tp.all_reduce(out)

    packed: "PackedLinear | None" = None  # the LM head's weight packed for a CPU kernel (see `prepack_for_cpu`)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, D) -> (N, V) float32 on rank 0; None on the other ranks."""
        local = self.packed(hidden) if self.packed is not None else F.linear(hidden, self.weight)
        full = self.tp.gather_last_dim(local.float())
        return None if full is None else full[:, : self.vocab_size]


# ---- CPU: weights pre-packed for oneDNN (float32) or FBGEMM (float16) --------------------------------------------

_PACK_BATCH_HINT = 64  # the layout oneDNN picks for this M is the fastest here from M = 1 to several hundred
_FP16_MAX = 65504.0


class PackedLinear:
    """One linear layer's weight (and bias) in a CPU kernel's own layout: `packed(x)` = x W^T + b, float32.

    float32: oneDNN's reordered weight (`_linear_pointwise`), 1.3-2.3x faster than F.linear at decode sizes.
    float16: the weight stored in fp16, widened to fp32 inside the kernel; activations and accumulation stay fp32,
    half the bytes per decode step. The kernel is dsserve's own (kernels/linear_f16.c: panel-packed, AVX2 + F16C;
    a Qwen2-shaped model's linears and LM head 3.6 ms at batch 1 vs 5.0 for FBGEMM, 35 vs 44 ms at batch 64 on a
    2-core EPYC), else FBGEMM's packed fp16 GEMM (`linear_dynamic_fp16`) where the library could not be built.
    """

    __slots__ = ("weight_dtype", "kind", "data", "bias", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype):
        self.weight_dtype, self.out_features = weight_dtype, weight.shape[0]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        if weight_dtype == torch.float16 and cpu_kernels.linear_f16_usable():
            self.kind, self.data = "dsserve", cpu_kernels.pack_f16(weight)
        elif weight_dtype == torch.float16:
            self.kind = "fbgemm"
            self.data = torch.ops.quantized.linear_prepack_fp16(weight.detach(), self.bias)
        elif weight_dtype == torch.bfloat16 and cpu_kernels.linear_bf16_usable():
            self.kind, self.data = "dsserve-bf16", cpu_kernels.pack_bf16(weight)
        elif weight_dtype == torch.bfloat16:
            self.kind = "onednn-bf16"
            self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), _PACK_BATCH_HINT)
        else:
            self.kind = "onednn"
            self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dsserve":
            return cpu_kernels.linear_f16(x, self.data, self.out_features, self.bias)
        if self.kind == "dsserve-bf16":
            return cpu_kernels.linear_bf16(x, self.data, self.out_features, self.bias)
        if self.kind == "fbgemm":
            return torch.ops.quantized.linear_dynamic_fp16(x, self.data)
        if self.kind == "onednn-bf16":
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.data, None, "none", [], "").float()
            return y if self.bias is None else y.add_(self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.data, self.bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes if isinstance(self.data, torch.Tensor) else 0


def prepack_for_cpu(model: nn.Module, weight_dtype: torch.dtype = torch.float32) -> int:
    """Give every float32 Linear, every routed expert and the LM head on CPU a packed weight (`PackedLinear`).

    `weight_dtype` float16 stores them as FBGEMM fp16 (a layer whose weights exceed fp16's range stays float32,
    logged); float32 as oneDNN's layout. The plain weights are dropped where nothing else reads them (a tied
    LM head keeps its weight: the embedding reads it). Each layer's packed result is checked against F.linear
    on the same (fp16-rounded) weight before it is used; a kernel that disagrees or fails stops the packing
    and the remaining layers stay on F.linear (slower, correct). Returns the number of matrices packed.
    """
    reason = cpu_kernels.packed_weights_unavailable(weight_dtype)
    if reason is not None and weight_dtype == torch.bfloat16:
        logger.warning("bfloat16 weights unavailable (%s): packing float16 weights instead", reason)
        weight_dtype, reason = torch.float16, cpu_kernels.packed_weights_unavailable(torch.float16)
    if reason is not None and weight_dtype == torch.float16:
        logger.warning("float16 weights unavailable (%s): packing float32 weights for oneDNN instead", reason)
        weight_dtype, reason = torch.float32, cpu_kernels.packed_weights_unavailable(torch.float32)
    if reason is not None:
        logger.warning("weight packing unavailable (%s): linear layers stay on F.linear (slower; correct)", reason)
        return 0
    from dsserve.layers.moe import Experts  # layers/moe imports this module

    embedding = getattr(model, "embed_tokens", None)
    count = 0
    try:
        for module in model.modules():
            if isinstance(module, Linear) and module.packable and _is_cpu_fp32(module.weight):
                module.packed = _pack_checked(module.weight, module.bias, weight_dtype)
                module.weight = None
                count += 1
            elif isinstance(module, Experts) and _is_cpu_fp32(module.w13):
                module.packed = [(_pack_checked(module.w13[e], None, weight_dtype),
                                  _pack_checked(module.w2[e], None, weight_dtype)) for e in range(module.num_local)]
                if all(w13.kind == w2.kind == "dsserve" for w13, w2 in module.packed):
                    module.table = cpu_kernels.ExpertTable([w13.data for w13, _ in module.packed],
                                                           [w2.data for _, w2 in module.packed],
                                                           module.intermediate_size, module.w2.shape[1])
                module.w13 = module.w2 = None
                count += 2 * module.num_local
            elif hasattr(module, "pack_for_cpu"):  # a module with its own packed forms (MLA's absorbed projections)
                count += module.pack_for_cpu(weight_dtype)
        head = getattr(model, "lm_head", None)
        if isinstance(head, VocabParallel) and _is_cpu_fp32(head.weight):
            head.packed = _pack_checked(head.weight, None, weight_dtype)
            if head is not embedding:
                head.weight = None
            count += 1
    except _PackingFailed as e:
        logger.warning("%s: the remaining linear layers stay on F.linear (slower; correct)", e)
    return count


class _PackingFailed(Exception):
    pass


def _is_cpu_fp32(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


def _pack_checked(weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype) -> PackedLinear:
    if weight_dtype == torch.float16 and weight.abs().amax().item() > _FP16_MAX:
        logger.warning("a %s weight exceeds float16's range: that layer keeps float32 weights", tuple(weight.shape))
        weight_dtype = torch.float32
    try:
        packed = PackedLinear(weight, bias, weight_dtype)
        rows = slice(None, None, max(1, weight.shape[0] // 64))  # a sample of the outputs: no copy of a big weight
        probe = torch.randn(3, weight.shape[1])
        rounded = weight[rows].to(weight_dtype).float()
        if weight_dtype == torch.bfloat16:  # the activations are rounded to bf16 too, and so is each output
            expected = F.linear(probe.bfloat16().float(), rounded)
            tolerance = 2**-7 * (expected.abs() + 1e-3 * expected.abs().amax())
            agrees = bool(((packed(probe)[:, rows] - (expected if bias is None else expected + bias[rows])).abs()
                           <= tolerance).all())
        else:
            expected = F.linear(probe, rounded, None if bias is None else bias[rows])
            agrees = torch.allclose(packed(probe)[:, rows], expected, rtol=1e-4, atol=1e-4)
    except (RuntimeError, NotImplementedError) as e:  # this torch build cannot pack it
        raise _PackingFailed(f"packing a {tuple(weight.shape)} weight as {weight_dtype} failed ({e})") from e
    if not agrees:  # never trust a kernel that disagrees
        raise _PackingFailed(f"the packed {weight_dtype} linear disagrees with F.linear for a {tuple(weight.shape)} weight")
    return packed
