"""Paged decode attention: SDPA over gathered blocks and the CPU kernel, against the definition."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from loraplex.model.attention import (AttentionBatch, DecodeGroup, KVCache, sdpa,
                                      choose_decode_attention, group_decodes, paged_attention)

H, KVH, D_HEAD, BS, NUM_BLOCKS = 8, 2, 16, 4, 64  # GQA: 4 query heads per kv head
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def _kernel():
    if not HAS_CC:
        pytest.skip("no C compiler on PATH: the CPU kernels cannot be built")
    kernel = choose_decode_attention("cpu", torch.device("cpu"), torch.float32)
    assert kernel is not None
    return kernel


def _setup(lens: list[int], seed: int = 0):
    """A cache with random keys/values, each sequence on shuffled blocks; the new tokens'
    query/key/value [1, heads, D, d] (their position: len - 1)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(1, NUM_BLOCKS, BS, KVH, D_HEAD, torch.float32, torch.device("cpu"))
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    free = torch.randperm(NUM_BLOCKS - 1, generator=g).add(1).tolist()  # block 0 stays unused
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]
    new = [torch.randn(1, heads, len(lens), D_HEAD, generator=g) for heads in (H, KVH, KVH)]
    return cache, tables, new


def _groups(groups: list[list[int]], tables, lens) -> list[DecodeGroup]:
    out = []
    for rows in groups:
        width = max(len(tables[i]) for i in rows)
        blocks = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in rows])
        every = len(rows) == len(tables)
        out.append(DecodeGroup(rows=None if every else torch.tensor(rows), blocks=blocks,
                               lens=torch.tensor([lens[i] for i in rows])))
    return out


def _reference(cache, tables, lens, q, window):
    """The definition, one sequence and head at a time, on the cache after the write."""
    out = torch.empty(len(lens), H, D_HEAD)
    for i, n in enumerate(lens):
        slots = torch.tensor([tables[i][p // BS] * BS + p % BS for p in range(n)])
        lo = max(0, n - window) if window else 0
        for h in range(H):
            k = cache.k[0][slots[lo:], h // (H // KVH)]  # [ctx, d]
            v = cache.v[0][slots[lo:], h // (H // KVH)]
            w = torch.softmax(k @ q[0, h, i] * D_HEAD ** -0.5, dim=0)
            out[i, h] = w @ v
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("backend", ["sdpa", "cpu"])
def test_decode_attention_matches_definition(backend, window):
    lens = [1, 3, 4, 5, 17, 40, 9, 2]  # a fresh sequence, block edges, one much longer
    cache, tables, (q, k, v) = _setup(lens)
    kernel = _kernel() if backend == "cpu" else None
    groups = [list(range(len(lens)))] if kernel else group_decodes([len(t) for t in tables])
    if kernel is None:
        assert len(groups) > 1  # the SDPA path is tested across several groups
    slot_mapping = torch.tensor([tables[i][(n - 1) // BS] * BS + (n - 1) % BS
                                 for i, n in enumerate(lens)])
    batch = AttentionBatch(cache=cache, slot_mapping=slot_mapping,
                           decode_groups=_groups(groups, tables, lens), prefills=[],
                           decode_kernel=kernel)
    out, _ = paged_attention(SimpleNamespace(layer_idx=0), q, k, v, None,
                             sliding_window=window, attn_batch=batch)  # [1, D, H, d]
    torch.testing.assert_close(out[0], _reference(cache, tables, lens, q, window),
                               rtol=1e-5, atol=1e-5)


def test_decode_kernel_refuses_inconsistent_inputs():
    kernel = _kernel()
    cache, tables, (q, _, _) = _setup([5, 6])
    group = _groups([[0, 1]], tables, [5, 6])[0]
    out = torch.empty(2, H, D_HEAD)
    qd = q[0].transpose(0, 1).contiguous()  # [D, H, d]
    kernel(qd, cache, 0, group, 0.25, None, out)  # fine
    too_long = DecodeGroup(rows=None, blocks=group.blocks, lens=torch.tensor([5, 99]))
    with pytest.raises(ValueError, match="inconsistent"):
        kernel(qd, cache, 0, too_long, 0.25, None, out)
    past_the_end = DecodeGroup(rows=None, blocks=torch.tensor([[1, 2], [NUM_BLOCKS, 3]]),
                               lens=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="inconsistent"):
        kernel(qd, cache, 0, past_the_end, 0.25, None, out)
    with pytest.raises(ValueError, match="inconsistent"):
        kernel(qd.double(), cache, 0, group, 0.25, None, out.double())


def test_decode_attention_choice():
    assert choose_decode_attention("sdpa", torch.device("cpu"), torch.float32) is None
    assert choose_decode_attention("auto", torch.device("cuda"), torch.bfloat16) is None
    assert choose_decode_attention("auto", torch.device("cpu"), torch.bfloat16) is None
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        choose_decode_attention("cpu", torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("queries", [1, 5])  # a decode, a prefill chunk
def test_sdpa_with_kv_repeated_per_head_equals_grouped_query_sdpa(queries):
    """The CUDA form (K/V repeated to every query head, so a masked call can use a fast
    kernel) computes what enable_gqa does: checked here on the CPU."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, queries, 16, generator=g)  # [N, H, q, d]
    k, v = (torch.randn(3, 2, 20, 16, generator=g) for _ in range(2))  # [N, KVH, L, d]
    mask = torch.rand(3, 1, queries, 20, generator=g) > 0.3
    mask[..., 0] = True  # every row sees a position
    grouped = sdpa(q, k, v, mask, None, gqa=True, expand_kv=False)
    repeated = sdpa(q, k, v, mask, None, gqa=True, expand_kv=True)
    torch.testing.assert_close(repeated, grouped, rtol=1e-5, atol=1e-6)
    head = 5  # query head 5 reads K/V head 5 // 4 = 1
    alone = torch.nn.functional.scaled_dot_product_attention(
        q[:, head:head + 1], k[:, 1:2], v[:, 1:2], attn_mask=mask)
    torch.testing.assert_close(repeated[:, head:head + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expand_kv", [False, True])
def test_sdpa_without_a_mask_is_causal(expand_kv):
    """A prefill with no cached prefix passes no mask (SDPA's own causal mask, faster):
    the same as the explicit lower-triangular mask of prefill_mask."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 12, 16, generator=g)  # [1, H, q, d]
    k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(2))  # [1, KVH, q, d]
    tril = torch.ones(12, 12, dtype=torch.bool).tril()
    causal = sdpa(q, k, v, None, None, gqa=True, expand_kv=expand_kv)
    torch.testing.assert_close(causal, sdpa(q, k, v, tril, None, gqa=True, expand_kv=False),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(causal, sdpa(q, k, v, torch.ones_like(tril), None, gqa=True,
                                           expand_kv=False), atol=1e-3)  # the mask matters
