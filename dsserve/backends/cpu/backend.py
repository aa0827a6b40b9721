"""The CPU backend: the torch reference's ops, with dsserve's C kernels where they serve the call.

Linear layers, routed experts and the LM head run on packed weights (packing.py); RMSNorm, rotary, silu * up, the
MoE routers and the cache store are one C call each on float32 CPU tensors; decode attention reads the paged cache
in place (csrc/paged_attention.c), and so does every token of a prompt step where its earlier context is at most its
own chunk's length; a decode step runs every layer in one C call where every layer can (fused.py). Whatever a kernel
does not take (another dtype, a head size the kernel's vectors do not divide, a library that did not build) takes
the reference path: slower, the same results.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

from dsserve.backends.cpu import kernels
from dsserve.backends.cpu.fused import build_fused_decoder
from dsserve.backends.cpu.packing import Packer, Packs
from dsserve.backends.torch import AttentionMetadata, TorchBackend
from dsserve.profiling import PROFILER

logger = logging.getLogger(__name__)


@dataclass
class CpuAttentionMetadata(AttentionMetadata):
    # Steps with prompt tokens: every token as a query of its own, causal by its length: the keys it sees (T,) = its
    # position + 1, its sequence (T,) in the step's block tables (B, max_blocks). The decode kernel then serves the
    # whole step (no split, no padding, no mask, no gathered context).
    token_lens: torch.Tensor | None = None
    token_seq: torch.Tensor | None = None
    step_tables: torch.Tensor | None = None
    _token_tables: torch.Tensor | None = None

    def token_tables(self) -> torch.Tensor:
        """Each token's block table (T, max_blocks), made on first use in a step (MLA never needs it)."""
        if self._token_tables is None:
            self._token_tables = self.step_tables[self.token_seq]
        return self._token_tables


