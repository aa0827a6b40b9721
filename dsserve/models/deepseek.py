"""DeepSeek V2 / V2-Lite / V3 / R1: MLA attention over a latent cache, YaRN rotary, DeepSeekMoE. Reads top to bottom."""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from dsserve.config import ModelConfig
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.layers.attention import AttentionMetadata, mla_attention
from dsserve.layers.linear import MLP, Linear
from dsserve.layers.moe import DeepseekMoE
from dsserve.layers.norm import RMSNorm
from dsserve.layers.parallel import SINGLE, TensorParallel
from dsserve.layers.rotary import RotaryEmbedding, attention_scale
from dsserve.models.base import CausalLM, DecoderLayer


class MultiHeadLatentAttention(nn.Module):
    """q = q_b(norm(q_a(x))) or q_proj(x); the cache holds norm(c_kv) (kv_lora_rank) + rope(k_pe) (qk_rope_head_dim).

    Tensor parallel: the heads are split (q_b / q_proj and kv_b column-parallel by head, o_proj row-parallel);
    the low-rank down-projections (q_a, kv_a) are small and replicated, and so is the latent cache: every
    rank keeps the whole 576-value entry and attends with its own heads.
    """

    def __init__(self, config: ModelConfig, prefix: str, rotary: RotaryEmbedding, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        c = config
        heads = tp.shard(c.num_attention_heads, "num_attention_heads")
        self.num_heads = heads.stop - heads.start
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank

        def by_head(name: str, per_head: int) -> list:
            rows = (f"{prefix}.{name}", self.num_heads * per_head)
            return [(*rows, slice(heads.start * per_head, heads.stop * per_head))] if tp.size > 1 else [rows]

        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, by_head("q_proj", c.qk_head_dim), False, dtype)
        else:
            self.q_a_proj = Linear(c.hidden_size, [(f"{prefix}.q_a_proj", c.q_lora_rank)], c.qkv_bias, dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6, f"{prefix}.q_a_layernorm.weight", dtype)
            self.q_b_proj = Linear(c.q_lora_rank, by_head("q_b_proj", c.qk_head_dim), False, dtype)
        self.kv_a_proj_with_mqa = Linear(
            c.hidden_size, [(f"{prefix}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim)], c.qkv_bias, dtype
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6, f"{prefix}.kv_a_layernorm.weight", dtype)
        self.kv_b_proj = Linear(c.kv_lora_rank, by_head("kv_b_proj", c.qk_nope_head_dim + c.v_head_dim), False, dtype)
        self.kv_b_proj.packable = False  # attention reads its weight (absorbed into q, expanded over the latents)
        v_cols = slice(heads.start * c.v_head_dim, heads.stop * c.v_head_dim)
        self.o_proj = Linear(c.num_attention_heads * c.v_head_dim, [(f"{prefix}.o_proj", c.hidden_size)], c.qkv_bias,
                             dtype, in_shard=v_cols if tp.size > 1 else None, tp=tp)
        self.rotary = rotary  # shared by all layers; rotates only the qk_rope_head_dim dims
        self.scale = attention_scale(c.qk_head_dim, c.rope)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (T, C)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.unsqueeze(1))  # k_pe: one head shared by all heads
        w_kv_b = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        out = mla_attention(q_nope, q_pe, latent, k_pe.squeeze(1), w_kv_b, cache, meta, self.scale,
                            absorbed=self.absorbed)  # (T, H, V)
        return self.o_proj(out.reshape(num_tokens, -1))

    absorbed: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU fp16: W_UK^T and W_UV per head, packed

    def pack_for_cpu(self, weight_dtype: torch.dtype) -> int:
        """With 16-bit weights on CPU (layers/linear.py: prepack_for_cpu calls this), also keep kv_b_proj's two
        halves packed per head, in float16, for the absorbed decode (the plain weight stays: prefill expands the
        latents with it). With bfloat16 weights too: a bf16 checkpoint's values are exact in fp16's normal range, and
        the per-head fp16 GEMVs replace two float32 einsums over the whole weight at every decode step. Returns the
        number of matrices packed."""
        if (weight_dtype not in (torch.float16, torch.bfloat16) or not cpu_kernels.linear_f16_usable()
                or self.kv_lora_rank % cpu_kernels.PANEL):
            return 0
        w = self.kv_b_proj.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.abs().amax().item() > 65504.0:
            return 0
        w = w.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        if self.v_dim % cpu_kernels.PANEL:
            return 0
        self.absorbed = (cpu_kernels.pack_heads_f16(w[:, : self.nope_dim].transpose(1, 2)),
                         cpu_kernels.pack_heads_f16(w[:, self.nope_dim :]))
        return 2 * self.num_heads


class DeepseekForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__(config, dtype, tp)
        self.kv_cache_entry_shape = (config.kv_lora_rank + config.qk_rope_head_dim,)
        rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope, max_positions, config.rope_interleave, dtype)
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = MultiHeadLatentAttention(config, f"{prefix}.self_attn", rotary, dtype, tp)
            if config.is_moe_layer(i):
                mlp = DeepseekMoE(config, f"{prefix}.mlp", dtype, tp)
            else:
                mlp = MLP(config.hidden_size, config.intermediate_size, f"{prefix}.mlp", dtype, tp)
            self.layers.append(DecoderLayer(config, i, attn, mlp, dtype))

    def fuse_decode_for_cpu(self, kv_caches: list[torch.Tensor]) -> bool:
        """Where every layer can run in dsserve's C kernels (one device, float32 activations, every linear and
        routed expert float16 or bfloat16 in dsserve's own packing, MLA's absorbed per-head packs, a router with a
        C kernel (V3 / R1's sigmoid noaux_tc, V2's softmax greedy or group-limited), a latent cache the attention
        kernel reads), decode steps run all layers in one call (kernels/decode_layers.c: dsserve_mla_decode).
        Returns whether they do; the module path stays for prefill and the rest."""
        c = self.config
        attn0 = self.layers[0].self_attn
        rotary, entry = attn0.rotary, c.kv_lora_rank + c.qk_rope_head_dim
        if (self.tp.size != 1 or rotary.cos.dtype != torch.float32 or rotary.cos.shape[1] * 2 != c.qk_rope_head_dim
                or not cpu_kernels.usable(entry, c.kv_lora_rank, kv_caches[0].dtype)):
            return False
        kinds: set = set()
        layers = []
        for layer, cache in zip(self.layers, kv_caches):
            fields = _mla_fields(layer.self_attn, kinds)
            ffn = _ffn_fields(layer.mlp, c, kinds) if fields is not None else None
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if (ffn is None or not cache.is_contiguous() or len(kinds) != 1
                    or not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms)):
                return False
            layers.append(dict(fields, **ffn, input_norm=norms[0], post_norm=norms[1], cache=cache))
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, DeepseekMoE)]
        intermediates = [f["ffn_intermediate"] for f in layers]
        absorb_k, absorb_v = attn0.absorbed
        self.fused_decode = cpu_kernels.MLADecoder(
            layers, cos=rotary.cos, sin=rotary.sin, hidden=c.hidden_size, heads=attn0.num_heads,
            nope=attn0.nope_dim, rope=attn0.rope_dim, v_dim=attn0.v_dim, q_rank=c.q_lora_rank or 0,
            kv_rank=c.kv_lora_rank, experts=c.n_routed_experts if moe else 0,
            top_k=c.num_experts_per_tok if moe else 0, n_group=c.n_group or 1, topk_group=c.topk_group or 1,
            moe_intermediate=c.moe_intermediate_size if moe else 0, max_intermediate=max(intermediates),
            absorb_k_stride=absorb_k[0].numel(), absorb_v_stride=absorb_v[0].numel(),
            eps=self.layers[0].input_layernorm.eps, lora_eps=attn0.kv_a_layernorm.eps, scale=attn0.scale,
            routed_scale=c.routed_scaling_factor, interleaved=int(rotary.interleaved),
            weights_bf16=int(kinds == {"dsserve-bf16"}), router_kind=_router_kind(c) if moe else 0,
            normalize=int(bool(c.norm_topk_prob) and c.num_experts_per_tok > 1),
            # one flag for every layer, as the module path decides per layer: one packing kind for all (checked above)
            experts_f16_table=int(bool(moe) and all(m.experts.table is not None for m in moe)))
        return True


