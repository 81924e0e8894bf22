"""The Triton LoRA kernels (loraplex.lora.triton_ops) against the loop that defines the delta.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set here before the
kernels are defined; triton itself is often imported earlier, by bitsandbytes). With
TRITON_INTERPRET=0 in the environment on a CUDA machine, the same tests run the compiled
kernels on the GPU. The interpreter is slow: dims stay small.
"""

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from loraplex.config import LORA_BACKENDS  # noqa: E402
from loraplex.lora.layer import LoraLinear, pool_size, slot_pool  # noqa: E402
from loraplex.lora.ops import (MIN_RUN, LoraPlan, Segments, choose_backend, lora_delta_loop,  # noqa: E402
                               lora_delta_segmented)
from loraplex.lora import triton_ops  # noqa: E402
from loraplex.lora.triton_ops import lora_delta_triton  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)

D_IN, D_OUT, R_MAX = 40, 48, 16  # D_IN not a multiple of the kernel's 64-wide K block
RANKS = [1, 4, 16, 8, 12]  # slots 1..5; slot 0 stays zero


def _pool(ranks: list[int], d_in: int = D_IN, seed: int = 0):
    """As LoraLinear's pool: each slot's A rows then its B rows (slot_pool)."""
    g = torch.Generator().manual_seed(seed)
    slots = len(ranks) + 1
    A, B = slot_pool(torch.zeros(pool_size(slots, R_MAX, d_in, D_OUT)), slots, R_MAX, d_in,
                     D_OUT)  # [S, r_max, in], [S, r_max, out]
    for s, r in enumerate(ranks, start=1):
        A[s, :r] = torch.randn(r, d_in, generator=g)
        B[s, :r] = torch.randn(r, D_OUT, generator=g)
    return A, B


def _plan(slots: torch.Tensor, rank: int | list[int], min_run: int = MIN_RUN) -> LoraPlan:
    """slots: [T] on the CPU (Segments.build reads them there); the plan lives on DEVICE.
    rank: every slot's rank, or each slot's (a list indexed by slot)."""
    slot_ranks = rank if isinstance(rank, list) else [0] + [rank] * max(slots.tolist(), default=0)
    seg = Segments.build(slots, slot_ranks, min_run)
    return LoraPlan(slots=slots.to(DEVICE), rank=max(slot_ranks),
                    segments=None if seg is None else seg.to(DEVICE))


SLOT_PATTERNS = {  # the patterns of test_lora_ops, plus a prefill among decodes
    "sorted": lambda g, n: torch.sort(torch.randint(0, 3, (n,), generator=g)).values,
    "mixed": lambda g, n: torch.randint(0, 6, (n,), generator=g),  # includes 0 = base model
    "one_adapter": lambda g, n: torch.full((n,), 3),
    "base_only": lambda g, n: torch.zeros(n, dtype=torch.long),
    "sparse_slots": lambda g, n: torch.tensor([1, 5] * n)[:n],  # slots 2..4 unused
    # one long run of slot 2 among decodes of other slots and of the base model
    "prefill": lambda g, n: torch.tensor([4, 0, 1, 5] + [2] * max(n - 6, 0) + [3, 0])[:n],
}


def _check(slots: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
           rank: int | list[int],
           dtype: torch.dtype, min_run: int = MIN_RUN, **tolerance) -> torch.Tensor:
    """Runs the Triton delta in `dtype` and the loop in fp32 on the same (rounded) values;
    returns the delta the kernels added. Slot-0 tokens must be left exactly as they were."""
    x, A, B = (t.to(dtype) for t in (x, A, B))
    base = torch.randn(x.shape[0], D_OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = base.float().clone()
    lora_delta_loop(expected, x.float().cpu(), A.float().cpu(), B.float().cpu(),
                    _plan(slots, rank))
    y = base.to(DEVICE, copy=True)
    lora_delta_triton(y, x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), _plan(slots, rank, min_run))
    y = y.cpu()
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, **tolerance)
    assert torch.equal(y[slots == 0], base[slots == 0])  # the base model got nothing
    return y.float() - base.float()