class CpuBackend(TorchBackend):
    name = "cpu"
    metadata_class = CpuAttentionMetadata

    def __init__(self, weight_dtype: torch.dtype = torch.float32):
        super().__init__("cpu")
        self.weight_dtype = weight_dtype
        self.packs = Packs()
        self.fused = None  # a callable running every decoder layer of a decode step (fused.py), or None

    def prepare(self, model):
        super().prepare(model)
        self._packer = Packer(model, self.weight_dtype)
        self.packs = self._packer.packs

    def module_loaded(self, module):
        self._packer.module_loaded(module)  # packed as it arrives: loading holds one layer in float32 at a time

    def weights_loaded(self, model):
        logger.info("packed %d weight matrices (%s) for the CPU kernels", self.packs.count,
                    str(self._packer.weight_dtype or torch.float32).removeprefix("torch."))
        _return_freed_memory()

    def set_kv_caches(self, model, kv_caches):
        self.fused = build_fused_decoder(model, self.packs, kv_caches) if kernels.library() is not None else None

    def describe(self) -> str:
        if kernels.library() is None:
            return f"cpu (kernel library unavailable: {kernels.why_unavailable()}; torch reference ops)"
        kinds = sorted({p.kind.value for p in self.packs.linears.values()})
        return (f"cpu (linears: {', '.join(kinds) or 'F.linear'}; decode attention: csrc/paged_attention.c; "
                f"decode steps: {'every layer in one C call' if self.fused is not None else 'layer by layer'})")

    def forward(self, model, input_ids, positions, meta, kv_caches):
        if self.fused is not None and meta.is_decode and meta.parts is None and meta.context_lens is not None:
            hidden = model.embed_tokens.embed(input_ids)
            with PROFILER.section("fused_layers"):  # attention included: it has no section of its own here
                self.fused(hidden, positions, meta.slot_mapping, meta.block_tables, meta.context_lens, kv_caches)
            return model.norm(hidden)
        return model(input_ids, positions, meta, kv_caches)

    def attention_metadata(self, query_lens, starts, tables, positions, slot_mapping, block_size, device):
        meta = super().attention_metadata(query_lens, starts, tables, positions, slot_mapping, block_size, device)
        # The kernel per token reads only the keys a token may see, but each token reads them alone; the masked SDPA
        # reuses each key across a block of queries but pays for the gather, the padding and the masked part of the
        # rectangle. Per token the kernel wins while a chunk's earlier context is at most its own length (fresh
        # prompts, a long prompt's first chunk); a chunk continuing a long context is faster on the SDPA path.
        if not meta.is_decode and bool((starts <= query_lens).logical_or(query_lens == 1).all()):
            meta.token_lens, meta.step_tables = positions + 1, tables
            meta.token_seq = torch.repeat_interleave(torch.arange(query_lens.numel()), query_lens)
        return meta

    # ---- dense ops -------------------------------------------------------------------------------------------------

    def linear(self, layer, x):
        packed = self.packs.linears.get(layer)
        return packed(x) if packed is not None else super().linear(layer, x)

    def silu_and_mul(self, gate_up):
        if gate_up.dim() == 2 and kernels.fused_ops_usable(gate_up):
            return kernels.silu_mul(gate_up)
        return super().silu_and_mul(gate_up)

    def rms_norm(self, layer, x):
        if kernels.fused_ops_usable(x):
            return kernels.rms_norm(x, layer.weight, layer.eps)
        return super().rms_norm(layer, x)

    def rotary(self, layer, positions, xs):
        if layer.cos.dtype == torch.float32 and kernels.fused_ops_usable(xs[0]):  # one C call per x, no tables
            return tuple(kernels.rotary(x, positions, layer.cos, layer.sin, layer.interleaved) for x in xs)
        return super().rotary(layer, positions, xs)

    # ---- MoE -------------------------------------------------------------------------------------------------------

    def route(self, layer, x):
        c = layer.config
        if kernels.fused_ops_usable(x):
            normalize = c.norm_topk_prob and c.num_experts_per_tok > 1
            routed = None
            if c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid":  # V3 / R1: ~15 torch ops otherwise
                routed = kernels.router_noaux(x, layer.weight, layer.e_score_correction_bias, c.n_group, c.topk_group,
                                              c.num_experts_per_tok, normalize, c.routed_scaling_factor)
            elif c.scoring_func == "softmax" and c.topk_method in ("greedy", "group_limited_greedy"):  # V2
                routed = kernels.router_softmax(x, layer.weight, c.n_group, c.topk_group, c.num_experts_per_tok,
                                                c.topk_method == "group_limited_greedy", normalize,
                                                c.routed_scaling_factor)
            if routed is not None:
                return routed
        return super().route(layer, x)

    def experts(self, layer, x, weights, ids):
        table = self.packs.expert_tables.get(layer)
        if table is not None and ids.numel() <= layer.num_local and x.dtype == torch.float32:
            # Few tokens (decode at small batch): one C call over the (token, slot) pairs, no sort, no per-expert ops
            return kernels.moe_f16(x, weights, ids - layer.first_expert, table)
        return super().experts(layer, x, weights, ids)

    def expert(self, layer, expert, x):
        pairs = self.packs.experts.get(layer)
        if pairs is None:
            return super().expert(layer, expert, x)
        w13, w2 = pairs[expert]
        return w2(self.silu_and_mul(w13(x)))

    # ---- attention -------------------------------------------------------------------------------------------------

    def write_cache(self, cache, slots, first, second, stack):
        if not (first.is_cpu and kernels.cache_write(cache, slots, first, second)):
            super().write_cache(cache, slots, first, second, stack)

    def attend_step(self, layer, q, v_dim, cache, meta):
        num_kv_heads, head_dim = cache.shape[3], cache.shape[4]
        if meta.token_lens is not None and _kernel_reads(q, cache, head_dim, head_dim):
            # Each token over its own prefix of its sequence's cache, read in place: causal by length.
            return kernels.paged_decode(q, cache, meta.token_tables(), meta.token_lens, layer.scale,
                                        num_kv_heads=num_kv_heads, v_dim=head_dim,
                                        token_stride=2 * num_kv_heads * head_dim, head_stride=head_dim,
                                        v_offset=num_kv_heads * head_dim)
        return super().attend_step(layer, q, v_dim, cache, meta)

    def attend(self, layer, q, cache, meta):
        num_kv_heads, head_dim = cache.shape[3], cache.shape[4]
        if meta.is_decode and meta.context_lens is not None and _kernel_reads(q, cache, head_dim, head_dim):
            # reads the blocks in place: no copy, no padding mask
            return kernels.paged_decode(q, cache, meta.block_tables, meta.context_lens, layer.scale,
                                        num_kv_heads=num_kv_heads, v_dim=head_dim,
                                        token_stride=2 * num_kv_heads * head_dim, head_stride=head_dim,
                                        v_offset=num_kv_heads * head_dim)
        return super().attend(layer, q, cache, meta)

    def mla_attend(self, layer, q_nope, q_pe, cache, meta):
        num_latent, entry = layer.kv_lora_rank, cache.shape[-1]  # entry C + R: the key; its first C values the value
        if not (meta.is_decode and meta.context_lens is not None and _kernel_reads(q_nope, cache, entry, num_latent)):
            return super().mla_attend(layer, q_nope, q_pe, cache, meta)
        absorbed = self.packs.absorbed.get(layer)
        if absorbed is not None:  # 16-bit weights: both absorbed projections as per-head fp16 GEMVs
            q_latent = kernels.heads_f16(q_nope, absorbed[0])
        else:
            w_kv_b = layer.kv_b_proj.weight.view(layer.num_heads, layer.nope_dim + layer.v_dim, num_latent)
            q_latent = torch.einsum("thn,hnc->thc", q_nope, w_kv_b[:, : layer.nope_dim])  # (T, H, C)
        out_latent = kernels.paged_decode(torch.cat((q_latent, q_pe), dim=-1), cache, meta.block_tables,
                                          meta.context_lens, layer.scale, num_kv_heads=1, v_dim=num_latent,
                                          token_stride=entry, head_stride=0, v_offset=0)
        if absorbed is not None:
            return kernels.heads_f16(out_latent, absorbed[1])
        return torch.einsum("thc,hvc->thv", out_latent, w_kv_b[:, layer.nope_dim :])


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Packing frees each layer's float32 weights
    as it goes; pieces of them left in the heap between live allocations would otherwise stay resident (0.3 GiB on
    the R1-Distill-Qwen-1.5B shape) and be counted as used when the KV cache is sized from free memory."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def _kernel_reads(q: torch.Tensor, cache: torch.Tensor, k_dim: int, v_dim: int) -> bool:
    """The compiled attention kernel serves float32 queries on CPU over this cache and these head sizes."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and cache.is_contiguous()
            and kernels.usable(k_dim, v_dim, cache.dtype))
