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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels
from dsserve.backends.cpu.fused import build_fused_decoder
from dsserve.backends.cpu.packing import Kind, Packer, Packs
from dsserve.backends.torch import AttentionMetadata, TorchBackend, Workspace
from dsserve.formats.quantization import QuantScheme
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
    # Steps whose prompt rows all start at position 0 (fresh prompts, a long prompt's first chunk): each such row's
    # (first flat token, token count), and the flat tokens of the step's one-token rows. A fresh prompt's keys and
    # values are this step's own, so its attention is one causal flash SDPA over them (no cache read); the one-token
    # rows take the kernel.
    fresh_rows: list[tuple[int, int]] | None = None
    single_tokens: torch.Tensor | None = None
    # Steps with prompt tokens, for MLA: each prompt row's (first flat token, token count, start position, row), the
    # flat tokens of the one-token rows and their rows, and the step's block tables (B, max_blocks).
    prompt_rows: list[tuple[int, int, int, int]] | None = None
    one_token: torch.Tensor | None = None
    one_token_rows: torch.Tensor | None = None
    row_tables: torch.Tensor | None = None
    row_starts: torch.Tensor | None = None
    _token_tables: torch.Tensor | None = None
    _splits: dict = field(default_factory=dict, repr=False)

    def split_fresh(self, min_len: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """The fresh rows of at least `min_len` tokens, and the flat tokens of every other row (for the kernel);
        made once per step."""
        split = self._splits.get(min_len)
        if split is None:
            long_rows = [(first, n) for first, n in self.fresh_rows if n >= min_len]
            short = [torch.arange(first, first + n) for first, n in self.fresh_rows if n < min_len]
            split = self._splits[min_len] = (long_rows, torch.cat([self.single_tokens, *short]) if short
                                             else self.single_tokens)
        return split

    def token_tables(self) -> torch.Tensor:
        """Each token's block table (T, max_blocks), made on first use in a step (MLA never needs it)."""
        if self._token_tables is None:
            self._token_tables = self.step_tables[self.token_seq]
        return self._token_tables


class CpuBackend(TorchBackend):
    name = "cpu"
    metadata_class = CpuAttentionMetadata

    def __init__(self, weight_dtype: torch.dtype = torch.float32, quantization: str | None = None):
        super().__init__("cpu")
        self.weight_dtype = weight_dtype
        self.quantization = QuantScheme.parse(quantization) if quantization else None  # --quantization
        self.packs = Packs()
        self.fused = None  # a callable running every decoder layer of a decode step (fused.py), or None
        self.bf16_activations = False
        # SwiGLU's (T, I) activation lives only until down_proj reads it: one buffer for every layer, since a fresh
        # tensor of a long prompt's size (73 MB at 2048 tokens of the 1.5B shape) is mapped and faulted in each time
        self.swiglu_workspace = Workspace()
        self.mla_keys, self.mla_values = Workspace(), Workspace()  # a tile of MLA prompt attention's keys and values

    def prepare(self, model):
        super().prepare(model)
        self._packer = Packer(model, self.weight_dtype, self.quantization)
        self.packs = self._packer.packs
        # AMX bf16 weights round the linear layers' activations to bf16: prompt attention's q, k, v are rounded too
        self.bf16_activations = self._packer.weight_dtype == torch.bfloat16

    def module_loaded(self, module):
        self._packer.module_loaded(module)  # packed as it arrives: loading holds one layer's plain weights at a time
        if self._packer.freed_bytes >= _TRIM_EVERY:  # the freed staging, scattered in the heap, would stay resident
            self._packer.freed_bytes = 0
            _return_freed_memory()

    def weights_loaded(self, model):
        logger.info("packed %d weight matrices (%s%s) for the CPU kernels", self.packs.count,
                    str(self._packer.weight_dtype or "none").removeprefix("torch."),
                    f", quantized {self.quantization.name}, LM head {self.quantization.head.name}" if self.quantization
                    else "")
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
        if not meta.is_decode:
            firsts = (torch.cumsum(query_lens, 0) - query_lens).tolist()
            meta.prompt_rows = [(first, n, start, row) for row, (first, n, start)
                                in enumerate(zip(firsts, query_lens.tolist(), starts.tolist())) if n > 1]
            single = query_lens == 1
            meta.one_token_rows = torch.nonzero(single).squeeze(1)
            meta.one_token = torch.tensor(firsts, dtype=torch.long)[meta.one_token_rows]
            meta.row_tables, meta.row_starts = tables, starts
        if not meta.is_decode and bool((starts <= query_lens).logical_or(query_lens == 1).all()):
            meta.token_lens, meta.step_tables = positions + 1, tables
            meta.token_seq = torch.repeat_interleave(torch.arange(query_lens.numel()), query_lens)
            prompt_rows = query_lens > 1
            if not bool(starts[prompt_rows].any()):
                firsts = (torch.cumsum(query_lens, 0) - query_lens).tolist()
                meta.fresh_rows = [(first, n) for first, n, prompt in zip(firsts, query_lens.tolist(),
                                                                          prompt_rows.tolist()) if prompt]
                meta.single_tokens = torch.tensor([first for first, prompt in zip(firsts, prompt_rows.tolist())
                                                   if not prompt], dtype=torch.long)
        return meta

    # ---- dense ops -------------------------------------------------------------------------------------------------

    def embed(self, layer, ids):
        table = self.packs.embeddings.get(layer)
        return F.embedding(ids, table).float() if table is not None else super().embed(layer, ids)

    def linear(self, layer, x):
        packed = self.packs.linears.get(layer)
        return packed(x) if packed is not None else super().linear(layer, x)

    def gated_linear(self, layer, x):
        packed = self.packs.linears.get(layer)
        if packed is not None and packed.fuses_swiglu and x.dim() == 2 and x.dtype == torch.float32:
            inner = packed.out_features // 2
            out = self.swiglu_workspace.take((x.shape[0], inner), torch.float32)
            swiglu = kernels.linear_w8a8_swiglu if packed.kind is Kind.W8A8 else kernels.linear_bf16_swiglu
            return swiglu(x, packed.data, inner, out=out)
        return super().gated_linear(layer, x)

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
        if table is not None and x.dtype == torch.float32:
            if ids.numel() <= layer.num_local and not table.bf16 and not table.quantized:
                # Few tokens (decode at small batch): one C call over the (token, slot) pairs, no sort
                return kernels.moe_f16(x, weights, ids - layer.first_expert, table)
            # More (prompt steps, large batches): one C call, each active expert's tokens through one GEMM pair
            return kernels.moe_grouped(x, weights, ids - layer.first_expert, table)
        return super().experts(layer, x, weights, ids)

    def expert(self, layer, expert, x):
        pairs = self.packs.experts.get(layer)
        if pairs is None:
            return super().expert(layer, expert, x)
        w13, w2 = pairs[expert]
        if w13.fuses_swiglu and x.dtype == torch.float32:
            swiglu = kernels.linear_w8a8_swiglu if w13.kind is Kind.W8A8 else kernels.linear_bf16_swiglu
            return w2(swiglu(x, w13.data, w13.out_features // 2))
        return w2(self.silu_and_mul(w13(x)))

    # ---- attention -------------------------------------------------------------------------------------------------

    def write_cache(self, cache, slots, first, second, stack):
        if not (first.is_cpu and kernels.cache_write(cache, slots, first, second)):
            super().write_cache(cache, slots, first, second, stack)

    def attention(self, layer, q, k, v, cache, meta):
        head_dim = cache.shape[4]
        if (meta.fresh_rows is None or q.dtype != torch.float32 or q.device.type != "cpu"
                or not _kernel_reads(q, cache, head_dim, head_dim)):
            return super().attention(layer, q, k, v, cache, meta)
        with PROFILER.section("attention"):
            self.write_cache(cache, meta.slot_mapping, k, v, stack=True)
            return self._fresh_attention(layer, q, k, v, cache, meta)

    def _fresh_attention(self, layer, q, k, v, cache, meta):
        """Fresh prompts: per row, causal flash SDPA over the row's own keys and values (query heads grouped over
        the KV heads), in bfloat16 where the linear layers' activations are (bf16 weights on AMX); in float32 only
        for rows of _FP32_FLASH_MIN tokens or more (shorter ones are faster through the per-token kernel). Every
        other token (decode rows, short prompts) through the paged kernel."""
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        bf16 = self.bf16_activations
        gqa = q.shape[1] != k.shape[1]
        long_rows, kernel_tokens = meta.split_fresh(1 if bf16 else _FP32_FLASH_MIN)
        for first, n in long_rows:
            rows = slice(first, first + n)
            # (1, heads, n, D) views: with a batch dimension torch takes its flash kernel (without: the math path, 6x slower)
            qs, ks, vs = (x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            if bf16:
                qs, ks, vs = qs.bfloat16(), ks.bfloat16(), vs.bfloat16()
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=layer.scale, enable_gqa=gqa)
            out[rows] = o[0].transpose(0, 1)
        if kernel_tokens.numel():  # decode rows, short prompts: each token over its prefix of the cache
            tokens = kernel_tokens
            num_kv_heads, head_dim = cache.shape[3], cache.shape[4]
            out[tokens] = kernels.paged_decode(
                q[tokens], cache, meta.token_tables()[tokens], meta.token_lens[tokens], layer.scale,
                num_kv_heads=num_kv_heads, v_dim=head_dim, token_stride=2 * num_kv_heads * head_dim,
                head_stride=head_dim, v_offset=num_kv_heads * head_dim)
        return out

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
        return self._mla_decode(layer, q_nope, q_pe, cache, meta.block_tables, meta.context_lens)

    def _mla_decode(self, layer, q_nope, q_pe, cache, tables, lens):
        """One query per row over its first lens[i] cached latents, in the absorbed form: MQA over C + R dims."""
        num_latent, entry = layer.kv_lora_rank, cache.shape[-1]
        absorbed = self.packs.absorbed.get(layer)
        if absorbed is not None:  # 16-bit weights: both absorbed projections as per-head fp16 GEMVs
            q_latent = kernels.heads_f16(q_nope, absorbed[0])
        else:
            w_kv_b = layer.kv_b_proj.weight.view(layer.num_heads, layer.nope_dim + layer.v_dim, num_latent)
            q_latent = torch.einsum("thn,hnc->thc", q_nope, w_kv_b[:, : layer.nope_dim])  # (T, H, C)
        out_latent = kernels.paged_decode(torch.cat((q_latent, q_pe), dim=-1), cache, tables, lens, layer.scale,
                                          num_kv_heads=1, v_dim=num_latent, token_stride=entry, head_stride=0,
                                          v_offset=0)
        if absorbed is not None:
            return kernels.heads_f16(out_latent, absorbed[1])
        return torch.einsum("thc,hvc->thv", out_latent, w_kv_b[:, layer.nope_dim :])

    def mla_attention(self, layer, q_nope, q_pe, latent, k_pe, cache, meta):
        entry = cache.shape[-1]
        if (meta.prompt_rows is None or q_nope.dtype != torch.float32 or q_nope.device.type != "cpu"
                or (meta.one_token.numel() and not _kernel_reads(q_nope, cache, entry, layer.kv_lora_rank))):
            return super().mla_attention(layer, q_nope, q_pe, latent, k_pe, cache, meta)
        with PROFILER.section("attention"):
            self.write_cache(cache, meta.slot_mapping, latent, k_pe, stack=False)
            out = q_nope.new_empty(q_nope.shape[0], layer.num_heads, layer.v_dim)
            for first, n, start, row in meta.prompt_rows:
                rows = slice(first, first + n)
                out[rows] = self._mla_prompt(layer, q_nope[rows], q_pe[rows], cache, meta.row_tables[row], start)
            if meta.one_token.numel():  # decode rows (and one-token prompts) in the absorbed form over the cache
                tokens, seqs = meta.one_token, meta.one_token_rows
                out[tokens] = self._mla_decode(layer, q_nope[tokens], q_pe[tokens], cache, meta.row_tables[seqs],
                                               meta.row_starts[seqs] + 1)
            return out

    def _mla_prompt(self, layer, q_nope, q_pe, cache, table, start):
        """One prompt row of n tokens at positions start.. under MLA, flash-style over its context in tiles of keys:
        each tile's latents (read from the cache, this step's already in it) expanded into per-head keys and values
        (at most `_mla_tile` positions at a time, never the whole context), one flash SDPA of the queries that see
        the tile (causal where the tile holds this row's own tokens), and the tiles' outputs merged by their
        log-sum-exp. bf16 where the linears' activations are (bf16 weights on AMX). Values are zero-padded to the
        keys' width: torch's CPU flash kernel takes equal widths (the math path is 10x slower)."""
        n, heads, nope, v_dim, rope = q_nope.shape[0], layer.num_heads, layer.nope_dim, layer.v_dim, q_pe.shape[-1]
        num_latent, block_size, width = layer.kv_lora_rank, cache.shape[1], nope + rope
        dtype = torch.bfloat16 if self.bf16_activations else torch.float32
        flat_cache = cache.view(-1, cache.shape[-1])
        expand = self.packs.expanders.get(layer)
        queries = torch.cat((q_nope, q_pe), dim=-1).to(dtype).transpose(0, 1).unsqueeze(0)  # (1, H, n, N + R)
        tile = min(_mla_tile(heads, width), max(start, n))  # the longest span below
        keys = self.mla_keys.take((tile, heads, width), dtype)  # reused: a fresh one is mapped and faulted in
        values = self.mla_values.take((tile, heads, width), dtype)
        values[..., v_dim:].zero_()
        acc = lse = None
        # key tiles: the cached context [0, start) (every query sees all of it), then the row's own tokens (causal:
        # the queries from the tile's first position on, top-left aligned, see exactly the keys at or before them)
        spans = [(a, min(a + tile, start), False) for a in range(0, start, tile)]
        spans += [(a, min(a + tile, start + n), True) for a in range(start, start + n, tile)]
        for a, b, causal in spans:
            m = b - a
            positions = torch.arange(a, b)
            context = flat_cache.index_select(0, table[positions // block_size] * block_size + positions % block_size)
            context = context.float()
            latents = context[:, :num_latent]
            kv = (expand(latents) if expand is not None else F.linear(latents, layer.kv_b_proj.weight))
            kv = kv.view(m, heads, nope + v_dim)
            keys[:m, :, :nope] = kv[..., :nope]
            keys[:m, :, nope:] = context[:, num_latent:].unsqueeze(1)
            values[:m, :, :v_dim] = kv[..., nope:]
            q0 = a - start if causal else 0  # the first query that sees this tile
            o, tile_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                queries[:, :, q0:], keys[:m].transpose(0, 1).unsqueeze(0), values[:m].transpose(0, 1).unsqueeze(0),
                0.0, causal, scale=layer.scale)
            o = o[..., :v_dim].float()  # (1, H, n - q0, V)
            if acc is None:  # the first tile is seen by every query
                acc, lse = o, tile_lse
                continue
            seen, seen_lse = acc[:, :, q0:], lse[:, :, q0:]
            merged = torch.logaddexp(seen_lse, tile_lse)
            seen.mul_((seen_lse - merged).exp_().unsqueeze(-1)).add_(o.mul_((tile_lse - merged).exp_().unsqueeze(-1)))
            seen_lse.copy_(merged)
        return acc[0].transpose(0, 1)

def _mla_tile(heads: int, width: int) -> int:
    """Key positions per tile of MLA prompt attention: the tile's expanded keys and values in about 16 MiB (1344
    positions at V2-Lite's 16 heads, 256 at V3's 128), in whole multiples of 64."""
    return max(256, min(4096, (16 << 20) // (heads * width * 2 * 2) // 64 * 64))


# Float32 prompt rows shorter than this attend through the per-token kernel: at 128-512 tokens it beats torch's
# float32 flash SDPA (16 x 128 tokens, 8 heads of 64: 4.2 against 5.8 ms a layer; 4 x 512: 11.5 against 13.3), at
# 2048 it takes twice as long (162 against 82 ms, 12 heads of 128). In bf16 the flash kernel wins at every length.
_FP32_FLASH_MIN = 1024


_TRIM_EVERY = 256 << 20  # bytes of plain weights freed between two returns of the heap's free pages while loading


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
