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

    packed = None  # oneDNN's pre-packed copy of the weight on CPU (see `prepack_for_cpu`)
    packable = True  # False where the weight is read directly (MLA's kv_b_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = _onednn_linear(x, self.packed, self.bias)
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
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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

    packed = None  # oneDNN's pre-packed copy for the LM head on CPU (the weight stays: the embedding reads it)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, D) -> (N, V) float32 on rank 0; None on the other ranks."""
        local = _onednn_linear(hidden, self.packed, None) if self.packed is not None else F.linear(hidden, self.weight)
        full = self.tp.gather_last_dim(local.float())
        return None if full is None else full[:, : self.vocab_size]


# ---- CPU: oneDNN with pre-packed weights ----------------------------------------------------------------------

_PACK_BATCH_HINT = 64  # the layout oneDNN picks for this M is the fastest here from M = 1 to several hundred


def prepack_for_cpu(model: nn.Module) -> int:
    """Give every float32 Linear (and the LM head) on CPU a oneDNN pre-packed weight, as vLLM's CPU backend does.

    On a 2-core AVX2 machine this is 1.3-2.3x faster than F.linear (MKL) for decode-sized batches and about equal
    for prefill (docs/benchmarks.md). A Linear's plain weight is then dropped (it is never read again); the LM
    head keeps its weight, which the embedding may share. Returns the number of layers packed; 0 where this
    torch build has no oneDNN, or its packing fails (the plain path stays)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.packable:
            weight = module.weight
        elif isinstance(module, VocabParallel):
            weight = module.weight
        else:
            continue
        if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)
            probe = torch.randn(3, weight.shape[1])
            bias = getattr(module, "bias", None) if isinstance(module, Linear) else None
            if not torch.allclose(_onednn_linear(probe, packed, bias), F.linear(probe, weight, bias),
                                  rtol=1e-4, atol=1e-4):
                logger.warning("oneDNN packed linear disagrees with F.linear for a %s weight: the remaining "
                               "layers stay on F.linear", tuple(weight.shape))
                return count  # never trust a kernel that disagrees
        except (RuntimeError, NotImplementedError) as e:  # this torch build's oneDNN cannot pack it
            logger.warning("oneDNN weight packing unavailable (%s): the remaining layers stay on F.linear "
                           "(slower on CPU; correct)", e)
            return count
        module.packed = packed
        if isinstance(module, Linear):
            module.weight = None
        count += 1
    return count


def _onednn_linear(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