_DSSERVE_KINDS = ("dsserve", "dsserve-bf16")


def _packed(linear: Linear, kinds: set) -> torch.Tensor | None:
    """A linear's dsserve-packed weight (its kind noted), or None where it is not in dsserve's own packing."""
    if linear.packed is None or linear.packed.kind not in _DSSERVE_KINDS:
        return None
    kinds.add(linear.packed.kind)
    return linear.packed.data


def _mla_fields(attn: MultiHeadLatentAttention, kinds: set) -> dict | None:
    lora = hasattr(attn, "q_a_proj")
    q_b = attn.q_b_proj if lora else attn.q_proj
    linears = {"q_a": attn.q_a_proj if lora else None, "q_b": q_b, "kv_a": attn.kv_a_proj_with_mqa, "o": attn.o_proj}
    fields = {name: None if lin is None else _packed(lin, kinds) for name, lin in linears.items()}
    norms = [attn.kv_a_layernorm.weight] + ([attn.q_a_layernorm.weight] if lora else [])
    if (attn.absorbed is None or (lora and attn.q_a_layernorm.eps != attn.kv_a_layernorm.eps)  # one lora_eps in C or any(fields[name] is None for name in linears if linears[name] is not None)
            or q_b.packed.bias is not None
            or not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms)):
        return None
    return dict(fields, q_a_norm=attn.q_a_layernorm.weight if lora else None, kv_a_norm=attn.kv_a_layernorm.weight,
                q_a_bias=attn.q_a_proj.packed.bias if lora else None, kv_a_bias=attn.kv_a_proj_with_mqa.packed.bias,
                o_bias=attn.o_proj.packed.bias, absorb_k=attn.absorbed[0], absorb_v=attn.absorbed[1])


