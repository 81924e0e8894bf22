"""Bookkeeping of the paged KV cache: which blocks are free, which sequence owns which.

The tensors themselves live in `loraplex.model.attention.KVCache`; this module
only hands out block numbers. A sequence's block table lists its blocks in
order; token position p lives in block table[p // block_size] at offset
p % block_size.
"""

from __future__ import annotations


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2...

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def extra_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add so that `block_table` holds `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(block_table, num_tokens) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to `block_table` (in place) until it holds `num_tokens` tokens."""
        extra = self.extra_blocks(block_table, num_tokens)
        if extra > self.num_free:
            raise RuntimeError("KV cache out of blocks; call can_grow first")
        for _ in range(extra):
            block_table.append(self._free.pop())

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` and empty it."""
        self._free.extend(reversed(block_table))
        block_table.clear()
