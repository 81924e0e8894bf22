"""The KV block allocator (loraplex.engine.kv_cache)."""

import pytest

from loraplex.engine.kv_cache import BlockAllocator, block_key, blocks_needed


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_grow_and_free():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    a, b = [], []
    alloc.grow(a, 5)  # 2 blocks
    alloc.grow(b, 4)  # 1 block
    assert len(a) == 2 and len(b) == 1 and alloc.num_free == 3
    assert len(set(a) | set(b)) == 3  # no block handed out twice
    alloc.grow(a, 8)  # still fits in 2 blocks
    assert len(a) == 2
    alloc.grow(a, 9)
    assert len(a) == 3 and alloc.num_free == 2
    assert alloc.usage() == pytest.approx(4 / 6)
    alloc.free(a)
    assert a == [] and alloc.num_free == 5


def test_cannot_overcommit():
    alloc = BlockAllocator(num_blocks=2, block_size=4)
    t = []
    assert alloc.can_grow(t, 8)
    assert not alloc.can_grow(t, 9)
    with pytest.raises(RuntimeError):
        alloc.grow(t, 9)
    assert alloc.num_free == 2  # a failed grow takes nothing


def test_freed_blocks_are_reused():
    alloc = BlockAllocator(num_blocks=3, block_size=2)
    a, b = [], []
    alloc.grow(a, 6)
    alloc.free(a)
    alloc.grow(b, 6)
    assert sorted(b) == [0, 1, 2]


def test_kv_cache_gather_copies_whole_blocks_into_reused_buffers():
    import torch

    from loraplex.model.attention import KVCache

    cache = KVCache(num_layers=2, num_blocks=4, block_size=4, shapes={0: (2, 3, 3), 1: (2, 3, 3)},
                    dtype=torch.float32, device=torch.device("cpu"))
    for layer in range(2):
        cache.k[layer].copy_(torch.randn_like(cache.k[layer]))
        cache.v[layer].copy_(torch.randn_like(cache.v[layer]))

    def rows(blocks):  # the cache rows (token slots) of these blocks, in order
        return torch.cat([torch.arange(b * 4, b * 4 + 4) for b in blocks])

    k, v = cache.gather(1, torch.tensor([3, 0, 3, 1]))
    assert k.shape == (16, 2, 3)
    assert torch.equal(k, cache.k[1][rows([3, 0, 3, 1])])
    assert torch.equal(v, cache.v[1][rows([3, 0, 3, 1])])
    k2, v2 = cache.gather(0, torch.tensor([2]))  # fewer blocks: the same buffers, no allocation
    assert k2.data_ptr() == k.data_ptr() and v2.data_ptr() == v.data_ptr()
    assert torch.equal(k2, cache.k[0][rows([2])]) and torch.equal(v2, cache.v[0][rows([2])])
    k3, _ = cache.gather(0, torch.tensor([0, 1, 2, 3, 0, 1]))  # more than ever: buffers grow
    assert torch.equal(k3, cache.k[0][rows([0, 1, 2, 3, 0, 1])])


def test_decodes_are_grouped_by_context_length():
    from loraplex.model.attention import GROUP_COST_BLOCKS, group_decodes

    assert group_decodes([3, 3, 4, 3]) == [[0, 1, 2, 3]]  # similar lengths: one call, in order
    assert group_decodes([]) == []
    # one long context among short ones gets a call of its own instead of padding all of them
    assert group_decodes([2, 90, 3, 2]) == [[1], [0, 2, 3]]
    # a cut is made only where it saves more padded blocks than a group costs
    small = GROUP_COST_BLOCKS // 2
    assert group_decodes([1 + small, 1]) == [[0, 1]]
    assert group_decodes([2 + GROUP_COST_BLOCKS, 1]) == [[0], [1]]
    groups = group_decodes([5, 40, 41, 6, 90, 7])
    assert sorted(i for g in groups for i in g) == list(range(6))  # every decode, once
    assert all(g == sorted(g) for g in groups)


def test_remembered_blocks_are_shared_and_forgotten_tail_first():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    keys = [block_key(b"", "a@1", [1, 2])]
    keys.append(block_key(keys[0], "a@1", [3, 4]))
    table: list[int] = []
    alloc.grow(table, 4)  # blocks 0, 1
    for block, key in zip(table, keys):
        alloc.remember(block, key)
    shared = alloc.cached_prefix(keys)
    assert shared == table and alloc.num_free == 2  # held twice, nothing freed
    alloc.free(shared)
    assert alloc.num_free == 2  # still held by `table`
    alloc.free(table)
    assert alloc.num_free == 4 and alloc.num_remembered == 2  # idle, still findable
    other: list[int] = []
    alloc.grow(other, 6)  # the 2 never-used blocks first, then the idle tail (block 1)
    assert sorted(other) == [1, 2, 3] and alloc.num_remembered == 1
    assert alloc.cached_prefix(keys) == [0]  # the prefix outlived its tail
    assert alloc.num_free == 0
    # a key names the tokens, what came before them and the adapter version
    assert block_key(b"", "a@2", [1, 2]) != keys[0] != block_key(b"", "a@1", [1, 3])
    assert block_key(keys[0], "a@1", [1, 2]) != keys[0]


