"""The plain-torch backend: the reference every kernel is tested against, and what runs where no kernel does.

Attention reads the paged cache by gathering each sequence's blocks into a (B, L, ...) context and running one masked
softmax attention per step. Queries are padded per sequence to the step's longest query count; a step mixing decode
rows with prompt chunks is split in two parts (`AttentionMetadata.parts`), so decode rows are not padded to a chunk's
length. Each query attends to keys at positions <= its own (causal, and bounded by its sequence's length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsserve.backends.base import Backend
from dsserve.formats.quantization import QuantScheme, reference_linear
from dsserve.profiling import PROFILER


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each query may see; built once per step."""

    slot_mapping: torch.Tensor  # (T,) cache slot of each new token
    query_index: torch.Tensor | None  # (B, Q) flat token index of each padded query (padding -> 0)
    query_valid: torch.Tensor | None  # (B, Q) True where the padded query is a real token
    block_tables: torch.Tensor | None  # (B, max_blocks) cache block ids of each sequence (padding -> 0)
    attn_mask: torch.Tensor | None  # (B, 1, Q, L) True where query may attend to key (causal and in-length)
    is_decode: bool  # every sequence has exactly one new token
    context_lens: torch.Tensor | None = None  # (B,) tokens each sequence attends to, this step's included
    # A step mixing decode rows and prompt chunks: ((decode rows' metadata, their flat token indices),
    # (the chunks' metadata, theirs)); the fields above are then unused but slot_mapping.
    parts: tuple | None = None
    workspace: Workspace | None = None  # CPU: where `gather` copies the context (reused by every layer)
    _biases: dict = field(default_factory=dict, repr=False)

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
    index_select into an existing tensor is 2-3x faster on CPU than into a fresh one (a 17 MB gather per layer at
    batch 64: 1.0 ms instead of 2.7 ms). It grows to the largest step seen and is not shrunk."""

    def __init__(self) -> None:
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < numel:
            flat = self._flat[dtype] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


class TorchBackend(Backend):
    name = "torch"
    metadata_class = AttentionMetadata  # what attention_metadata builds (a backend may add fields)

    def __init__(self, device: torch.device | str = "cpu", quantization: str | None = None):
        self.device = torch.device(device)
        # CPU: one reused buffer for the attention context gathered from the paged cache (device allocators cache)
        self.workspace = Workspace() if self.device.type == "cpu" else None
        self._rotary_positions: torch.Tensor | None = None  # the step's positions the cached tables belong to
        self._rotary_tables: dict[int, tuple[torch.Tensor, ...]] = {}
        # --quantization on this backend: the weights held quantized (on the model's device), each product computed
        # by the plain-torch reference (formats/quantization.py reference_linear: dequantize, then the float op).
        # Correct on any device, not fast: it is what a quantized model runs on a GPU until the CUDA backend exists.
        self._scheme = QuantScheme.parse(quantization) if quantization else None
        self._quantized: dict[nn.Module, object] = {}  # a Linear -> its QuantizedWeight; an ExpertMLP -> (w13, w2)

    def prepare(self, model: nn.Module) -> None:
        for module in model.modules():
            module.backend = self
        if self._scheme is not None:  # what the CPU packer quantizes too (backends/cpu/packing.py Packer)
            self._float_linears = {m.kv_b_proj for m in model.modules() if hasattr(m, "kv_b_proj")}
            self._head = getattr(model, "lm_head", None)
            self._embedding = getattr(model, "embed_tokens", None)

    def module_loaded(self, module: nn.Module) -> None:
        """With --quantization: every Linear but MLA's kv_b_proj, every routed expert in the scheme, the LM head in
        int8, quantized as it loads and its float weight dropped."""
        if self._scheme is None:
            return
        from dsserve.layers.linear import Linear
        from dsserve.layers.moe import ExpertMLP

        if isinstance(module, Linear) and module not in self._float_linears and module.weight is not None:
            self._quantized[module] = self._scheme.quantize(module.weight.detach())
            module.weight = None
        elif isinstance(module, ExpertMLP) and module.w13 is not None:
            self._quantized[module] = (self._scheme.quantize(module.w13.detach()),
                                       self._scheme.quantize(module.w2.detach()))
            module.w13 = module.w2 = None
        elif module is self._head and module.weight is not None:
            self._quantized[module] = self._scheme.head.quantize(module.weight.detach())
            if module is not self._embedding:  # a tied head's table is still looked up
                module.weight = None

    def describe(self) -> str:
        if self._scheme is None:
            return self.name
        return (f"{self.name} (quantized {self._scheme.name}, LM head {self._scheme.head.name}: plain-torch reference "
                "products)")

    # ---- step metadata ---------------------------------------------------------------------------------------------

    def attention_metadata(self, query_lens, starts, tables, positions, slot_mapping, block_size, device):
        num_seqs = query_lens.numel()
        if positions.numel() == num_seqs:  # every row computes at least one token, so exactly one each: fewer ops
            num_context_blocks = int(starts.max()) // block_size + 1
            key_pos = torch.arange(num_context_blocks * block_size)
            mask = key_pos.view(1, 1, 1, -1) <= starts.view(-1, 1, 1, 1)  # (B, 1, 1, L)
            return self.metadata_class(
                slot_mapping=slot_mapping.to(device), query_index=None, query_valid=None,
                block_tables=tables[:, :num_context_blocks].to(device), attn_mask=mask.to(device), is_decode=True,
                workspace=self.workspace, context_lens=(starts + 1).to(device))
        decode_rows = query_lens == 1
        num_decode = int(decode_rows.sum())
        if 0 < num_decode < num_seqs:
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)
            parts = []
            for rows in (decode_rows, ~decode_rows):
                token_index = torch.nonzero(rows[seq_of_token]).squeeze(1)  # the rows' tokens, in flat order
                part = _rows_metadata(query_lens[rows], starts[rows], tables[rows], block_size, device)
                part.workspace = self.workspace
                parts.append((part, token_index.to(device)))
            return self.metadata_class(slot_mapping=slot_mapping.to(device), query_index=None, query_valid=None,
                                       block_tables=None, attn_mask=None, is_decode=False, parts=tuple(parts))
        meta = _rows_metadata(query_lens, starts, tables, block_size, device, self.metadata_class)
        meta.slot_mapping = slot_mapping.to(device)
        meta.workspace = self.workspace
        return meta

    # ---- dense ops -------------------------------------------------------------------------------------------------

    def embed(self, layer, ids):
        return F.embedding(ids, layer.weight)

    def linear(self, layer, x):
        if self._quantized:
            weight = self._quantized.get(layer)
            if weight is not None:
                return reference_linear(x, weight, layer.bias).to(x.dtype)
        return F.linear(x, layer.weight, layer.bias)

    def silu_and_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rms_norm(self, layer, x):
        if x.dtype == torch.float32:  # one fused call, the same products in the same order
            return F.rms_norm(x, layer.weight.shape, layer.weight, layer.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + layer.eps)
        return layer.weight * x32.to(x.dtype)

    def rotary(self, layer, positions, xs):
        cos, sin, cos_full, sin_signed = self._step_tables(layer, positions)
        out = []
        for x in xs:
            if layer.interleaved:
                x1, x2 = x[..., 0::2], x[..., 1::2]
                out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
            else:
                # x * [cos|cos] + [x2|x1] * [-sin|sin]: the split form's products and sums (a sign moved), three ops
                x1, x2 = x.chunk(2, dim=-1)
                out.append(torch.addcmul(x * cos_full, torch.cat((x2, x1), dim=-1), sin_signed))
        return tuple(out)

    def _step_tables(self, layer, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cos/sin of this step's positions, computed once per step and rotary: every layer passes the same tensor."""
        if positions is not self._rotary_positions:
            self._rotary_positions, self._rotary_tables = positions, {}
        tables = self._rotary_tables.get(id(layer))
        if tables is None:
            cos = layer.cos[positions].unsqueeze(1)  # (T, 1, dim/2)
            sin = layer.sin[positions].unsqueeze(1)
            full = (torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)) if not layer.interleaved else (None, None)
            tables = self._rotary_tables[id(layer)] = (cos, sin, *full)
        return tables

    # ---- MoE -------------------------------------------------------------------------------------------------------

    def route(self, layer, x):
        c = layer.config
        logits = F.linear(x.float(), layer.weight)  # (T, E)
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        num_tokens = scores.shape[0]
        if c.topk_method == "noaux_tc":
            # The bias steers selection only; the weights are the unbiased scores. Group score = sum of top-2.
            choice = scores + layer.e_score_correction_bias
            group_scores = choice.view(num_tokens, c.n_group, -1).topk(2, dim=-1).values.sum(-1)  # (T, G)
            choice = _mask_groups(choice, group_scores, c.n_group, c.topk_group, float("-inf"))
            ids = choice.topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        elif c.topk_method == "group_limited_greedy":
            group_scores = scores.view(num_tokens, c.n_group, -1).max(dim=-1).values  # (T, G)
            masked = _mask_groups(scores, group_scores, c.n_group, c.topk_group, 0.0)
            weights, ids = masked.topk(c.num_experts_per_tok, dim=-1, sorted=False)
        else:
            weights, ids = scores.topk(c.num_experts_per_tok, dim=-1, sorted=False)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, ids

    def experts(self, layer, x, weights, ids):
        """Tokens sorted by expert; one SwiGLU (`expert`) per active expert over its tokens."""
        num_tokens, top_k = ids.shape
        local_ids = ids.flatten() - layer.first_expert  # (T*k,)
        mine = (local_ids >= 0) & (local_ids < layer.num_local)
        local_ids = torch.where(mine, local_ids, layer.num_local)  # other ranks' experts sort last, never computed
        order = local_ids.argsort(stable=True)
        token_of = order // top_k  # source token of each sorted slot
        counts = torch.bincount(local_ids, minlength=layer.num_local + 1)[: layer.num_local].tolist()
        num_mine = sum(counts)
        order, token_of = order[:num_mine], token_of[:num_mine]
        sorted_x = x[token_of]  # (slots, D)
        sorted_out = torch.empty_like(sorted_x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            sorted_out[start:end] = self.expert(layer, expert, sorted_x[start:end])
            start = end
        sorted_out *= weights.flatten()[order].unsqueeze(1).to(sorted_out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, sorted_out)

    def expert(self, layer, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One local expert's SwiGLU over its tokens x (n, D)."""
        mlp = layer.mlps[expert]
        if self._quantized:
            pair = self._quantized.get(mlp)
            if pair is not None:
                return reference_linear(self.silu_and_mul(reference_linear(x, pair[0])), pair[1]).to(x.dtype)
        return F.linear(self.silu_and_mul(F.linear(x, mlp.w13)), mlp.w2)

    # ---- attention -------------------------------------------------------------------------------------------------

    def attention(self, layer, q, k, v, cache, meta):
        with PROFILER.section("attention"):
            self.write_cache(cache, meta.slot_mapping, k, v, stack=True)
            return self.attend_step(layer, q, v.shape[-1], cache, meta)

    def attend_step(self, layer, q, v_dim, cache, meta):
        """MHA / GQA of the step's queries (T, H, D) over the cache (this step's entries already in it)."""
        return self._by_part(meta, (*q.shape[:2], v_dim), (q,), lambda part, q: self.attend(layer, q, cache, part))

    def attend(self, layer, q, cache, meta):
        """MHA / GQA of queries (T, H, D) over one part of the step (no parts inside)."""
        context = meta.gather(cache).to(q.dtype)  # (B, L, 2, Hkv, D); a float16 cache widens to the compute dtype
        keys = context[:, :, 0].transpose(1, 2)  # (B, Hkv, L, D)
        values = context[:, :, 1].transpose(1, 2)
        return meta.unpad(_grouped_attention(meta.pad_queries(q), keys, values, meta, layer.scale))

    def mla_attention(self, layer, q_nope, q_pe, latent, k_pe, cache, meta):
        with PROFILER.section("attention"):
            self.write_cache(cache, meta.slot_mapping, latent, k_pe, stack=False)
            shape = (q_nope.shape[0], q_nope.shape[1], layer.v_dim)
            return self._by_part(meta, shape, (q_nope, q_pe),
                                 lambda part, q_nope, q_pe: self.mla_attend(layer, q_nope, q_pe, cache, part))

    def mla_attend(self, layer, q_nope, q_pe, cache, meta):
        """MLA over one part of the step. Decode uses the absorbed form (queries projected into latent space:
        attention is MQA over C + R dims); steps with prompt tokens expand the context latents into per-head keys
        and values."""
        num_nope, num_latent = q_nope.shape[-1], layer.kv_lora_rank
        w_kv_b = layer.kv_b_proj.weight.view(layer.num_heads, num_nope + layer.v_dim, num_latent)
        w_uk, w_uv = w_kv_b[:, :num_nope], w_kv_b[:, num_nope:]  # (H, N, C), (H, V, C)
        context = meta.gather(cache).to(q_nope.dtype)  # (B, L, C + R); a float16 cache widens to the compute dtype
        if meta.is_decode:
            q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # (T, H, C)
            queries = meta.pad_queries(torch.cat((q_latent, q_pe), dim=-1))  # (B, Q, H, C + R)
            keys = context.unsqueeze(1)  # (B, 1, L, C + R): one KV "head" shared by all heads
            out_latent = _grouped_attention(queries, keys, keys[..., :num_latent], meta, layer.scale)  # (B, Q, H, C)
            return torch.einsum("thc,hvc->thv", meta.unpad(out_latent), w_uv)
        kv = torch.einsum("blc,hkc->bhlk", context[..., :num_latent], w_kv_b)  # (B, H, L, N + V)
        k_rope = context[..., num_latent:].unsqueeze(1).expand(-1, layer.num_heads, -1, -1)  # (B, H, L, R)
        keys = torch.cat((kv[..., :num_nope], k_rope), dim=-1)  # (B, H, L, N + R)
        queries = meta.pad_queries(torch.cat((q_nope, q_pe), dim=-1))  # (B, Q, H, N + R)
        return meta.unpad(_grouped_attention(queries, keys, kv[..., num_nope:], meta, layer.scale))  # (T, H, V)

    def write_cache(self, cache: torch.Tensor, slots: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                    stack: bool) -> None:
        """Store each token's entry made of `first` then `second` (K then V: `stack`; the latent then the rope key:
        concatenated) at its slot of cache (num_blocks, block_size, ...)."""
        values = torch.stack((first, second), dim=1) if stack else torch.cat((first, second), dim=-1)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, values.to(cache.dtype))

    @staticmethod
    def _by_part(meta, out_shape, queries, attend):
        """attend(meta, *queries) over the whole step, or over each part of a mixed step into one output."""
        if meta.parts is None:
            return attend(meta, *queries)
        out = queries[0].new_empty(out_shape)
        for part, token_index in meta.parts:
            out.index_copy_(0, token_index, attend(part, *(q.index_select(0, token_index) for q in queries)))
        return out


def _rows_metadata(query_lens: torch.Tensor, starts: torch.Tensor, tables: torch.Tensor, block_size: int,
                   device: torch.device, cls: type = AttentionMetadata) -> AttentionMetadata:
    """What the queries of these rows (their tokens numbered 0.. in row order) may see; no slot mapping."""
    num_seqs = query_lens.numel()
    query_start = torch.zeros(num_seqs + 1, dtype=torch.long)
    torch.cumsum(query_lens, 0, out=query_start[1:])
    max_query = int(query_lens.max())
    max_context = int((starts + query_lens).max())
    q_offsets = torch.arange(max_query)
    query_valid = q_offsets.unsqueeze(0) < query_lens.unsqueeze(1)  # (B, Q)
    query_index = torch.where(query_valid, query_start[:-1].unsqueeze(1) + q_offsets, 0)  # (B, Q)
    num_context_blocks = -(-max_context // block_size)
    tables = tables[:, :num_context_blocks]  # blocks beyond the longest context are not read
    key_pos = torch.arange(num_context_blocks * block_size)
    query_pos = starts.unsqueeze(1) + q_offsets  # (B, Q)
    mask = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)  # (B, Q, L) causal; also bounds keys by length
    # Padding queries attend to key 0 only, so that no softmax row is empty (their output is discarded).
    mask = torch.where(query_valid.unsqueeze(-1), mask, key_pos.view(1, 1, -1) == 0)
    return cls(
        slot_mapping=None,
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        block_tables=tables.to(device),
        attn_mask=mask.unsqueeze(1).to(device),
        is_decode=max_query == 1,
        context_lens=(starts + query_lens).to(device),
    )


def _mask_groups(scores: torch.Tensor, group_scores: torch.Tensor, n_group: int, topk_group: int,
                 fill: float) -> torch.Tensor:
    keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    expert_mask = group_mask.repeat_interleave(scores.shape[1] // n_group, dim=1)  # (T, E)
    return scores.masked_fill(~expert_mask, fill)


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
