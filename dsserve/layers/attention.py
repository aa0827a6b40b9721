"""Attention over the paged KV cache for a whole batch at once: MHA/GQA (K and V per KV head) and MLA (latent).

The batch is flat: T new tokens of B sequences, laid out sequence after sequence. Each step the runner
builds one `AttentionMetadata` (shared by every layer); each layer writes its new K/V (or latent) into
the cache (num_blocks, block_size, ...) at `slot_mapping`, gathers every sequence's blocks into a padded
(B, L = max_blocks * block_size) view (whole blocks: few large copies), and runs one masked attention
call for the batch. No Python loop over sequences. On CPU, with the compiled kernel (kernels/paged_attention.c), MHA /
GQA steps skip the gather instead: every token, decode row or prompt token, is a query over its own prefix of its
sequence's cache, read in place (causal by length; no padding, no mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.profiling import PROFILER


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each query may see; built once per step."""

    slot_mapping: torch.Tensor  # (T,) cache slot of each new token
    query_index: torch.Tensor  # (B, Q) flat token index of each padded query (padding -> 0)
    query_valid: torch.Tensor  # (B, Q) True where the padded query is a real token
    block_tables: torch.Tensor  # (B, max_blocks) cache block ids of each sequence (padding -> 0)
    attn_mask: torch.Tensor  # (B, 1, Q, L) True where query may attend to key (causal and in-length)
    is_decode: bool  # every sequence has exactly one new token
    # A step mixing decode rows and prompt chunks: ((decode rows' metadata, their flat token indices),
    # (the chunks' metadata, theirs)); the fields above are then unused but slot_mapping.
    parts: tuple | None = None
    workspace: "Workspace | None" = None  # CPU: where `gather` copies the context (reused by every layer)
    context_lens: torch.Tensor | None = None  # (B,) tokens each sequence attends to, this step's included
    # Steps with prompt tokens, on CPU: every token as a query of its own, causal by its length: the keys it sees
    # (T,) = its position + 1, and its sequence (T,) in the step's block tables (B, max_blocks). The decode kernel
    # then serves the whole step (no split, no padding, no mask, no gathered context): kernels/paged_attention.c.
    token_lens: torch.Tensor | None = None
    token_seq: torch.Tensor | None = None
    step_tables: torch.Tensor | None = None
    _biases: dict = field(default_factory=dict, repr=False)
    _token_tables: torch.Tensor | None = field(default=None, repr=False)

    def token_tables(self) -> torch.Tensor:
        """Each token's block table (T, max_blocks), made on first use in a step (MLA and the torch path never
        need it)."""
        if self._token_tables is None:
            self._token_tables = self.step_tables[self.token_seq]
        return self._token_tables

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`attn_mask` as an additive mask (0 / -inf) of `dtype`, made once per step rather than in every layer."""
        bias = self._biases.get(dtype)
        if bias is None:
            bias = torch.zeros(self.attn_mask.shape, dtype=dtype, device=self.attn_mask.device)
            bias = self._biases[dtype] = bias.masked_fill_(~self.attn_mask, float("-inf"))
        return bias

    def pad_queries(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, Q, ...)."""
        if self.is_decode:  # one token per sequence, in sequence order: a view
            return x.unsqueeze(1)
        return x[self.query_index]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, ...) -> (T, ...), in flat token order."""
        if self.is_decode:
            return x.squeeze(1)
        return x[self.query_valid]

    def write(self, cache: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's (T, ...) entries at their slots of cache (num_blocks, block_size, ...)."""
        cache.view(-1, *cache.shape[2:]).index_copy_(0, self.slot_mapping, values.to(cache.dtype))

    def write_pair(self, cache: torch.Tensor, first: torch.Tensor, second: torch.Tensor, stack: bool) -> None:
        """`write` of each token's entry made of `first` then `second` (K then V: `stack`; the latent then the rope
        key: concatenated): one C call on CPU (kernels/elementwise.c), no stacked copy; torch otherwise."""
        if first.is_cpu and cpu_kernels.cache_write(cache, self.slot_mapping, first, second):
            return
        self.write(cache, torch.stack((first, second), dim=1) if stack else torch.cat((first, second), dim=-1))

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """Every sequence's context: (B, L, ...) with L = max_blocks * block_size. Whole blocks are copied with
        index_select (memcpy-sized pieces; about twice as fast on CPU as advanced indexing), into the step's
        workspace where there is one."""
        batch, num_blocks = self.block_tables.shape
        ids = self.block_tables.flatten()
        if self.workspace is None:
            picked = cache.index_select(0, ids)  # (B * max_blocks, block_size, ...)
        else:
            out = self.workspace.take((ids.numel(), *cache.shape[1:]), cache.dtype)
            picked = torch.index_select(cache, 0, ids, out=out)
        return picked.view(batch, num_blocks * cache.shape[1], *cache.shape[2:])


