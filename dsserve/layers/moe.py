"""DeepSeekMoE: the router (V2 softmax / V3 sigmoid + correction bias, group-limited top-k), experts grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.config import ModelConfig
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.layers.linear import MLP, bind, empty_param, silu_and_mul
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> weights (T, k) float32, expert ids (T, k)."""
        c = self.config
        if c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid" and cpu_kernels.fused_ops_usable(x):
            # V3 / R1 on CPU: the whole routing in one C call (~15 torch ops otherwise)
            routed = cpu_kernels.router_noaux(x, self.weight, self.e_score_correction_bias, c.n_group, c.topk_group,
                                              c.num_experts_per_tok, c.norm_topk_prob and c.num_experts_per_tok > 1,
                                              c.routed_scaling_factor)
            if routed is not None:
                return routed
        if (c.scoring_func == "softmax" and c.topk_method in ("greedy", "group_limited_greedy")
                and cpu_kernels.fused_ops_usable(x)):  # V2 on CPU: one C call too
            routed = cpu_kernels.router_softmax(x, self.weight, c.n_group, c.topk_group, c.num_experts_per_tok,
                                                c.topk_method == "group_limited_greedy",
                                                c.norm_topk_prob and c.num_experts_per_tok > 1, c.routed_scaling_factor)
            if routed is not None:
                return routed
        logits = F.linear(x.float(), self.weight)  # (T, E)
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        num_tokens, num_experts = scores.shape
        if c.topk_method == "noaux_tc":
            # The bias steers selection only; the weights are the unbiased scores. Group score = sum of top-2.
            choice = scores + self.e_score_correction_bias
            groups = choice.view(num_tokens, c.n_group, -1)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)  # (T, G)
            choice = self._mask_groups(choice, group_scores, float("-inf"))
            ids = choice.topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        elif c.topk_method == "group_limited_greedy":
            group_scores = scores.view(num_tokens, c.n_group, -1).max(dim=-1).values  # (T, G)
            weights, ids = self._mask_groups(scores, group_scores, 0.0).topk(c.num_experts_per_tok, dim=-1, sorted=False)
        else:
            weights, ids = scores.topk(c.num_experts_per_tok, dim=-1, sorted=False)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, ids

    def _mask_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        c = self.config
        keep = group_scores.topk(c.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(scores.shape[1] // c.n_group, dim=1)  # (T, E)
        return scores.masked_fill(~expert_mask, fill)


class Experts(nn.Module):
    """The routed experts this rank holds, SwiGLU weights stacked: w13 (E_local, 2I_local, D) = [gate; up], w2 (E_local, D, I_local).

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
        self.intermediate_size = local_inter = cols.stop - cols.start
        self.w13 = empty_param(self.num_local, 2 * local_inter, hidden, dtype=dtype)
        self.w2 = empty_param(self.num_local, hidden, local_inter, dtype=dtype)
        sliced = not tp.expert_parallel and tp.size > 1
        for local, j in enumerate(range(experts.start, experts.stop)):
            rows = (cols,) if sliced else ()
            bind(self.w13, f"{prefix}.{j}.gate_proj.weight", (local, slice(0, local_inter)), rows)
            bind(self.w13, f"{prefix}.{j}.up_proj.weight", (local, slice(local_inter, 2 * local_inter)), rows)
            bind(self.w2, f"{prefix}.{j}.down_proj.weight", (local,), (slice(None), cols) if sliced else ())

    packed: list | None = None  # CPU: (w13, w2) per local expert as `PackedLinear`s (see `prepack_for_cpu`)
    table: "cpu_kernels.ExpertTable | None" = None  # the same, when all are dsserve fp16 kernels (few-token path)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, D), weights/ids (T, k) -> (T, D), the sum over this rank's experts. Tokens are sorted by expert;
        one matmul pair per active expert."""
        num_tokens, top_k = ids.shape
        if self.table is not None and num_tokens * top_k <= self.num_local and x.dtype == torch.float32:
            # Few tokens (decode at small batch): one C call over the (token, slot) pairs, no sort, no per-expert ops
            return cpu_kernels.moe_f16(x, weights, ids - self.first_expert, self.table)
        local_ids = ids.flatten() - self.first_expert  # (T*k,)
        mine = (local_ids >= 0) & (local_ids < self.num_local)
        local_ids = torch.where(mine, local_ids, self.num_local)  # other ranks' experts sort last, never computed
        order = local_ids.argsort(stable=True)
        token_of = order // top_k  # source token of each sorted slot
        counts = torch.bincount(local_ids, minlength=self.num_local + 1)[: self.num_local].tolist()
        num_mine = sum(counts)
        order, token_of = order[:num_mine], token_of[:num_mine]
        sorted_x = x[token_of]  # (slots, D)
        sorted_out = torch.empty_like(sorted_x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            if self.packed is not None:
                w13, w2 = self.packed[expert]
                sorted_out[start:end] = w2(silu_and_mul(w13(sorted_x[start:end])))
            else:
                hidden = silu_and_mul(F.linear(sorted_x[start:end], self.w13[expert]))
                sorted_out[start:end] = F.linear(hidden, self.w2[expert])
            start = end
        sorted_out *= weights.flatten()[order].unsqueeze(1).to(sorted_out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, sorted_out)


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
