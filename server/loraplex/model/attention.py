"""Attention over our paged KV cache, plugged into transformers models.

transformers lets a model call a registered attention function; extra keyword
arguments given to `model(...)` reach it. We run a packed batch (every
sequence's new tokens in one row, `position_ids` restarting per sequence) and
pass `attn_batch=AttentionBatch(...)`. The function writes the new keys and
values into the cache and attends each sequence to its own cached context.

Sequences with one new token (decodes) are attended together in one padded
SDPA call; each sequence with several new tokens (a prefill chunk) gets its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "loraplex_paged"


class KVCache:
    """Per layer, keys and values of every cached token: [num_blocks * block_size, kv_heads, head_dim].

    Attention reads a sequence's context by copying its blocks out (`gather`) into two
    scratch buffers the cache keeps. Whole blocks: one 16-token block is one row of
    block_size * KVH * d values, and copying those rows is ~1.6x faster on CPU than
    copying token rows. Kept buffers: a fresh multi-MB tensor per layer came from glibc's
    mmap and page-faulted on first touch (18k faults, ~40% of a 32-sequence decode step
    on a 2-core CPU); the buffers only grow, to the largest context gathered so far.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        row = block_size * kv_heads * head_dim
        self._scratch = [torch.empty(0, row, dtype=dtype, device=device)
                         for _ in range(2)]  # [blocks, block_size * KVH * d]: keys, values

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [n] -> keys, values of those blocks of `layer`, in that order:
        [n * block_size, KVH, d] each. They live in the scratch buffers: valid until the
        next call."""
        out = []
        for i, cache in enumerate((self.k[layer], self.v[layer])):
            rows = cache.view(-1, self._scratch[i].shape[1])  # [num_blocks, block_size * KVH * d]
            if self._scratch[i].shape[0] < blocks.numel():
                self._scratch[i] = rows.new_empty(blocks.numel() * 5 // 4, rows.shape[1])
            buf = self._scratch[i][:blocks.numel()]
            torch.index_select(rows, 0, blocks, out=buf)  # (~6x faster than rows[blocks] on CPU)
            out.append(buf.view(-1, *cache.shape[1:]))
        return out[0], out[1]


@dataclass
class PrefillSeq:
    """One sequence with several new tokens at [start, start + length) of the packed row."""

    start: int
    length: int
    context: int  # its context after this step (positions 0..context-1), new tokens included
    blocks: torch.Tensor  # [ceil(context / block_size)] its block table


@dataclass
class AttentionBatch:
    """What attention needs for one step; built once by the runner, read by every layer."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decodes: int  # the first num_decodes tokens are single-token sequences
    decode_blocks: torch.Tensor  # [D, Bmax] block table of each decode, padded with block 0
    decode_lens: torch.Tensor  # [D] context length of each decode (including its new token)
    prefills: list[PrefillSeq]
    _masks: dict = field(default_factory=dict)  # (kind, window) -> mask, memoized per step

    def decode_mask(self, window: int | None) -> torch.Tensor:  # [D, 1, 1, Bmax * block_size] bool
        key = ("decode", window)
        if key not in self._masks:
            width = self.decode_blocks.shape[1] * self.cache.block_size
            kpos = torch.arange(width, device=self.decode_lens.device)
            qpos = (self.decode_lens - 1).unsqueeze(1)  # [D, 1]
            mask = kpos.unsqueeze(0) <= qpos  # [D, width]: padding (and block 0) masked out
            if window:
                mask &= qpos - kpos.unsqueeze(0) < window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor:  # [q, context] bool
        key = (i, window)
        if key not in self._masks:
            seq = self.prefills[i]
            kpos = torch.arange(seq.context, device=seq.blocks.device)
            qpos = kpos[seq.context - seq.length:].unsqueeze(1)  # [q, 1]
            mask = kpos.unsqueeze(0) <= qpos
            if window:
                mask &= qpos - kpos.unsqueeze(0) < window
            self._masks[key] = mask
        return self._masks[key]


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, attn_batch: AttentionBatch | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, d], key/value: [1, KVH, T, d] -> output [1, T, H, d]."""
    if attn_batch is None:
        raise RuntimeError("loraplex attention runs only inside the loraplex runner")
    b = attn_batch
    layer = module.layer_idx
    k_cache, v_cache = b.cache.k[layer], b.cache.v[layer]  # [slots, KVH, d]
    k_cache.index_copy_(0, b.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, b.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    q = query[0]  # [H, T, d]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, d]
    gqa = q.shape[0] != k_cache.shape[1]
    if b.num_decodes:
        D = b.num_decodes
        qd = q[:, :D].transpose(0, 1).unsqueeze(2)  # [D, H, 1, d]
        kd, vd = b.cache.gather(layer, b.decode_blocks.view(-1))  # [D * Bmax * bs, KVH, d] each
        kd = kd.view(D, -1, *kd.shape[1:]).transpose(1, 2)  # [D, KVH, Bmax * bs, d]
        vd = vd.view(D, -1, *vd.shape[1:]).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype),
                                            attn_mask=b.decode_mask(sliding_window),
                                            scale=scaling, enable_gqa=gqa)  # [D, H, 1, d]
        out[:D] = od.squeeze(2)
    for i, seq in enumerate(b.prefills):
        qp = q[:, seq.start:seq.start + seq.length].unsqueeze(0)  # [1, H, q, d]
        kp, vp = b.cache.gather(layer, seq.blocks)  # [blocks * bs, KVH, d] each
        kp = kp[:seq.context].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, d]
        vp = vp[:seq.context].transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp.to(q.dtype), vp.to(q.dtype),
                                            attn_mask=b.prefill_mask(i, sliding_window),
                                            scale=scaling, enable_gqa=gqa)  # [1, H, q, d]
        out[seq.start:seq.start + seq.length] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make `attn_implementation="loraplex_paged"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