class Workspace:
    """A reusable CPU buffer for the gathered context. Within a step every layer gathers the same amount, and
    index_select into an existing tensor is 2-3x faster on CPU than into a fresh one (docs/benchmarks.md:
    a 17 MB gather per layer at batch 64 takes 1.0 ms instead of 2.7 ms). It grows to the largest step
    seen (at most what one layer's gather allocated before) and is not shrunk."""

    def __init__(self) -> None:
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < numel:
            flat = self._flat[dtype] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """MHA/GQA. q (T, H, D); k, v (T, Hkv, D); cache (num_blocks, block_size, 2, Hkv, D). Returns (T, H, D)."""
    with PROFILER.section("attention"):
        return _paged_attention(q, k, v, cache, meta, scale)


def _paged_attention(q, k, v, cache, meta, scale):
    meta.write_pair(cache, k, v, stack=True)
    num_kv_heads, head_dim = cache.shape[3], cache.shape[4]
    if meta.token_lens is not None and _kernel_reads(q, cache, head_dim, head_dim):
        # Each token over its own prefix of its sequence's cache, read in place: causal by length.
        return cpu_kernels.paged_decode(q, cache, meta.token_tables(), meta.token_lens, scale,
                                        num_kv_heads=num_kv_heads, v_dim=head_dim,
                                        token_stride=2 * num_kv_heads * head_dim, head_stride=head_dim,
                                        v_offset=num_kv_heads * head_dim)
    if meta.parts is not None:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        for part, token_index in meta.parts:
            out.index_copy_(0, token_index, _attend(q.index_select(0, token_index), cache, part, scale))
        return out
    return _attend(q, cache, meta, scale)


def _attend(q, cache, meta, scale):
    num_kv_heads, head_dim = cache.shape[3], cache.shape[4]
    if _use_cpu_kernel(meta, q, cache, head_dim, head_dim):  # reads the blocks in place: no copy, no padding mask
        return cpu_kernels.paged_decode(q, cache, meta.block_tables, meta.context_lens, scale,
                                        num_kv_heads=num_kv_heads, v_dim=head_dim,
                                        token_stride=2 * num_kv_heads * head_dim, head_stride=head_dim,
                                        v_offset=num_kv_heads * head_dim)
    context = meta.gather(cache).to(q.dtype)  # (B, L, 2, Hkv, D); a float16 cache widens to the compute dtype
    keys = context[:, :, 0].transpose(1, 2)  # (B, Hkv, L, D)
    values = context[:, :, 1].transpose(1, 2)
    return meta.unpad(_grouped_attention(meta.pad_queries(q), keys, values, meta, scale))


