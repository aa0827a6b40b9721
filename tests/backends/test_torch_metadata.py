"""The torch backend's step metadata: the decode-only fast path must describe exactly what the general path does."""

from __future__ import annotations

import torch

from dsserve.backends.torch import AttentionMetadata, TorchBackend, Workspace, _rows_metadata
from dsserve.runner.batch import ForwardBatch, StepInputs, build_forward_batch

BLOCK = 4


def _general(inputs: StepInputs) -> ForwardBatch:
    """build_forward_batch without its decode shortcut."""
    query_lens = inputs.query_lens
    meta = _rows_metadata(query_lens, inputs.starts, inputs.block_tables, BLOCK, torch.device("cpu"))
    seq_of_token = torch.repeat_interleave(torch.arange(query_lens.numel()), query_lens)
    positions = inputs.starts[seq_of_token]
    meta.slot_mapping = inputs.block_tables[seq_of_token, positions // BLOCK] * BLOCK + positions % BLOCK
    return ForwardBatch(input_ids=inputs.input_ids, positions=positions, attn=meta)


def test_decode_fast_path_matches_general_path():
    # Three sequences of different lengths decoding one token each; block tables of different lengths.
    tables = [[5, 2, 9], [7], [1, 3]]
    starts = [9, 2, 4]  # the new token's position: 9 -> block 2 (id 9), 2 -> block 0 (id 7), 4 -> block 1 (id 3)
    inputs = StepInputs.build([[11], [12], [13]], starts, tables)
    backend = TorchBackend("cpu")
    fast = build_forward_batch(inputs, BLOCK, torch.device("cpu"), backend)
    slow = _general(inputs)
    assert fast.attn.is_decode and slow.attn.is_decode
    assert fast.attn.workspace is backend.workspace
    assert torch.equal(fast.input_ids, slow.input_ids)
    assert torch.equal(fast.positions, torch.tensor(starts))
    assert torch.equal(fast.attn.slot_mapping, torch.tensor([9 * BLOCK + 1, 7 * BLOCK + 2, 3 * BLOCK + 0]))
    assert torch.equal(fast.attn.slot_mapping, slow.attn.slot_mapping)
    assert torch.equal(fast.attn.block_tables, slow.attn.block_tables)
    assert torch.equal(fast.attn.attn_mask, slow.attn.attn_mask)


def test_mixed_step_keeps_general_path():
    inputs = StepInputs.build([[1, 2, 3], [4]], [0, 6], [[0], [1, 2]])
    out = build_forward_batch(inputs, BLOCK, torch.device("cpu"), TorchBackend("cpu"))
    assert out.attn.parts is not None  # decode rows and a prompt chunk: attention in two parts
    assert out.positions.tolist() == [0, 1, 2, 6]


def test_gather_into_workspace_equals_fresh_gather():
    cache = torch.randn(10, BLOCK, 2, 3)
    tables = torch.tensor([[4, 1], [7, 0]])

    def meta(workspace):
        return AttentionMetadata(slot_mapping=None, query_index=None, query_valid=None, block_tables=tables,
                                 attn_mask=None, is_decode=True, workspace=workspace)

    workspace = Workspace()
    bigger = meta(workspace).gather(torch.randn(10, BLOCK, 2, 3))  # grows the buffer first
    assert bigger.shape == (2, 2 * BLOCK, 2, 3)
    reused = meta(workspace).gather(cache)
    assert torch.equal(reused, meta(None).gather(cache))
    assert torch.equal(reused[0, :BLOCK], cache[4]) and torch.equal(reused[1, BLOCK:], cache[0])
    # A smaller step reuses the same storage.
    small = AttentionMetadata(slot_mapping=None, query_index=None, query_valid=None, block_tables=tables[:1, :1],
                              attn_mask=None, is_decode=True, workspace=workspace).gather(cache)
    assert small.untyped_storage().data_ptr() == reused.untyped_storage().data_ptr()
    assert torch.equal(small[0], cache[4])
