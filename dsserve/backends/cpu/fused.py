"""A decode step's every decoder layer in one C call (csrc/decode_layers.c), where every layer can run there.

The fused decoders run the module path's kernels in its order (the same bits, without ~10 Python-side calls per
layer). `build_fused_decoder` reads each layer's packed weights and small tensors into the C structs, or returns
None (with the reason logged at debug level) where any layer cannot: then every decode step takes the module path.
A layer can fall short because a linear was left on another kernel (a weight outside float16's range keeps float32,
a failed packing check leaves F.linear, an int4 scale beyond float16 leaves a quantized model's layer unquantized),
a router has no C kernel, tensor parallelism, or a layout the kernels do not read; any such field would otherwise
reach C as a NULL pointer. The linears are all 16-bit panels of one kind, or all int8 / int4 (--quantization: each
reaches C as a dsserve_quant_weight struct, which says its own bits, so the two could even mix).
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from dsserve.backends.cpu import kernels
from dsserve.backends.cpu.packing import Kind, Packs
from dsserve.layers.linear import MLP, Linear
from dsserve.layers.moe import DeepseekMoE
from dsserve.models.deepseek import DeepseekForCausalLM, MultiHeadLatentAttention
from dsserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


class _Refused(Exception):
    """A layer the fused decoder cannot run; the message says why."""


def build_fused_decoder(model: nn.Module, packs: Packs, kv_caches: list[torch.Tensor]):
    """The fused decoder for this model over these caches, or None where some layer cannot run in it."""
    try:
        if model.tp.size != 1:
            raise _Refused("tensor parallel")
        if not all(cache.is_contiguous() for cache in kv_caches):
            raise _Refused("a KV cache is not contiguous")
        norms = [m.weight for layer in model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        if not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms):
            raise _Refused("a norm's weight is not contiguous float32")
        if isinstance(model, DeepseekForCausalLM):
            return _MLABuilder(model, packs).build(kv_caches)
        if isinstance(model, LlamaForCausalLM):
            return _DenseBuilder(model, packs).build(kv_caches)
        raise _Refused(f"no fused decoder for {type(model).__name__}")
    except _Refused as why:
        logger.debug("decode steps take the module path: %s", why)
        return None


_QUANTIZED = frozenset({Kind.INT8, Kind.INT4})


class _Builder:
    """Reads packed weights for the C structs; the model's linears must all be in one 16-bit kind, or all int8 /
    int4."""

    def __init__(self, model: nn.Module, packs: Packs):
        self.model, self.packs, self.kinds = model, packs, set()

    def packed(self, linear: Linear, bias_allowed: bool = True):
        """A linear's weight as the C struct field takes it (its kind noted): 16-bit panels as a tensor, an int8 /
        int4 weight as its dsserve_quant_weight; refused where it is in neither."""
        packed = self.packs.linears.get(linear)
        if linear.input_order is not None:
            raise _Refused("a linear reorders its inputs (GPTQ desc_act): the C decoders read x in its own order")
        if packed is not None and packed.kind in (Kind.FP8, Kind.W8A8):
            raise _Refused(f"{packed.kind.value} weights: decode_layers.c reads 16-bit, int8 and int4 panels only")
        if packed is None or not (packed.kind.own or packed.kind in _QUANTIZED):
            raise _Refused("a linear is not in dsserve's own packing (its weight is beyond float16's range, or its "
                           "packing check failed)")
        if not bias_allowed and packed.bias is not None:
            raise _Refused("a linear with a bias where the kernel takes none")
        self.note_kinds(packed.kind)
        return packed.data.struct if packed.kind in _QUANTIZED else packed.data

    def note_kinds(self, *kinds: Kind) -> None:
        self.kinds.update(kinds)
        if not (len(self.kinds) == 1 or self.kinds <= _QUANTIZED):
            raise _Refused("linears in more than one packing kind (a quantized model's layer left unquantized)")

    def bias(self, linear: Linear) -> torch.Tensor | None:
        return self.packs.linears[linear].bias

    @property
    def weights_bf16(self) -> int:
        return int(self.kinds == {Kind.BF16})

    @property
    def weights_quant(self) -> int:
        return int(self.kinds <= _QUANTIZED)

    def rotary(self, rotary, rope_dim: int, k_dim: int, v_dim: int, cache: torch.Tensor):
        if rotary.cos.dtype != torch.float32 or rotary.cos.shape[1] * 2 != rope_dim:
            raise _Refused("rotary tables not in float32 over the whole rope dimension")
        if not kernels.usable(k_dim, v_dim, cache.dtype):
            raise _Refused("the attention kernel does not read this cache")
        return rotary


class _DenseBuilder(_Builder):
    """Llama / Qwen2: csrc/decode_layers.c's dsserve_dense_decode."""

    def build(self, kv_caches: list[torch.Tensor]) -> kernels.DenseDecoder:
        model = self.model
        attn0 = model.layers[0].self_attn
        rotary = self.rotary(attn0.rotary, attn0.head_dim, attn0.head_dim, attn0.head_dim, kv_caches[0])
        layers = []
        for layer, cache in zip(model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(dict(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                               qkv=self.packed(attn.qkv_proj), o=self.packed(attn.o_proj),
                               gate_up=self.packed(mlp.gate_up_proj, bias_allowed=False),
                               down=self.packed(mlp.down_proj, bias_allowed=False),
                               qkv_bias=self.bias(attn.qkv_proj), o_bias=self.bias(attn.o_proj), cache=cache))
        return kernels.DenseDecoder(
            layers, hidden=model.config.hidden_size, heads=attn0.num_heads, kv_heads=attn0.num_kv_heads,
            head_dim=attn0.head_dim, intermediate=model.layers[0].mlp.intermediate_size,
            eps=model.layers[0].input_layernorm.eps, scale=attn0.scale, cos=rotary.cos, sin=rotary.sin,
            interleaved=rotary.interleaved, weights_bf16=bool(self.weights_bf16),
            weights_quant=bool(self.weights_quant))


class _MLABuilder(_Builder):
    """DeepSeek V2 / V3 / R1: csrc/decode_layers.c's dsserve_mla_decode (MLA, then a dense MLP or the MoE)."""

    def build(self, kv_caches: list[torch.Tensor]) -> kernels.MLADecoder:
        model, c = self.model, self.model.config
        attn0 = model.layers[0].self_attn
        rotary = self.rotary(attn0.rotary, c.qk_rope_head_dim, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank,
                             kv_caches[0])
        layers = [dict(self.attention(layer.self_attn), **self.ffn(layer.mlp), input_norm=layer.input_layernorm.weight,
                       post_norm=layer.post_attention_layernorm.weight, cache=cache)
                  for layer, cache in zip(model.layers, kv_caches)]
        moe = [layer.mlp for layer in model.layers if isinstance(layer.mlp, DeepseekMoE)]
        absorb_k, absorb_v = self.packs.absorbed[attn0]
        return kernels.MLADecoder(
            layers, cos=rotary.cos, sin=rotary.sin, hidden=c.hidden_size, heads=attn0.num_heads,
            nope=attn0.nope_dim, rope=attn0.rope_dim, v_dim=attn0.v_dim, q_rank=c.q_lora_rank or 0,
            kv_rank=c.kv_lora_rank, experts=c.n_routed_experts if moe else 0,
            top_k=c.num_experts_per_tok if moe else 0, n_group=c.n_group or 1, topk_group=c.topk_group or 1,
            moe_intermediate=c.moe_intermediate_size if moe else 0,
            max_intermediate=max(f["ffn_intermediate"] for f in layers),
            absorb_k_stride=absorb_k[0].numel(), absorb_v_stride=absorb_v[0].numel(),
            eps=model.layers[0].input_layernorm.eps, lora_eps=attn0.kv_a_layernorm.eps, scale=attn0.scale,
            routed_scale=c.routed_scaling_factor, interleaved=int(rotary.interleaved),
            weights_bf16=self.weights_bf16, weights_quant=self.weights_quant,
            router_kind=router_kind(c) if moe else 0,
            normalize=int(bool(c.norm_topk_prob) and c.num_experts_per_tok > 1),
            # one flag for every layer, as the module path decides per layer
            experts_f16_table=int(bool(moe) and all(
                m.experts in self.packs.expert_tables and not self.packs.expert_tables[m.experts].bf16
                and not self.packs.expert_tables[m.experts].quantized for m in moe)))

    def attention(self, attn: MultiHeadLatentAttention) -> dict:
        absorbed = self.packs.absorbed.get(attn)
        if absorbed is None:
            raise _Refused("kv_b_proj has no per-head fp16 packing")
        lora = attn.q_a_proj is not None
        if lora and attn.q_a_layernorm.eps != attn.kv_a_layernorm.eps:
            raise _Refused("q_a and kv_a layer norms with different eps (the kernel takes one)")
        norms = [attn.kv_a_layernorm.weight] + ([attn.q_a_layernorm.weight] if lora else [])
        if not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms):
            raise _Refused("a LoRA norm's weight is not contiguous float32")
        # every linear the layer has must be in the packing the kernel reads: `packed` refuses any other (no NULL)
        return dict(q_a=self.packed(attn.q_a_proj) if lora else None,
                    q_b=self.packed(attn.q_b_proj if lora else attn.q_proj, bias_allowed=False),
                    kv_a=self.packed(attn.kv_a_proj_with_mqa), o=self.packed(attn.o_proj),
                    q_a_norm=attn.q_a_layernorm.weight if lora else None, kv_a_norm=attn.kv_a_layernorm.weight,
                    q_a_bias=self.bias(attn.q_a_proj) if lora else None, kv_a_bias=self.bias(attn.kv_a_proj_with_mqa),
                    o_bias=self.bias(attn.o_proj), absorb_k=absorbed[0], absorb_v=absorbed[1])

    def ffn(self, mlp: nn.Module) -> dict:
        """A dense MLP's packed pair, or the MoE's router, routed experts (C arrays of pointers) and shared experts."""
        shared = mlp.shared_experts if isinstance(mlp, DeepseekMoE) else mlp
        fields = dict(gate_up=None, down=None, ffn_intermediate=0, router=None, router_bias=None, w13=None, w2=None)
        if shared is not None:
            assert isinstance(shared, MLP)
            fields.update(gate_up=self.packed(shared.gate_up_proj, bias_allowed=False),
                          down=self.packed(shared.down_proj, bias_allowed=False),
                          ffn_intermediate=shared.intermediate_size)
        if not isinstance(mlp, DeepseekMoE):
            return fields
        c, experts, gate = self.model.config, mlp.experts, mlp.gate
        num = c.n_routed_experts
        pairs = self.packs.experts.get(experts)
        if router_kind(c) is None or c.num_experts_per_tok > num:
            raise _Refused("a router without a C kernel")
        if pairs is None or experts.first_expert != 0 or experts.num_local != num:
            raise _Refused("routed experts not packed, or not all on this rank")
        if gate.weight.dtype != torch.float32 or not gate.weight.is_contiguous():
            raise _Refused("the router's weight is not contiguous float32")
        if not all(p.kind.own or p.kind in _QUANTIZED for pair in pairs for p in pair):
            raise _Refused("a routed expert is not in dsserve's own packing")
        self.note_kinds(*(p.kind for pair in pairs for p in pair))

        def address(p) -> int:
            return ctypes.addressof(p.data.struct) if p.kind in _QUANTIZED else p.data.data_ptr()

        pointers = ctypes.c_void_p * num
        fields.update(router=gate.weight, router_bias=gate.e_score_correction_bias,
                      experts=pairs,  # not a struct field: keeps what the pointer arrays point at alive
                      w13=pointers(*(address(w13) for w13, _ in pairs)),
                      w2=pointers(*(address(w2) for _, w2 in pairs)))
        return fields


def router_kind(c) -> int | None:
    """dsserve_mla_decode's router_kind for this config (elementwise.c's two router kernels), None if neither fits."""
    num, groups = c.n_routed_experts, c.n_group
    grouped = bool(groups) and num % groups == 0 and c.topk_group <= groups
    if c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid":
        return 0 if num <= 1024 and grouped and num // groups >= 2 else None
    if c.scoring_func == "softmax" and c.topk_method == "greedy":
        return 1 if num <= 1024 else None
    if c.scoring_func == "softmax" and c.topk_method == "group_limited_greedy":
        return 2 if num <= 1024 and grouped else None
    return None