def test_a_key_already_remembered_keeps_its_block():
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    key = block_key(b"", "", [7, 8])
    first, second = [], []
    alloc.grow(first, 2)
    alloc.grow(second, 2)
    alloc.remember(first[0], key)
    alloc.remember(second[0], key)  # computed the same prefix in the same step
    alloc.free(second)
    assert alloc.num_remembered == 1 and alloc.cached_prefix([key]) == first


def test_a_failed_step_forgets_what_it_was_to_fill():
    alloc = BlockAllocator(num_blocks=3, block_size=2)
    old_key, new_key = block_key(b"", "", [1, 2]), block_key(b"", "", [3, 4])
    table: list[int] = []
    alloc.grow(table, 2)
    alloc.remember(table[0], old_key)
    alloc.settle()  # that step ran
    alloc.grow(table, 4)
    alloc.remember(table[1], new_key)
    found: list[int] = alloc.cached_prefix([new_key])  # found in the same step...
    assert found == [table[1]]
    alloc.forget_unsettled()  # ...which then raised
    assert alloc.cached_prefix([new_key]) == [] and alloc.num_remembered == 1
    alloc.free(found)
    alloc.free(table)
    assert alloc.num_free == 3 and alloc.cached_prefix([old_key]) == [0]


def test_kv_cache_holds_each_layers_own_shape():
    """Keys and values of different sizes (DeepSeek's latent attention), layers of
    different shapes (Gemma 4's global and sliding ones), a layer that caches nothing (a
    linear-attention one): the block's bytes are the sum of what each layer holds."""
    import torch

    from loraplex.model.attention import KVCache

    shapes = {0: (2, 3, 2), 2: (1, 4, 4)}  # layer -> (kv heads, key size, value size)
    cache = KVCache(num_layers=3, num_blocks=5, block_size=4, shapes=shapes,
                    dtype=torch.float32, device=torch.device("cpu"))
    assert [tuple(t.shape) for t in cache.k] == [(20, 2, 3), (0, 0, 0), (20, 1, 4)]
    assert [tuple(t.shape) for t in cache.v] == [(20, 2, 2), (0, 0, 0), (20, 1, 4)]
    assert KVCache.bytes_per_block(4, shapes, torch.float32) == 4 * (2 * 5 + 1 * 8) * 4
    assert KVCache.bytes_per_block(4, shapes, torch.bfloat16) == 4 * (2 * 5 + 1 * 8) * 2
    for layer in (0, 2):
        cache.k[layer].copy_(torch.randn_like(cache.k[layer]))
        cache.v[layer].copy_(torch.randn_like(cache.v[layer]))
    blocks = torch.tensor([4, 1])
    rows = torch.cat([torch.arange(16, 20), torch.arange(4, 8)])
    for layer in (2, 0, 2):  # (the scratch buffers serve both widths)
        k, v = cache.gather(layer, blocks)
        assert torch.equal(k, cache.k[layer][rows]) and torch.equal(v, cache.v[layer][rows])


def test_values_in_keys_are_a_view_of_the_keys():
    """A latent attention layer's values are its keys' first entries: they take no memory
    of their own, and gather gives the keys' first entries."""
    import torch

    from loraplex.model.attention import KVCache

    shapes = {0: (1, 6, 4), 1: (2, 3, 3)}
    cache = KVCache(num_layers=2, num_blocks=3, block_size=2, shapes=shapes,
                    dtype=torch.float32, device=torch.device("cpu"), values_in_keys=frozenset({0}))
    assert KVCache.bytes_per_block(2, shapes, torch.float32, frozenset({0})) == 2 * (6 + 2 * 6) * 4
    cache.k[0].copy_(torch.randn_like(cache.k[0]))
    assert cache.v[0].shape == (6, 1, 4) and torch.equal(cache.v[0], cache.k[0][..., :4])
    k, v = cache.gather(0, torch.tensor([2, 0]))
    rows = [4, 5, 0, 1]
    assert torch.equal(k, cache.k[0][rows]) and torch.equal(v, cache.k[0][rows][..., :4])
