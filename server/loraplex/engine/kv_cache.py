"""Bookkeeping of the paged KV cache: which blocks are free, which sequence holds which.

The tensors themselves live in `loraplex.model.attention.KVCache`; this module
only hands out block numbers. A sequence's block table lists its blocks in
order; token position p lives in block table[p // block_size] at offset
p % block_size.

Prefix caching (as vLLM's): a full, computed block can be remembered under a key
(`block_key`: its tokens, every token before it and the adapter version, so a hit means
the same keys and values). Sequences that start with the same blocks then share them
(counted holds). A block is remembered when a step is scheduled to fill it, so requests
arriving together share their common prefix in that very step (each layer writes every
new key and value before any sequence attends); if the step fails, what it was to
fill is forgotten. A remembered block no sequence holds stays findable, idle, until a
block is needed and no never-remembered one is free; the least recently freed idle
block goes first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_key(previous: bytes, adapter: str, tokens: list[int]) -> bytes:
    """The key of a full block of `tokens` after the block keyed `previous` (b"" for the
    first), served with `adapter` ("name@version", "" for the base model)."""
    h = hashlib.sha256(previous)
    h.update(adapter.encode() + b"\0")
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2...
        self._holds = [0] * num_blocks  # sequences holding each block
        self._key_of: dict[int, bytes] = {}  # remembered blocks
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # remembered, unheld; oldest first
        self._unsettled: list[int] = []  # remembered for the step being run

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_remembered(self) -> int:
        return len(self._key_of)

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
            block_table.append(self._take())

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # the least recently freed idle block forgets what it held
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._holds[block] = 1
        return block

    def free(self, block_table: list[int]) -> None:
        """Let go of every block of `block_table` and empty it. The last blocks go idle
        first, so they are the first forgotten: a prefix outlives its tails."""
        for block in reversed(block_table):
            self._holds[block] -= 1
            if self._holds[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    def cached_prefix(self, keys: list[bytes]) -> list[int]:
        """The remembered blocks of the longest run of `keys` from the first, each now held
        once more (for a block table, freed with it)."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self._holds[block] == 0:
                del self._idle[block]
            self._holds[block] += 1
        return blocks

    def remember(self, block: int, key: bytes) -> None:
        """`block` holds (or, once the step runs, will hold) what `key` names. A key already
        remembered keeps its block."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
            self._unsettled.append(block)

    def settle(self) -> None:
        """The step ran: the blocks remembered for it hold what their keys name."""
        self._unsettled.clear()

    def forget_unsettled(self) -> None:
        """The step failed: forget the blocks remembered for it (their holders keep them)."""
        for block in self._unsettled:
            del self._block_of[self._key_of.pop(block)]
            if self._holds[block] == 0:  # (idle already: free it)
                del self._idle[block]
                self._free.append(block)
        self._unsettled.clear()
