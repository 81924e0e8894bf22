"""Big CPU buffers on transparent huge pages (2 MiB instead of 4 KiB).

Every decode step reads the adapters' slot pools of the batch (tens of MB, a few KB per
row block, scattered over the pool) and the cached keys and values of every sequence.
With 4 KiB pages each of those reads misses the TLB: on the 2-core bench machine, the CPU
LoRA kernel read 32 tokens' adapters (120 MB) at 25 GB/s from 4 KiB pages and at 33 GB/s
from huge ones, the same code in the same process. (The KV cache is placed the same way,
not measured apart; the base's oneDNN weights gained nothing from huge pages.)

Linux backs a private anonymous mapping with huge pages when asked (madvise
MADV_HUGEPAGE; transparent_hugepage mode "madvise" or "always"). Elsewhere, or for a buffer
smaller than one huge page, `zeros` is plain torch.zeros.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes


def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """[numel] zeros of `dtype` in CPU memory the kernel is asked to back with huge pages
    (as the memory is first touched). The tensor keeps its mapping alive."""
    nbytes = numel * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.zeros(numel, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(advice)
    except OSError:  # transparent huge pages off ("never") or not built in: 4 KiB pages
        pass
    tensor = torch.frombuffer(buf, dtype=dtype)  # zero-filled by the kernel
    tensor.zero_()  # resident now, as torch.zeros would be: no page faults in a step
    return tensor

