"""DeepSeekMoE: the router (V2 softmax / V3 sigmoid + correction bias, group-limited top-k), experts grouped by expert."""

from __future__ import annotations

import torch
from torch import nn

from dsserve.config import ModelConfig
from dsserve.layers.linear import MLP, bind, empty_param
from dsserve.layers.parallel import SINGLE, TensorParallel


class Router(nn.Module):
    """Picks `num_experts_per_tok` experts per token and their weights; computed in float32 as the reference does."""

    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        self.config = config
        self.weight = bind(empty_param(config.n_routed_experts, config.hidden_size, dtype=torch.float32), f"{prefix}.weight")
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = bind(
                empty_param(config.n_routed_experts, dtype=torch.float32), f"{prefix}.e_score_correction_bias"
            )
        else:
            self.e_score_correction_bias = None  # V3 / R1 (noaux_tc) only: steers the choice, not the weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> weights (T, k) float32, expert ids (T, k): V2's softmax (greedy or group-limited) or V3's
        sigmoid with the correction bias (noaux_tc: groups scored by their top-2), normalized and scaled as the
        config says (dsserve/backends/torch.py has the reference maths)."""
        return self.backend.route(self, x)


class ExpertMLP(nn.Module):
    """One routed expert's SwiGLU weights: w13 (2I, D) = [gate; up], w2 (D, I). A module of its own, so that loading
    reports each expert as soon as its three tensors are in (a backend packs it then)."""

    def __init__(self, prefix: str, hidden: int, inter: int, cols: slice, sliced: bool, dtype: torch.dtype):
        super().__init__()
        rows = (cols,) if sliced else ()
        self.w13 = empty_param(2 * inter, hidden, dtype=dtype)
        self.w2 = empty_param(hidden, inter, dtype=dtype)
        bind(self.w13, f"{prefix}.gate_proj.weight", (slice(0, inter),), rows)
        bind(self.w13, f"{prefix}.up_proj.weight", (slice(inter, 2 * inter),), rows)
        bind(self.w2, f"{prefix}.down_proj.weight", (), (slice(None), cols) if sliced else ())


class Experts(nn.Module):
    """The routed experts this rank holds (`mlps[e]`: local expert e, checkpoint expert first_expert + e).

    Tensor parallel: every expert, a 1/size slice of its intermediate dimension. Expert parallel: whole
    experts [first, first + E/size). Either way the output is this rank's partial sum; the caller all-reduces.
    """

    def __init__(self, config: ModelConfig, prefix: str, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        num, inter, hidden = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        if tp.expert_parallel:
            experts, cols = tp.shard(num, "n_routed_experts (expert parallel)"), slice(0, inter)
        else:
            experts, cols = slice(0, num), tp.shard(inter, "moe_intermediate_size")
        self.first_expert, self.num_local = experts.start, experts.stop - experts.start
        self.intermediate_size = cols.stop - cols.start
        self.hidden_size = hidden
        sliced = not tp.expert_parallel and tp.size > 1
        self.mlps = nn.ModuleList(ExpertMLP(f"{prefix}.{j}", hidden, self.intermediate_size, cols, sliced, dtype)
                                  for j in range(experts.start, experts.stop))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, D), weights/ids (T, k) -> (T, D), the weighted sum over this rank's experts of their SwiGLU."""
        return self.backend.experts(self, x, weights, ids)


class DeepseekMoE(nn.Module):
    """y = sum of the routed experts' outputs (weighted) + the shared experts' output. With several ranks each
    computes its partial sum of both (its experts or expert slices, its slice of the shared experts) and one
    all-reduce combines them."""

    def __init__(self, config: ModelConfig, prefix: str, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.gate = Router(config, f"{prefix}.gate")
        self.experts = Experts(config, f"{prefix}.experts", dtype, tp)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, f"{prefix}.shared_experts",
                dtype, tp, reduce=False)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.tp.all_reduce(out)