def mla_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    w_kv_b: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    absorbed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MLA over a cache of normalized latents + rope keys.

    q_nope (T, H, N), q_pe (T, H, R), latent (T, C) normalized, k_pe (T, R) rotated,
    w_kv_b (H, N + V, C) the kv_b_proj weight, cache (num_blocks, block_size, C + R). Returns (T, H, V).
    Decode uses the absorbed form (queries projected into latent space: attention is MQA over C + R dims);
    steps with prefill tokens expand the context latents into per-head keys and values. `absorbed`: W_UK^T and
    W_UV packed per head for backends.cpu.kernels.heads_f16 (CPU, float16 weights), used by the decode kernel path.
    """
    with PROFILER.section("attention"):
        return _mla_attention(q_nope, q_pe, latent, k_pe, w_kv_b, cache, meta, scale, absorbed)


def _mla_attention(q_nope, q_pe, latent, k_pe, w_kv_b, cache, meta, scale, absorbed=None):
    meta.write_pair(cache, latent, k_pe, stack=False)
    if meta.parts is not None:
        out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_kv_b.shape[1] - q_nope.shape[-1])
        for part, token_index in meta.parts:
            q_n, q_p = q_nope.index_select(0, token_index), q_pe.index_select(0, token_index)
            out.index_copy_(0, token_index, _mla_attend(q_n, q_p, latent.shape[-1], w_kv_b, cache, part, scale, absorbed))
        return out
    return _mla_attend(q_nope, q_pe, latent.shape[-1], w_kv_b, cache, meta, scale, absorbed)


def _mla_attend(q_nope, q_pe, num_latent, w_kv_b, cache, meta, scale, absorbed=None):
    num_nope = q_nope.shape[-1]
    w_uk, w_uv = w_kv_b[:, :num_nope], w_kv_b[:, num_nope:]  # (H, N, C), (H, V, C)
    if meta.is_decode and _use_cpu_kernel(meta, q_nope, cache, cache.shape[-1], num_latent):
        if absorbed is not None:  # fp16 weights: both absorbed projections as per-head fp16 GEMVs
            q_latent = cpu_kernels.heads_f16(q_nope, absorbed[0])
            out_latent = cpu_kernels.paged_decode(torch.cat((q_latent, q_pe), dim=-1), cache, meta.block_tables,
                                                  meta.context_lens, scale, num_kv_heads=1, v_dim=num_latent,
                                                  token_stride=cache.shape[-1], head_stride=0, v_offset=0)
            return cpu_kernels.heads_f16(out_latent, absorbed[1])
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # (T, H, C)
        entry = cache.shape[-1]  # C + R: the whole entry is the key, its first C values the value
        out_latent = cpu_kernels.paged_decode(torch.cat((q_latent, q_pe), dim=-1), cache, meta.block_tables,
                                              meta.context_lens, scale, num_kv_heads=1, v_dim=num_latent,
                                              token_stride=entry, head_stride=0, v_offset=0)
        return torch.einsum("thc,hvc->thv", out_latent, w_uv)
    context = meta.gather(cache).to(q_nope.dtype)  # (B, L, C + R); a float16 cache widens to the compute dtype
    if meta.is_decode:
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # (T, H, C)
        queries = meta.pad_queries(torch.cat((q_latent, q_pe), dim=-1))  # (B, Q, H, C + R)
        keys = context.unsqueeze(1)  # (B, 1, L, C + R): one KV "head" shared by all heads
        out_latent = _grouped_attention(queries, keys, keys[..., :num_latent], meta, scale)  # (B, Q, H, C)
        return torch.einsum("thc,hvc->thv", meta.unpad(out_latent), w_uv)
    num_heads = w_kv_b.shape[0]
    kv = torch.einsum("blc,hkc->bhlk", context[..., :num_latent], w_kv_b)  # (B, H, L, N + V)
    k_rope = context[..., num_latent:].unsqueeze(1).expand(-1, num_heads, -1, -1)  # (B, H, L, R)
    keys = torch.cat((kv[..., :num_nope], k_rope), dim=-1)  # (B, H, L, N + R)
    queries = meta.pad_queries(torch.cat((q_nope, q_pe), dim=-1))  # (B, Q, H, N + R)
    return meta.unpad(_grouped_attention(queries, keys, kv[..., num_nope:], meta, scale))  # (T, H, V)


def _use_cpu_kernel(meta: AttentionMetadata, q: torch.Tensor, cache: torch.Tensor, k_dim: int, v_dim: int) -> bool:
    """Decode rows on CPU in float32, with the compiled kernel available for these head sizes (backends/cpu/kernels.py)."""
    return meta.is_decode and meta.context_lens is not None and _kernel_reads(q, cache, k_dim, v_dim)


def _kernel_reads(q: torch.Tensor, cache: torch.Tensor, k_dim: int, v_dim: int) -> bool:
    """The compiled attention kernel serves float32 queries on CPU over this cache and these head sizes."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and cache.is_contiguous()
            and cpu_kernels.usable(k_dim, v_dim, cache.dtype))


def _grouped_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with G = H / Hkv query heads per KV head, without copying K or V per head.

    queries (B, Q, H, D), keys (B, Hkv, L, D), values (B, Hkv, L, Dv), meta.attn_mask (B, 1, Q, L) -> (B, Q, H, Dv).
    The G query heads of a KV head become G * Q rows against that head's keys (rows are independent),
    so one fused attention call serves GQA and MLA's single latent "head" alike.
    """
    batch, num_queries, num_heads, _ = queries.shape
    num_kv_heads, context_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    q = queries.view(batch, num_queries, num_kv_heads, group, -1).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Q, D)
    q = q.reshape(batch, num_kv_heads, group * num_queries, -1)
    if keys.shape[-1] == values.shape[-1]:
        # The fused CPU/GPU kernel (it needs equal K and V widths), with the step's additive mask.
        mask = meta.attn_bias(q.dtype)
        if group > 1 and num_queries > 1:  # rows are (group, query): repeat the queries' mask per group
            mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(batch, 1, group * num_queries, context_len)
        # (decode: one query per sequence, so the (B, 1, 1, L) mask broadcasts over the group's rows as it is)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # (B, Hkv, G*Q, Dv)
    else:
        # MLA: K is latent + rope (C + R), V the latent (C). Two matmuls, softmax in float32.
        scores = torch.matmul(q, keys.transpose(-1, -2)).view(batch, num_kv_heads, group, num_queries, context_len)
        scores = scores.float().mul_(scale).add_(meta.attn_bias(torch.float32).unsqueeze(1))
        probs = scores.softmax(dim=-1).to(values.dtype).view(batch, num_kv_heads, group * num_queries, context_len)
        out = torch.matmul(probs, values)  # (B, Hkv, G*Q, Dv)
    out = out.view(batch, num_kv_heads, group, num_queries, -1)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, num_queries, num_heads, -1)
