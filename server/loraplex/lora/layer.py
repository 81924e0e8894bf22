"""A linear layer that adds each token's own LoRA delta on top of a shared base.

The base layer (nn.Linear, a oneDNN PackedLinear on the CPU, bnb Linear4bit or
Linear8bitLt) runs once for the whole packed batch; the adapters live in a slot pool
next to it:

    A: [slots, r_max, in]    B: [slots, r_max, out]   (slot 0 stays zero = no adapter)

(one block of memory per slot, its A rows then its B rows: `slot_pool`).

`LoraPlan` (loraplex.lora.ops) carries what a step needs: which slot each token
uses, the largest rank in the batch, the tokens grouped by slot, the backend.
The runner fills it once per step on the one object all wrapped layers share;
the model code never knows about LoRA. Every linear of the decoder layers is wrapped,
whatever the adapters target; a layer computes the delta only for the tokens whose
adapter targets it, and nothing at all when none does (k, o and the MLP, for adapters
on PEFT's default q and v).
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.lora.ops import LoraPlan


def pool_size(num_slots: int, max_rank: int, in_features: int, out_features: int) -> int:
    """Values in one layer's slot pool, A and B."""
    return num_slots * max_rank * (in_features + out_features)


def slot_pool(storage: torch.Tensor, num_slots: int, max_rank: int, in_features: int,
              out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, r_max, in] and B [S, r_max, out] (B transposed: a slot's rows are contiguous)
    as views of `storage` (pool_size(...) values), slot by slot: slot s's A rows, then its
    B rows, then slot s + 1's. A decode step reads each of its tokens' slots whole, in slot
    order, so one slot is one stream of memory and slots side by side one longer stream.
    The CPU kernel alone read 32 tokens' adapters (all linear layers, rank 16) in 4.4 ms
    laid out so against 4.8 ms from separate A and B pools (fp32), 2.1 against 2.4 ms
    (bf16); in whole decode steps the difference was inside the noise (+-1 ms)."""
    blocks = storage.view(num_slots, max_rank * (in_features + out_features))
    a_size = max_rank * in_features
    return (blocks[:, :a_size].unflatten(1, (max_rank, in_features)),
            blocks[:, a_size:].unflatten(1, (max_rank, out_features)))


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int,
                 num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device,
                 plan: LoraPlan, lora_dtype: torch.dtype | None = None,
                 storage: torch.Tensor | None = None):
        """dtype: the activations'; lora_dtype: the slot pool's (default: dtype). storage:
        zeros of lora_dtype to hold the pool, pool_size(...) of them (default: new ones)."""
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.plan = plan
        size = pool_size(num_slots, max_rank, in_features, out_features)
        if storage is None:
            storage = torch.zeros(size, dtype=lora_dtype or dtype, device=device)
        assert storage.shape == (size,), "storage: pool_size(...) values"
        A, B = slot_pool(storage, num_slots, max_rank, in_features, out_features)
        self.register_buffer("lora_A", A, persistent=False)  # [S, r_max, in]
        self.register_buffer("lora_B", B, persistent=False)  # [S, r_max, out]
        # slots whose adapter targets this layer; replaced, never changed in place, so that
        # the step's plan can keep its answer per set (LoraPlan.for_layer)
        self.active_slots: frozenset[int] = frozenset()

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's layers give it), for model code that reads its
        dtype or shape (HunYuan-MoE's router, Ergo's layers)."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        y = self.base_layer(x)  # [..., out]
        plan = self.plan.for_layer(self.active_slots)
        if plan is None:  # no adapter of this step targets this layer
            return y
        if y.dtype != self.dtype:  # a quantized base layer may return another dtype
            y = y.to(self.dtype)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        plan.delta(y.view(-1, self.out_features), x.reshape(-1, self.in_features),
                   self.lora_A, self.lora_B, plan)
        return y

    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into `slot` (None clears it),
        rounded to the pool's dtype. The cache fills a slot on the engine thread before a
        step and clears one (on any thread) only when no request holds it, so a running
        step never reads a slot that changes, nor an active set that changes for it."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if A is None:
            self.active_slots = self.active_slots - {slot}
            return
        self.active_slots = self.active_slots | {slot}
        r = A.shape[0]
        # to the pool's device first, as they are: from pinned host memory (the cache pins
        # on CUDA) an asynchronous copy; then rounded there. (A blocking copy_ that also
        # converts would convert on the CPU, into unpinned memory, and copy from that.)
        device = self.lora_A.device
        self.lora_A[slot, :r].copy_(A.to(device, non_blocking=True))
        self.lora_B[slot, :r].copy_(B.to(device, non_blocking=True).T)
