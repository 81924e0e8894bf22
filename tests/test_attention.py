"""Paged decode attention: SDPA over gathered blocks and the CPU kernel, against the definition."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from loraplex.model import attention
from loraplex.model.attention import (AttentionBatch, DecodeGroup, KVCache, PrefillSeq,
                                      attention_step, math_attention,
                                      choose_decode_attention, group_decodes, paged_attention,
                                      sdpa)

H, KVH, D_HEAD, BS, NUM_BLOCKS = 8, 2, 16, 4, 64  # GQA: 4 query heads per kv head
SMALL = SimpleNamespace(heads=H, kv_heads=KVH, head_dim=D_HEAD, value_dim=D_HEAD, block_size=BS,
                        num_blocks=NUM_BLOCKS)
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def _kernel():
    if not HAS_CC:
        pytest.skip("no C compiler on PATH: the CPU kernels cannot be built")
    kernel = choose_decode_attention("cpu", torch.device("cpu"), torch.float32)
    assert kernel is not None
    return kernel


def _setup(lens: list[int], seed: int = 0, shape: SimpleNamespace = SMALL,
           dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None,
           values_in_keys: bool = False):
    """A cache of `kv_dtype` (default: `dtype`) with random keys/values, each sequence on
    shuffled blocks; the new tokens' query/key/value [1, heads, D, d] in `dtype` (their
    position: len - 1). values_in_keys: the values are the keys' first entries (a latent
    attention's cache), the new ones too."""
    g = torch.Generator().manual_seed(seed)
    bs, n_blocks = shape.block_size, shape.num_blocks
    cache = KVCache(1, n_blocks, bs, {0: (shape.kv_heads, shape.head_dim, shape.value_dim)},
                    kv_dtype or dtype, torch.device("cpu"),
                    frozenset({0}) if values_in_keys else frozenset())
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    free = torch.randperm(n_blocks - 1, generator=g).add(1).tolist()  # block 0 stays unused
    tables = [[free.pop() for _ in range(-(-n // bs))] for n in lens]
    new = [torch.randn(1, heads, len(lens), d, generator=g).to(dtype)
           for heads, d in ((shape.heads, shape.head_dim), (shape.kv_heads, shape.head_dim),
                            (shape.kv_heads, shape.value_dim))]
    if values_in_keys:
        new[2] = new[1][..., :shape.value_dim]
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


def _reference(cache, tables, lens, q, window, shape: SimpleNamespace = SMALL, softcap=None,
               sinks=None, chunk=None):
    """The definition, one sequence and head at a time, on the cache after the write; with
    `softcap`, the scores capped to softcap * tanh(score / softcap) (Gemma 2); with `sinks`
    ([H]), one more logit per head in the softmax, weighing no value (GPT-OSS); with `chunk`,
    only the positions of the new token's chunk (Llama 4's chunked attention)."""
    heads, bs, rep = shape.heads, shape.block_size, shape.heads // shape.kv_heads
    out = torch.empty(len(lens), heads, shape.value_dim)
    for i, n in enumerate(lens):
        slots = torch.tensor([tables[i][p // bs] * bs + p % bs for p in range(n)])
        lo = (n - 1) // chunk * chunk if chunk else max(0, n - window) if window else 0
        for h in range(heads):
            k = cache.k[0][slots[lo:], h // rep]  # [ctx, d]
            v = cache.v[0][slots[lo:], h // rep]
            scores = k.double() @ q[0, h, i].double() * shape.head_dim ** -0.5  # [ctx]
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            if sinks is not None:
                scores = torch.cat([scores, sinks[h:h + 1].double()])
            w = torch.softmax(scores, dim=0)[:len(k)]
            out[i, h] = (w @ v.double()).float()  # (in fp64: the peaked cases stay exact)
    return out


@pytest.mark.parametrize("softcap,sinks", [(None, False), (1.5, False), (None, True)])
@pytest.mark.parametrize("window,chunk", [(None, None), (5, None), (None, 4)])
@pytest.mark.parametrize("backend", ["sdpa", "cpu"])
def test_decode_attention_matches_definition(backend, window, chunk, softcap, sinks):
    lens = [1, 3, 4, 5, 17, 40, 9, 2]  # a fresh sequence, block edges, one much longer
    cache, tables, (q, k, v) = _setup(lens)
    q *= 3  # scores of several units: a cap of 1.5 changes them
    sinks = torch.linspace(-2, 4, H) if sinks else None  # [H]: from nearly none to most
    kernel = _kernel() if backend == "cpu" else None
    groups = [list(range(len(lens)))] if kernel else group_decodes([len(t) for t in tables])
    if kernel is None:
        assert len(groups) > 1  # the SDPA path is tested across several groups
    slot_mapping = torch.tensor([tables[i][(n - 1) // BS] * BS + (n - 1) % BS
                                 for i, n in enumerate(lens)])
    batch = AttentionBatch(cache=cache, slot_mapping=slot_mapping,
                           decode_groups=_groups(groups, tables, lens), prefills=[],
                           decode_kernel=kernel)
    layer = SimpleNamespace(layer_idx=0, config=SimpleNamespace(  # (a Llama 4 layer's)
        layer_types=["chunked_attention" if chunk else "full_attention"],
        attention_chunk_size=chunk))
    with attention_step(batch):
        out, _ = paged_attention(layer, q, k, v, None, sliding_window=window, softcap=softcap,
                                 s_aux=sinks)  # [1, D, H, d]
    expected = _reference(cache, tables, lens, q, window, softcap=softcap, sinks=sinks,
                          chunk=chunk)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    if softcap or sinks is not None or chunk:  # (the cap, the sinks or the chunks mattered)
        assert (out[0] - _reference(cache, tables, lens, q, window)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("num_decodes,kv_heads", [(1, 4), (5, 4), (32, 4), (1, 1)])
def test_decode_kernel_on_full_blocks(num_decodes, kv_heads, window, dtype, kv_dtype):
    """The kernel's other paths: blocks of 16 (its exp runs 8 positions at a time, the rest
    one by one), contexts of many blocks (each next one fetched ahead), few decodes (their
    kv heads split over several work items; one decode over one kv head, as a latent
    attention's: its query heads split, on a machine of several threads), a peaked softmax
    (exponents far below -87, where the kernel's exp stops), a bf16 model (queries and
    outputs rounded to bf16, the sums in fp32), and a cache of the other dtype
    (--kv-cache-dtype)."""
    kernel = _kernel()
    shape = SimpleNamespace(heads=8, kv_heads=kv_heads, head_dim=64, value_dim=64,
                            block_size=16, num_blocks=256)
    lens = ([100, 17, 1, 16, 23, 61, 33, 8] + [40 + 7 * i for i in range(24)])[:num_decodes]
    cache, tables, (q, k, v) = _setup(lens, seed=3, shape=shape, dtype=dtype, kv_dtype=kv_dtype)
    q[0, :, -1] *= 30  # the last decode: softmax weights from 1 down to about e^-190
    slot_mapping = torch.tensor([tables[i][(n - 1) // 16] * 16 + (n - 1) % 16
                                 for i, n in enumerate(lens)])
    batch = AttentionBatch(cache=cache, slot_mapping=slot_mapping,
                           decode_groups=_groups([list(range(len(lens)))], tables, lens),
                           prefills=[], decode_kernel=kernel)
    with attention_step(batch):
        out, _ = paged_attention(SimpleNamespace(layer_idx=0), q, k, v, None,
                                 sliding_window=window)  # [1, D, H, d]
    assert out.dtype == dtype
    assert cache.k[0].dtype == kv_dtype  # the new keys were rounded to the cache's dtype
    expected = _reference(cache, tables, lens, q, window, shape)  # from the cached values
    if dtype == torch.float32:
        torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    else:  # fp32 sums, the output rounded once: within one bf16 step of the exact value's
        torch.testing.assert_close(out[0], expected.to(dtype), rtol=2 ** -7, atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "cpu"])
@pytest.mark.parametrize("values_in_keys", [False, True])
def test_values_of_another_size_than_keys(backend, values_in_keys):
    """Keys and values of two sizes (DeepSeek's latent attention expanded: 192 and 128 per
    head), and values that are the keys' first entries, held in the keys' memory (its latent
    cached: 576 and 512): decodes (each path) and a prefill chunk over cached context,
    against the definition."""
    shape = SimpleNamespace(heads=8, kv_heads=2, head_dim=24, value_dim=16, block_size=BS,
                            num_blocks=NUM_BLOCKS)
    lens = [1, 5, 17, 40, 9]
    cache, tables, (q, k, v) = _setup(lens, seed=4, shape=shape, values_in_keys=values_in_keys)
    assert cache.k[0].shape[2] == 24 and cache.v[0].shape[2] == 16
    assert (cache.v[0].data_ptr() == cache.k[0].data_ptr()) == values_in_keys
    kernel = _kernel() if backend == "cpu" else None
    groups = [list(range(len(lens)))] if kernel else group_decodes([len(t) for t in tables])
    slot_mapping = torch.tensor([tables[i][(n - 1) // BS] * BS + (n - 1) % BS
                                 for i, n in enumerate(lens)])
    batch = AttentionBatch(cache=cache, slot_mapping=slot_mapping,
                           decode_groups=_groups(groups, tables, lens), prefills=[],
                           decode_kernel=kernel)
    with attention_step(batch):
        out, _ = paged_attention(SimpleNamespace(layer_idx=0), q, k, v, None)  # [1, D, H, 16]
    torch.testing.assert_close(out[0], _reference(cache, tables, lens, q, None, shape),
                               rtol=1e-5, atol=1e-5)
    # the last 6 positions of the 40-token sequence as one prefill chunk, over the rest
    n, new = lens[3], 6
    qp = torch.randn(1, shape.heads, new, shape.head_dim)
    kp, vp = torch.randn(1, shape.kv_heads, new, 24), torch.randn(1, shape.kv_heads, new, 16)
    if values_in_keys:
        vp = kp[..., :16]
    slots = [tables[3][p // BS] * BS + p % BS for p in range(n - new, n)]
    prefill = AttentionBatch(cache=cache, slot_mapping=torch.tensor(slots), decode_groups=[],
                             prefills=[PrefillSeq(0, new, n, torch.tensor(tables[3]))])
    with attention_step(prefill):
        out, _ = paged_attention(SimpleNamespace(layer_idx=0), qp, kp, vp, None)  # [1, 6, H, 16]
    ctx = torch.tensor([tables[3][p // BS] * BS + p % BS for p in range(n)])
    for j in range(new):
        for h in range(shape.heads):
            keys, values = cache.k[0][ctx[:n - new + j + 1], h // 4], cache.v[0][ctx[:n - new + j + 1], h // 4]
            w = torch.softmax(keys @ qp[0, h, j] * 24 ** -0.5, dim=0)
            torch.testing.assert_close(out[0, j, h], w @ values, rtol=1e-5, atol=1e-5)


def test_probe_refuses_attention_options_it_does_not_implement():
    """The load-time probe (loader.probe_attention) records the layers that attend;
    an option a model passes that this attention does not implement is refused, never
    ignored (as GPT-OSS's sinks were before they were implemented)."""
    q, k, v = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8)
    probe = attention.LayerProbe()
    layer = SimpleNamespace(layer_idx=3)
    with attention_step(probe):
        out, _ = paged_attention(layer, q, k, v, None, use_cache=False,
                                 position_ids=torch.zeros(1, 1), s_aux=torch.zeros(4))
        assert probe.layers == {3} and out.shape == (1, 1, 4, 8)
        with pytest.raises(ValueError, match="does not implement: attention_chunk_size"):
            paged_attention(layer, q, k, v, None, attention_chunk_size=8192)
    with pytest.raises(RuntimeError, match="runs only inside the loraplex runner"):
        paged_attention(layer, q, k, v, None)  # (outside any step)


def test_decode_kernel_refuses_inconsistent_inputs():
    kernel = _kernel()
    cache, tables, (q, _, _) = _setup([5, 6])
    group = _groups([[0, 1]], tables, [5, 6])[0]
    out = torch.empty(2, H, D_HEAD)
    qd = q[0].transpose(0, 1).contiguous()  # [D, H, d]
    kernel(qd, cache, 0, group, 0.25, None, None, None, None, out)  # fine
    too_long = DecodeGroup(rows=None, blocks=group.blocks, lens=torch.tensor([5, 99]))
    with pytest.raises(ValueError, match="inconsistent"):
        kernel(qd, cache, 0, too_long, 0.25, None, None, None, None, out)
    past_the_end = DecodeGroup(rows=None, blocks=torch.tensor([[1, 2], [NUM_BLOCKS, 3]]),
                               lens=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="inconsistent"):
        kernel(qd, cache, 0, past_the_end, 0.25, None, None, None, None, out)
    with pytest.raises(ValueError, match="inconsistent"):
        kernel(qd.double(), cache, 0, group, 0.25, None, None, None, None, out.double())
    with pytest.raises(ValueError, match="inconsistent"):  # a bf16 query, an fp32 output
        kernel(qd.bfloat16(), cache, 0, group, 0.25, None, None, None, None, out)
    with pytest.raises(ValueError, match="inconsistent"):  # an fp16 query
        kernel(qd.half(), cache, 0, group, 0.25, None, None, None, None, out.half())
    kernel(qd.bfloat16(), cache, 0, group, 0.25, None, None, None, None, out.bfloat16())  # a bf16 model: fine


def test_decode_attention_choice():
    assert choose_decode_attention("sdpa", torch.device("cpu"), torch.float32) is None
    assert choose_decode_attention("auto", torch.device("cuda"), torch.bfloat16) is None
    assert choose_decode_attention("auto", torch.device("cpu"), torch.float16) is None
    if HAS_CC:
        assert choose_decode_attention("auto", torch.device("cpu"), torch.bfloat16) is not None
    with pytest.raises(ValueError, match="fp32 or bf16 on the CPU"):
        choose_decode_attention("cpu", torch.device("cuda"), torch.float32)
    # --kv-cache-dtype: the kernel takes a cache of either dtype under a model of either
    cpu = torch.device("cpu")
    assert choose_decode_attention("auto", cpu, torch.float16, torch.float32) is None
    assert choose_decode_attention("auto", cpu, torch.float32, torch.float16) is None
    with pytest.raises(ValueError, match="float32 with a float16 KV cache on cpu"):
        choose_decode_attention("cpu", cpu, torch.float32, torch.float16)
    if HAS_CC:
        assert choose_decode_attention("auto", cpu, torch.float32, torch.bfloat16) is not None
        assert choose_decode_attention("auto", cpu, torch.bfloat16, torch.float32) is not None


@pytest.mark.parametrize("head_dim", [16, 144])  # (wider than 128: a chunk folded too)
@pytest.mark.parametrize("expand_kv", [False, True])  # the CPU's form, CUDA's
@pytest.mark.parametrize("queries", [1, 5])  # a decode (query heads folded), a prefill chunk
def test_grouped_query_sdpa_equals_each_head_attending_alone(queries, expand_kv, head_dim):
    """Every form of sdpa (query heads folded into rows for a decode or a wide-headed
    chunk, K/V repeated per head or enable_gqa for a chunk) computes, for each query head
    h, plain attention over K/V head h // 4 (HF's repeat_kv order), checked on the CPU."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, queries, head_dim, generator=g) / 3  # [N, H, q, d]
    k, v = (torch.randn(3, 2, 20, head_dim, generator=g) for _ in range(2))  # [N, KVH, L, d]
    mask = torch.rand(3, 1, queries, 20, generator=g) > 0.3
    mask[..., 0] = True  # every row sees a position
    got = sdpa(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, mask, 0.05,
               expand_kv=expand_kv)  # (a strided q, as the decode path passes; a scale of its own)
    for head in range(8):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, head:head + 1], k[:, head // 4:head // 4 + 1], v[:, head // 4:head // 4 + 1],
            attn_mask=mask, scale=0.05)
        torch.testing.assert_close(got[:, head:head + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("masked", [False, True])  # causal (a fresh prefill), a mask
def test_math_attention_is_eager_attention_with_capped_scores_and_sinks(masked, sinks):
    """math_attention (where SDPA cannot go: Gemma 2's soft-capped scores, GPT-OSS's sinks),
    for each query head h over K/V head h // 4: softmax(cap * tanh(q k^T scale / cap)) v,
    a sink logit per head in the softmax when given."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 6, 16, generator=g) * 3  # [N, H, q, d]
    k, v = (torch.randn(2, 2, 6, 16, generator=g) for _ in range(2))  # [N, KVH, L, d]
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True  # every row sees a position
    sink = torch.linspace(-1, 3, 8) if sinks else None  # [H]
    got = math_attention(q, k, v, mask, 0.25, softcap=1.5, sinks=sink)  # [N, H, q, d]
    allowed = mask if masked else torch.ones(6, 6, dtype=torch.bool).tril()
    for head in range(8):
        scores = q[:, head].double() @ k[:, head // 4].double().transpose(1, 2) * 0.25
        scores = (torch.tanh(scores / 1.5) * 1.5).masked_fill(~allowed[:, 0] if masked
                                                              else ~allowed, float("-inf"))
        if sinks:
            scores = torch.cat([scores, sink[head].double().expand(*scores.shape[:2], 1)], -1)
        want = torch.softmax(scores, -1)[..., :6] @ v[:, head // 4].double()  # [N, q, d]
        torch.testing.assert_close(got[:, head].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("queries,masked", [(1, True), (5, True), (9, False)])
def test_math_attention_in_pieces_is_math_attention(queries, masked, sinks, monkeypatch):
    """Over more than MATH_SCORES scores, math_attention takes the context in pieces with a
    running softmax: the numbers of holding them all, for a decode, a masked chunk (rows
    whose first pieces are all masked) and a causal one."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, queries, 16, generator=g) * 3  # [N, H, q, d]
    k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(2))  # [N, KVH, L, d]
    mask = None
    if masked:
        mask = torch.rand(2, 1, queries, 9, generator=g) > 0.3
        mask[..., :4] = False  # nothing to see in the first two pieces
        mask[..., 6] = True
    sink = torch.linspace(-1, 3, 8) if sinks else None  # [H]
    whole = math_attention(q, k, v, mask, 0.3, softcap=1.5, sinks=sink)
    monkeypatch.setattr(attention, "MATH_SCORES", 2 * 8 * queries * 2)  # 2 positions a piece
    pieces = math_attention(q, k, v, mask, 0.3, softcap=1.5, sinks=sink)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expand_kv", [False, True])  # the CPU's form, CUDA's
@pytest.mark.parametrize("queries,masked", [(1, True), (5, True), (6, False)])
def test_sdpa_with_sinks_is_math_attention_with_sinks(queries, masked, expand_kv):
    """Sinks through SDPA (one more key that every query sees, scored by one more query
    entry): math_attention's numbers, for a decode, a masked prefill chunk and a causal
    one, grouped-query heads; a sink weighs no value, so the outputs shrink."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, queries, 20, generator=g)  # [N, H, q, d] (d: not a multiple of 8)
    k, v = (torch.randn(2, 2, 6, 20, generator=g) for _ in range(2))  # [N, KVH, L, d]
    mask = None
    if masked:
        mask = torch.rand(2, 1, queries, 6, generator=g) > 0.3
        mask[..., 0] = True  # every row sees a position
    sink = torch.linspace(-1, 3, 8)  # [H]
    got = attention.sdpa_with_sinks(q, k, v, mask, 0.3, sink, expand_kv)  # [N, H, q, d]
    torch.testing.assert_close(got, math_attention(q, k, v, mask, 0.3, sinks=sink),
                               rtol=1e-5, atol=1e-6)
    assert got.norm() < 0.9 * attention.sdpa(q, k, v, mask, 0.3, expand_kv).norm()


def test_sdpa_calls_the_form_each_case_wants(monkeypatch):
    """The same numbers either way (above), so the forms are checked here: a masked decode
    folds its query heads ([N, KVH, H / KVH, d], K/V unexpanded); an unmasked prefill passes
    enable_gqa, K/V unexpanded (flash takes it on CUDA); a masked prefill with expand_kv
    repeats K/V per head and does not also pass enable_gqa (that leaves only SDPA's math
    kernel on CUDA); without expand_kv (the CPU) it passes enable_gqa, or folds its query
    heads where they are wider than 128 ([N, KVH, H / KVH * q, d]) and make at most
    FOLD_ROWS rows. Values of another size are padded to the keys' first."""
    calls, value_widths, real = [], [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), k.shape[1], bool(kwargs.get("enable_gqa"))))
        value_widths.append(v.shape[3])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    sdpa(torch.randn(3, 8, 1, 16), k, v, torch.ones(3, 1, 1, 20, dtype=torch.bool), None,
         expand_kv=True)
    assert calls[-1] == ((3, 2, 4, 16), 2, False)
    q, k, v = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    sdpa(q, k, v, None, None, expand_kv=True)
    assert calls[-1] == ((1, 8, 5, 16), 2, True)
    sdpa(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril(), None, expand_kv=True)
    assert calls[-1] == ((1, 8, 5, 16), 8, False)
    sdpa(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril(), None, expand_kv=False)
    assert calls[-1] == ((1, 8, 5, 16), 2, True)
    q, k, v = torch.randn(1, 8, 5, 144), torch.randn(1, 2, 5, 144), torch.randn(1, 2, 5, 144)
    sdpa(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril(), None, expand_kv=False)
    assert calls[-1] == ((1, 2, 20, 144), 2, False)
    monkeypatch.setattr(attention, "FOLD_ROWS", 16)  # a longer chunk: its mask not repeated
    sdpa(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril(), None, expand_kv=False)
    assert calls[-1] == ((1, 8, 5, 144), 2, True)
    # values narrower than the keys: padded to their width (one head size for flash)
    out = sdpa(q, k, v[..., :100], torch.ones(5, 5, dtype=torch.bool).tril(), None,
               expand_kv=False)
    assert calls[-1] == ((1, 8, 5, 144), 2, True) and value_widths[-1] == 144
    assert out.shape == (1, 8, 5, 100)


@pytest.mark.parametrize("expand_kv", [False, True])
def test_sdpa_without_a_mask_is_causal(expand_kv):
    """A prefill with no cached prefix passes no mask (SDPA's own causal mask, faster):
    the same as the explicit lower-triangular mask of prefill_mask."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 12, 16, generator=g)  # [1, H, q, d]
    k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(2))  # [1, KVH, q, d]
    tril = torch.ones(12, 12, dtype=torch.bool).tril()
    causal = sdpa(q, k, v, None, None, expand_kv=expand_kv)
    torch.testing.assert_close(causal, sdpa(q, k, v, tril, None, expand_kv=False),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(causal, sdpa(q, k, v, torch.ones_like(tril), None,
                                           expand_kv=False), atol=1e-3)  # the mask matters