FP32 = dict(rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("num_tokens", [1, 7, 40])
@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_matches_loop_fp32(pattern, num_tokens):
    A, B = _pool(RANKS)
    g = torch.Generator().manual_seed(1)
    slots = SLOT_PATTERNS[pattern](g, num_tokens)  # [T]
    x = torch.randn(slots.numel(), D_IN, generator=g)  # [T, in]
    delta = _check(slots, x, A, B, R_MAX, torch.float32, **FP32)
    assert (delta[slots > 0].abs().amax(dim=1) > 0).all()  # every adapter token moved


def test_long_run_split_over_several_programs(monkeypatch):
    """A 34-token run of one slot, left to the kernels (no split into runs), in blocks of 16
    tokens: three programs share that slot, the last one partly padding, while the decode
    slots get one (mostly padding) each."""
    monkeypatch.setattr(triton_ops, "MAX_BLOCK_T", 16)
    A, B = _pool(RANKS)
    g = torch.Generator().manual_seed(7)
    slots = SLOT_PATTERNS["prefill"](g, 40)
    no_runs = slots.numel() + 1
    assert Segments.build(slots, [0] + [R_MAX] * 5, no_runs).groups[0].width == 34
    x = torch.randn(slots.numel(), D_IN, generator=g)
    delta = _check(slots, x, A, B, R_MAX, torch.float32, min_run=no_runs, **FP32)
    assert (delta[slots > 0].abs().amax(dim=1) > 0).all()


def test_ranks_below_r_max_skip_only_padding():
    """Every adapter here has rank <= 8 in a pool of r_max 16: plan.rank 8 reads half the rows."""
    A, B = _pool([4, 8, 2])
    slots = torch.tensor([2, 1, 0, 3, 2, 2, 1, 0, 3])
    x = torch.randn(slots.numel(), D_IN, generator=torch.Generator().manual_seed(3))
    cut = _check(slots, x, A, B, 8, torch.float32, **FP32)
    full = _check(slots, x, A, B, R_MAX, torch.float32, **FP32)
    torch.testing.assert_close(cut, full)
    assert (cut[slots > 0].abs().amax(dim=1) > 0).all()


def test_ranks_in_different_buckets_get_launches_of_their_own():
    """Slots of rank 1, 4, 16, 8, 12: buckets 1 | 4 | 8 | 16 (12 rounds up to 16)."""
    A, B = _pool(RANKS)
    slots = torch.tensor([3, 1, 0, 4, 5, 2, 3, 5])
    ranks = [0] + RANKS
    plan = _plan(slots, ranks)
    assert [(g.rank, g.used.tolist()) for g in plan.segments.groups] == [
        (1, [1]), (4, [2]), (8, [4]), (16, [3, 5])]
    x = torch.randn(slots.numel(), D_IN, generator=torch.Generator().manual_seed(9))
    delta = _check(slots, x, A, B, ranks, torch.float32, **FP32)
    assert (delta[slots > 0].abs().amax(dim=1) > 0).all()


def test_reads_no_weight_row_past_the_rank():
    """r_max 4 < the 16-row rank block: rows >= plan.rank of every slot, and the memory right
    after the pool, hold NaN; one NaN read into a product would reach y."""
    r_max, rank, slots_n = 4, 3, 3
    g = torch.Generator().manual_seed(8)
    # on DEVICE already, so that the kernels get these views (a copy would drop what follows)
    A_mem = torch.full((slots_n + 1, r_max, D_IN), float("nan"), device=DEVICE)
    B_mem = torch.full((slots_n + 1, r_max, D_OUT), float("nan"), device=DEVICE)
    A, B = A_mem[:slots_n], B_mem[:slots_n]  # [S, r_max, in], [S, r_max, out]; NaN after them
    A[0], B[0] = 0, 0
    A[1:, :rank] = torch.randn(slots_n - 1, rank, D_IN, generator=g)
    B[1:, :rank] = torch.randn(slots_n - 1, rank, D_OUT, generator=g)
    slots = torch.tensor([2, 1, 0, 2, 2])
    x = torch.randn(slots.numel(), D_IN, generator=g)
    delta = _check(slots, x, A, B, rank, torch.float32, **FP32)
    assert (delta[slots > 0].abs().amax(dim=1) > 0).all()


@pytest.mark.parametrize("dtype, tolerance", [
    (torch.bfloat16, dict(rtol=1.6e-2, atol=2e-2)),  # one rounding of y to bf16
    # y rounded to fp16, and on CUDA h enters the expand dot as TF32 (10 mantissa bits, as
    # fp16's): two roundings (the interpreter's exact fp32 h stays within 2e-3)
    (torch.float16, dict(rtol=4e-3, atol=4e-3)),
])
@pytest.mark.parametrize("pattern", ["mixed", "prefill"])
def test_half_precision(pattern, dtype, tolerance):
    """The kernels' own precision (h stays fp32), so every token goes through them here:
    a long run's torch matmuls round h to `dtype` as the segmented backend does."""
    A, B = _pool(RANKS, d_in=64)
    g = torch.Generator().manual_seed(4)
    slots = SLOT_PATTERNS[pattern](g, 40)
    x = torch.randn(slots.numel(), 64, generator=g) / 8  # keeps y well inside fp16's range
    delta = _check(slots, x, A, B, R_MAX, dtype, min_run=slots.numel() + 1, **tolerance)
    assert (delta[slots > 0].abs().amax(dim=1) > 0).all()


def test_strided_input():
    """x as a view with a column stride of 2 (the kernels take every stride as given)."""
    A, B = _pool(RANKS)
    slots = torch.tensor([3, 0, 1, 3, 5, 1])
    wide = torch.randn(slots.numel(), 2 * D_IN, generator=torch.Generator().manual_seed(5))
    x = wide.to(DEVICE)[:, ::2]  # [T, in], stride (2 * in, 2)
    expected = torch.zeros(slots.numel(), D_OUT)
    y = torch.zeros(slots.numel(), D_OUT, device=DEVICE)
    lora_delta_loop(expected, wide[:, ::2], A, B, _plan(slots, R_MAX))
    lora_delta_triton(y, x, A.to(DEVICE), B.to(DEVICE), _plan(slots, R_MAX))
    torch.testing.assert_close(y.cpu(), expected, **FP32)


def test_lora_linear_with_triton_matches_segmented():
    """The backend as LoraLinear calls it: [batch, seq, in] input, y from the base layer."""
    plan = LoraPlan()
    base = torch.nn.Linear(D_IN, D_OUT, device=DEVICE)
    layer = LoraLinear(base, D_IN, D_OUT, len(RANKS) + 1, R_MAX, torch.float32,
                       torch.device(DEVICE), plan)
    A, B = _pool(RANKS)
    for s, r in enumerate(RANKS, start=1):
        layer.set_slot(s, A[s, :r], B[s, :r].T)
    slots = torch.tensor([0, 2, 2, 5, 1, 0, 4, 4])
    x = torch.randn(1, slots.numel(), D_IN, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    outputs = {}
    for name in ("segmented", "triton"):
        plan.start_step(slots, [0] + RANKS, choose_backend(name), torch.device(DEVICE))
        with torch.no_grad():
            outputs[name] = layer(x)  # [1, T, out]
    torch.testing.assert_close(outputs["triton"], outputs["segmented"], **FP32)
    assert not torch.equal(outputs["triton"], base(x).detach())


def test_registered_but_never_automatic():
    assert "triton" in LORA_BACKENDS
    assert choose_backend("triton") is lora_delta_triton
    assert choose_backend("auto", torch.device("cuda"), torch.bfloat16) is lora_delta_segmented


def test_triton_only_imported_on_request():
    code = ("import sys; import loraplex.config, loraplex.lora.ops, loraplex.lora.layer; "
            "assert 'loraplex.lora.triton_ops' not in sys.modules; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
