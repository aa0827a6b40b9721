"""ForwardBatch: one step's flat token batch and attention metadata, built from the scheduler's plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsserve.backends.base import Backend


@dataclass
class ForwardBatch:
    """Passed as an argument through the model; never stored globally."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    attn: Any  # the backend's attention metadata


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


def build_forward_batch(inputs: StepInputs, block_size: int, device: torch.device, backend: Backend) -> ForwardBatch:
    """Sequence i computes `query_lens[i]` tokens at positions starts[i] + 0..len-1, its blocks in block_tables[i];
    the backend describes the step to its attention (`Backend.attention_metadata`)."""
    query_lens, starts, tables = inputs.query_lens, inputs.starts, inputs.block_tables
    num_seqs = query_lens.numel()
    if inputs.input_ids.numel() == num_seqs:  # every row has a token, so one each: it sits at position starts[i]
        positions = starts
        slot_mapping = tables[torch.arange(num_seqs), starts // block_size] * block_size + starts % block_size
    else:
        query_start = torch.zeros(num_seqs + 1, dtype=torch.long)
        torch.cumsum(query_lens, 0, out=query_start[1:])
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)  # (T,)
        positions = starts[seq_of_token] + torch.arange(int(query_start[-1])) - query_start[:-1][seq_of_token]  # (T,)
        slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    attn = backend.attention_metadata(query_lens, starts, tables, positions, slot_mapping, block_size, device)
    return ForwardBatch(input_ids=inputs.input_ids.to(device), positions=positions.to(device), attn=attn)
