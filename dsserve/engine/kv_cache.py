"""The paged KV cache's bookkeeping: a block pool with ref counts, prefix hashing by chained block keys, LRU eviction.

This module only decides which block ids hold which request's tokens; the tensors live in the model runner.

    request tokens:  |---- block 0 ----|---- block 1 ----|-- block 2 (partial) --|
    block key:       (0, toks0)         (h(k0), toks1)    none until the block is full

A full block's key chains its predecessor's hash, so equal keys mean equal whole prefixes. Freed blocks keep
their key and go to the tail of the free queue; a later request with the same prefix takes them back
(a cache hit) until they are reused for new tokens, oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dsserve.engine.request import Request

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key or 0, this block's token ids)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set while the block is registered as a cached full block


class BlockPool:
    """All blocks, the free queue (least recently freed first) and the key -> block map of cached full blocks."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockKey, Block] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, count: int) -> list[Block]:
        """Pop `count` free blocks (evicting their cached keys) with ref_count 1."""
        taken = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:
                del self.cached[block.key]
                block.key = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[Block]) -> None:
        """Share cached blocks with one more request."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue in the given order."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} released more often than taken"
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None

    def register(self, block: Block, key: BlockKey) -> None:
        if key not in self.cached and block.key is None:
            block.key = key
            self.cached[key] = block


class KVCacheManager:
    """Allocates blocks to requests by token counts; `allocate_slots` is the only way a request gains blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_keys: dict[str, list[BlockKey]] = {}  # keys of the request's full blocks, computed once

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of the request, in whole blocks, as (blocks, num_tokens).

        When every token hits the cache, the last one is still recomputed to obtain its logits,
        so at most (num_tokens - 1) tokens count as computed.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        keys = self._block_keys(request, (request.num_tokens - 1) // self.block_size)
        hits = []
        for key in keys:
            block = self.pool.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens after its computed ones (plus prefix hits).

        Returns False, changing nothing, when the free blocks do not suffice.
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(blocks) - len(computed_blocks)
        num_revived = sum(1 for b in computed_blocks if b.ref_count == 0)  # cached but free: leave the free queue
        if num_needed > self.pool.num_free - num_revived:
            return False
        self.pool.touch(list(computed_blocks))
        blocks.extend(computed_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.take(num_needed))
        if self.enable_prefix_caching:
            num_full = (num_computed + num_new_tokens) // self.block_size
            keys = self._block_keys(request, num_full)
            for block, key in zip(blocks[:num_full], keys):
                self.pool.register(block, key)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so that a prefix's last blocks are evicted before its first."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.release(list(reversed(blocks)))

    def forget(self, request: Request) -> None:
        """Drop the memoised keys of a finished request."""
        self.req_keys.pop(request.request_id, None)

    def _block_keys(self, request: Request, num_full_blocks: int) -> list[BlockKey]:
        keys = self.req_keys.setdefault(request.request_id, [])
        if len(keys) < num_full_blocks:
            tokens = request.all_token_ids
            parent = hash(keys[-1]) if keys else 0
            for i in range(len(keys), num_full_blocks):
                key = (parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))
                keys.append(key)
                parent = hash(key)
        return keys[:num_full_blocks]
