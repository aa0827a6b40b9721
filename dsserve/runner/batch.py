"""ForwardBatch: one step's flat token batch and attention metadata, built from the scheduler's plan."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsserve.layers.attention import AttentionMetadata, Workspace


@dataclass
class ForwardBatch:
    """Passed as an argument through the model; never stored globally."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    attn: AttentionMetadata


@dataclass
class StepInputs:
    """What every rank needs to run one step, as int64 CPU tensors: rank 0 builds it from the scheduler's plan
    and sends it to the other ranks as one flat tensor (`pack` / `unpack`), never as a pickled object."""

    input_ids: torch.Tensor  # (T,) the new tokens, sequence after sequence
    query_lens: torch.Tensor  # (B,) new tokens per sequence
    starts: torch.Tensor  # (B,) tokens already in the cache per sequence
    block_tables: torch.Tensor  # (B, max_blocks) cache block ids, padded with 0
    logit_rows: torch.Tensor  # (N,) flat token indices whose logits are needed (sampling, prompt logprobs)
    due: list[int] | None = None  # rank 0 only, not sent: rows sampled this step
    prompt_spans: list | None = None  # rank 0 only, not sent: (row, logits offset, count, target ids)

    @classmethod
    def build(cls, token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]]) -> "StepInputs":
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([list(t) + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
        return cls(
            input_ids=torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long),
            query_lens=torch.tensor([len(c) for c in token_chunks], dtype=torch.long),
            starts=torch.tensor(start_positions, dtype=torch.long),
            block_tables=tables,
            logit_rows=torch.zeros(0, dtype=torch.long),
        )

    def pack(self) -> torch.Tensor:
        """[B, T, max_blocks, N, query_lens, starts, input_ids, block_tables, logit_rows] as one int64 tensor."""
        b, m = self.block_tables.shape
        header = torch.tensor([b, self.input_ids.numel(), m, self.logit_rows.numel()], dtype=torch.long)
        return torch.cat([header, self.query_lens, self.starts, self.input_ids, self.block_tables.flatten(), self.logit_rows])

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> "StepInputs":
        b, t, m, n = flat[:4].tolist()
        query_lens, starts, input_ids, tables, logit_rows = flat[4:].split([b, b, t, b * m, n])
        return cls(input_ids, query_lens, starts, tables.view(b, m), logit_rows)


def build_forward_batch(inputs: StepInputs, block_size: int, device: torch.device,
                        workspace: Workspace | None = None) -> ForwardBatch:
    """Sequence i computes `query_lens[i]` tokens at positions starts[i] + 0..len-1, its blocks in block_tables[i].

    All index arithmetic below is batched tensor maths. A step that mixes decode rows (one new token) with
    prompt chunks gets its attention split in two (`AttentionMetadata.parts`): otherwise every decode row
    would be padded to the longest chunk's query count (x128 the attention work in a typical serving step).
    """
    query_lens, starts, tables = inputs.query_lens, inputs.starts, inputs.block_tables
    num_seqs = query_lens.numel()
    if inputs.input_ids.numel() == num_seqs and bool((query_lens == 1).all()):  # one token per row: fewer ops
        return _decode_batch(inputs, block_size, device, workspace)
    query_start = torch.zeros(num_seqs + 1, dtype=torch.long)
    torch.cumsum(query_lens, 0, out=query_start[1:])
    num_tokens = int(query_start[-1])

    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)  # (T,)
    positions = starts[seq_of_token] + torch.arange(num_tokens) - query_start[:-1][seq_of_token]  # (T,)
    slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size

    decode_rows = query_lens == 1
    num_decode = int(decode_rows.sum())
    if 0 < num_decode < num_seqs:
        parts = []
        for rows in (decode_rows, ~decode_rows):
            token_index = torch.nonzero(rows[seq_of_token]).squeeze(1)  # the rows' tokens, in flat order
            meta = _attention_metadata(query_lens[rows], starts[rows], tables[rows], block_size, device)
            meta.workspace = workspace
            parts.append((meta, token_index.to(device)))
        attn = AttentionMetadata(
            slot_mapping=slot_mapping.to(device), query_index=None, query_valid=None, block_tables=None,
            attn_mask=None, is_decode=False, parts=tuple(parts),
        )
    else:
        attn = _attention_metadata(query_lens, starts, tables, block_size, device)
        attn.slot_mapping = slot_mapping.to(device)
        attn.workspace = workspace
    # The attention kernel's view of the step, each token a query of its own over its prefix of the cache. It reads
    # only the keys a token may see, but each token reads them alone; the masked SDPA reuses each key across a
    # block of queries but pays for the gather, the padding and the masked part of the rectangle. Per token the
    # kernel wins while a chunk's earlier context is at most its own length (fresh prompts, a long prompt's first
    # chunk: a 2000-token prompt's prefill 522 -> 360 ms); a chunk continuing a long context is faster on the SDPA
    # path (a 4000-token prompt in 512-token chunks: 1001 ms, against 1251 per token). docs/benchmarks.md.
    if device.type == "cpu" and bool((starts <= query_lens).logical_or(query_lens == 1).all()):
        attn.token_lens, attn.token_seq, attn.step_tables = positions + 1, seq_of_token, tables
    return ForwardBatch(
        input_ids=inputs.input_ids.to(device),
        positions=positions.to(device),
        attn=attn,
    )


def _decode_batch(inputs: StepInputs, block_size: int, device: torch.device, workspace: Workspace | None) -> ForwardBatch:
    """build_forward_batch for a step of one new token per row: the token sits at position starts[i]."""
    starts, tables = inputs.starts, inputs.block_tables
    num_seqs = starts.numel()
    rows = torch.arange(num_seqs)
    slot_mapping = tables[rows, starts // block_size] * block_size + starts % block_size
    num_context_blocks = int(starts.max()) // block_size + 1
    key_pos = torch.arange(num_context_blocks * block_size)
    mask = key_pos.view(1, 1, 1, -1) <= starts.view(-1, 1, 1, 1)  # (B, 1, 1, L)
    attn = AttentionMetadata(
        slot_mapping=slot_mapping.to(device), query_index=None, query_valid=None,
        block_tables=tables[:, :num_context_blocks].to(device), attn_mask=mask.to(device), is_decode=True,
        workspace=workspace, context_lens=(starts + 1).to(device),
    )
    return ForwardBatch(
        input_ids=inputs.input_ids.to(device), positions=starts.to(device), attn=attn,
    )


def _attention_metadata(query_lens: torch.Tensor, starts: torch.Tensor, tables: torch.Tensor, block_size: int,
                        device: torch.device) -> AttentionMetadata:
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
    return AttentionMetadata(
        slot_mapping=None,
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        block_tables=tables.to(device),
        attn_mask=mask.unsqueeze(1).to(device),
        is_decode=max_query == 1,
        context_lens=(starts + query_lens).to(device),
    )
