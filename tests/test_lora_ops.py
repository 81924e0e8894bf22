"""Every LoRA delta backend against the loop that defines it (loraplex.lora.ops)."""

import pytest
import torch

from loraplex.lora.ops import BACKENDS, choose_backend, lora_delta_gather, lora_delta_grouped, lora_delta_loop


def _pool(slots: int, r_max: int, d_in: int, d_out: int, ranks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(slots, r_max, d_in)  # [S, r_max, in]
    B = torch.zeros(slots, d_out, r_max)  # [S, out, r_max]
    for s, r in enumerate(ranks, start=1):  # slot 0 stays zero
        A[s, :r] = torch.randn(r, d_in, generator=g)
        B[s, :, :r] = torch.randn(d_out, r, generator=g)
    return A, B


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_backend_matches_loop(backend, num_tokens):
    ranks = [1, 4, 16, 8, 64]
    A, B = _pool(len(ranks) + 1, 64, 32, 48, ranks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, 32, generator=g)  # [T, in]
    slots = torch.randint(0, len(ranks) + 1, (num_tokens,), generator=g)  # includes 0 = base
    base = torch.randn(num_tokens, 48, generator=g)  # [T, out]

    expected = base.clone()
    for t in range(num_tokens):  # the definition, written out once more
        s = int(slots[t])
        expected[t] += B[s] @ (A[s] @ x[t])

    y = base.clone()
    BACKENDS[backend](y, x, A, B, slots, 64)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_rank_truncation_skips_only_zero_padding():
    A, B = _pool(3, 64, 16, 16, [4, 8])
    x = torch.randn(5, 16)
    slots = torch.tensor([1, 2, 0, 2, 1])
    full, cut = torch.zeros(5, 16), torch.zeros(5, 16)
    lora_delta_loop(full, x, A, B, slots, 64)
    lora_delta_gather(cut, x, A, B, slots, 8)  # batch max rank is 8
    torch.testing.assert_close(cut, full)
    assert cut.abs().sum() > 0
    assert torch.equal(cut[2], torch.zeros(16))  # the base-model token got nothing


def test_grouped_leaves_base_tokens_untouched():
    A, B = _pool(2, 8, 16, 16, [8])
    y = torch.ones(3, 16)
    lora_delta_grouped(y, torch.randn(3, 16), A, B, torch.tensor([0, 0, 0]), 8)
    assert torch.equal(y, torch.ones(3, 16))


def test_auto_choice():
    assert choose_backend("auto", 32, 32) is lora_delta_gather  # decode step, many adapters
    assert choose_backend("auto", 2048, 2) is lora_delta_grouped  # long prefills, few adapters
    assert choose_backend("loop", 1, 1) is lora_delta_loop
