"""DeepSeekMoE: the router (V2 softmax / V3 sigmoid + correction bias, group-limited top-k), experts grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.config import ModelConfig
from dsserve.layers.linear import MLP, bind, empty_param


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
    """All routed experts' SwiGLU weights stacked: w13 (E, 2I, D) = [gate; up], w2 (E, D, I)."""

    def __init__(self, config: ModelConfig, prefix: str, dtype: torch.dtype):
        super().__init__()
        num, inter, hidden = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.intermediate_size = inter
        self.w13 = empty_param(num, 2 * inter, hidden, dtype=dtype)
        self.w2 = empty_param(num, hidden, inter, dtype=dtype)
        for j in range(num):
            bind(self.w13, f"{prefix}.{j}.gate_proj.weight", (j, slice(0, inter)))
            bind(self.w13, f"{prefix}.{j}.up_proj.weight", (j, slice(inter, 2 * inter)))
            bind(self.w2, f"{prefix}.{j}.down_proj.weight", (j,))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, D), weights/ids (T, k) -> (T, D). Tokens are sorted by expert; one matmul pair per active expert."""
        num_tokens, top_k = ids.shape
        flat_ids = ids.flatten()  # (T*k,)
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k  # source token of each sorted slot
        counts = torch.bincount(flat_ids, minlength=self.w13.shape[0]).tolist()
        sorted_x = x[token_of]  # (T*k, D)
        sorted_out = torch.empty_like(sorted_x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate, up = F.linear(sorted_x[start:end], self.w13[expert]).split(self.intermediate_size, dim=-1)
            sorted_out[start:end] = F.linear(F.silu(gate) * up, self.w2[expert])
            start = end
        sorted_out *= weights.flatten()[order].unsqueeze(1).to(sorted_out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, sorted_out)


class DeepseekMoE(nn.Module):
    """y = sum of the routed experts' outputs (weighted) + the shared experts' output."""

    def __init__(self, config: ModelConfig, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.gate = Router(config, f"{prefix}.gate")
        self.experts = Experts(config, f"{prefix}.experts", dtype)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, f"{prefix}.shared_experts", dtype)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
