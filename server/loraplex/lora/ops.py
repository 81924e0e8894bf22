"""The LoRA delta for a batch whose tokens use different adapters.

Every backend computes exactly this loop (the definition the tests check):

    for t in range(tokens):
        s = slots[t]
        y[t] += B[s] @ (A[s] @ x[t])

Slot 0 of the pool is all zeros (the base model), so tokens without an adapter
need no special case. The PEFT scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA) is folded into B when an adapter is copied into its slot. Ranks smaller
than the pool's r_max are zero-padded; `rank` lets a backend skip the padding
columns when no adapter in the batch needs them.

Backends:
- `lora_delta_loop`: the definition itself; slow, used by tests.
- `lora_delta_gather`: gathers each token's A and B and runs two batched
  matmuls. Cost does not grow with the number of distinct adapters; best when
  tokens are few (decode steps).
- `lora_delta_grouped`: one pair of matmuls per distinct slot over that slot's
  tokens. Best when many tokens share few adapters (prefill).

`choose_backend` picks between the last two once per step.
"""

from __future__ import annotations

from typing import Callable

import torch

LoraDelta = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


def lora_delta_loop(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    slots: torch.Tensor, rank: int) -> None:
    """y: [T, out] (updated in place), x: [T, in], A: [S, r_max, in], B: [S, out, r_max],
    slots: [T] int64, rank: columns of A/B that may be non-zero in this batch."""
    for t in range(x.shape[0]):
        s = int(slots[t])
        y[t] += B[s, :, :rank] @ (A[s, :rank] @ x[t])


def lora_delta_gather(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      slots: torch.Tensor, rank: int) -> None:
    a = A[slots, :rank]  # [T, rank, in]
    b = B[slots, :, :rank]  # [T, out, rank]
    h = torch.bmm(a, x.unsqueeze(-1))  # [T, rank, 1]
    y += torch.bmm(b, h).squeeze(-1)  # [T, out]


def lora_delta_grouped(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       slots: torch.Tensor, rank: int) -> None:
    for s in torch.unique(slots).tolist():
        if s == 0:
            continue  # the zero slot adds nothing
        idx = (slots == s).nonzero().squeeze(-1)  # [T_s]
        h = x.index_select(0, idx) @ A[s, :rank].T  # [T_s, rank]
        y.index_add_(0, idx, h @ B[s, :, :rank].T)  # [T_s, out]


BACKENDS: dict[str, LoraDelta] = {
    "loop": lora_delta_loop,
    "gather": lora_delta_gather,
    "grouped": lora_delta_grouped,
}


def choose_backend(name: str, num_tokens: int, num_adapters: int) -> LoraDelta:
    """`name` from EngineConfig.lora_backend; "auto" decides per step.

    Gathering copies rank * (in + out) weights per token; grouping launches a
    few small kernels per distinct adapter. Many tokens per adapter -> group.
    """
    if name != "auto":
        return BACKENDS[name]
    if num_tokens >= GROUPED_MIN_TOKENS_PER_ADAPTER * max(num_adapters, 1):
        return lora_delta_grouped
    return lora_delta_gather


GROUPED_MIN_TOKENS_PER_ADAPTER = 16