def _ffn_fields(mlp: nn.Module, c: ModelConfig, kinds: set) -> dict | None:
    """A dense MLP's packed pair, or the MoE's router, routed experts (C arrays of pointers) and shared experts."""
    shared = mlp.shared_experts if isinstance(mlp, DeepseekMoE) else mlp
    fields = dict(gate_up=None, down=None, ffn_intermediate=0, router=None, router_bias=None, w13=None, w2=None)
    if shared is not None:
        gate_up, down = _packed(shared.gate_up_proj, kinds), _packed(shared.down_proj, kinds)
        if gate_up is None or down is None or shared.gate_up_proj.packed.bias is not None or shared.down_proj.packed.bias is not None:
            return None
        fields.update(gate_up=gate_up, down=down, ffn_intermediate=shared.intermediate_size)
    if not isinstance(mlp, DeepseekMoE):
        return fields
    experts, gate = mlp.experts, mlp.gate
    E = c.n_routed_experts
    if (_router_kind(c) is None or c.num_experts_per_tok > E
            or experts.packed is None or experts.first_expert != 0 or experts.num_local != E
            or gate.weight.dtype != torch.float32 or not gate.weight.is_contiguous()):
        return None
    if not all(w13.kind in _DSSERVE_KINDS and w2.kind in _DSSERVE_KINDS for w13, w2 in experts.packed):
        return None
    kinds.update(p.kind for pair in experts.packed for p in pair)
    pointers = ctypes.c_void_p * E
    fields.update(router=gate.weight, router_bias=getattr(gate, "e_score_correction_bias", None),
                  experts=experts.packed,  # not a struct field: keeps the tensors the pointer arrays point into alive
                  w13=pointers(*(w13.data.data_ptr() for w13, _ in experts.packed)),
                  w2=pointers(*(w2.data.data_ptr() for _, w2 in experts.packed)))
    return fields


def _router_kind(c: ModelConfig) -> int | None:
    """dsserve_mla_decode's router_kind for this config (elementwise.c's two router kernels), None if neither fits."""
    E, groups = c.n_routed_experts, c.n_group
    grouped = bool(groups) and E % groups == 0 and c.topk_group <= groups
    if c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid":
        return 0 if E <= 1024 and grouped and E // groups >= 2 else None
    if c.scoring_func == "softmax" and c.topk_method == "greedy":
        return 1 if E <= 1024 else None
    if c.scoring_func == "softmax" and c.topk_method == "group_limited_greedy":
        return 2 if E <= 1024 and grouped else None
    return None
