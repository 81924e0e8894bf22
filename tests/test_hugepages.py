"""Big CPU buffers on huge pages (loraplex.hugepages): the slot pools and the KV cache."""

from pathlib import Path

import pytest
import torch

from loraplex import hugepages
from loraplex.model.attention import KVCache
from tests.engine_helpers import build_engine

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_ON = THP.exists() and "[never]" not in THP.read_text()


def huge_kb(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds the tensor's first byte (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    address = tensor.data_ptr()
    for i, line in enumerate(lines):
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            lo, hi = (int(v, 16) for v in first.split("-"))
            if lo <= address < hi:
                entry = next(e for e in lines[i + 1:] if e.startswith("AnonHugePages:"))
                return int(entry.split()[1])
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zeros_are_zeros_of_their_dtype_and_writable(dtype):
    for numel in (10, (4 << 20) // dtype.itemsize + 3):  # below one huge page, and above
        t = hugepages.zeros(numel, dtype)
        assert t.shape == (numel,) and t.dtype == dtype and not t.any()
        t[-1] = 3
        assert t[-1] == 3 and t.sum() == 3


@pytest.mark.skipif(not THP_ON, reason="transparent huge pages are off on this machine")
def test_big_buffers_are_on_huge_pages():
    t = hugepages.zeros(8 << 20, torch.float32)  # 32 MiB
    assert huge_kb(t) >= 2048
    small = hugepages.zeros(1000, torch.float32)  # a plain tensor: no mapping of its own
    assert torch.equal(small, torch.zeros(1000))


@pytest.mark.skipif(not THP_ON, reason="transparent huge pages are off on this machine")
def test_engine_pools_and_kv_cache_live_on_huge_pages(tiny_models, adapter_root):
    """Every layer's slot pool is a view of one buffer on huge pages, A and B side by side;
    the KV cache's layers are too (when each is at least one huge page)."""
    engine = build_engine(tiny_models["llama"], adapter_root, max_gpu_adapters=64, max_cpu_adapters=64,
                          max_lora_rank=64)
    layers = list(engine.loaded.lora_layers.values())
    storage = {layer.lora_A.untyped_storage().data_ptr() for layer in layers}
    storage |= {layer.lora_B.untyped_storage().data_ptr() for layer in layers}
    assert len(storage) == 1  # one buffer
    pool_bytes = sum(l.lora_A.nbytes + l.lora_B.nbytes for l in layers)
    assert layers[0].lora_A.untyped_storage().nbytes() == pool_bytes
    assert pool_bytes >= 4 * hugepages.HUGE_PAGE, "a pool too small to tell"
    assert huge_kb(layers[0].lora_A) >= 2048
    cache = KVCache(num_layers=2, num_blocks=256, block_size=16,
                    shapes={0: (4, 64, 64), 1: (4, 64, 64)}, dtype=torch.float32,
                    device=torch.device("cpu"))  # 4 MiB a layer
    assert all(huge_kb(t) >= 2048 for t in cache.k + cache.v)
