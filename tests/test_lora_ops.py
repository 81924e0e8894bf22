"""Every LoRA delta backend against the loop that defines it (loraplex.lora.ops)."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from loraplex import cpu_kernels
from loraplex.lora.layer import LoraLinear, pool_size, slot_pool
from loraplex.lora.ops import (BACKENDS, MIN_RUN, LoraPlan, Segments, bgmv_backend,
                               choose_backend, lora_delta_grouped, lora_delta_loop,
                               lora_delta_segmented)

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def _backend(name: str):
    """BACKENDS[name], or the CPU kernel (built here: a compiler on PATH that fails is a
    failure, not a skip)."""
    if name != "bgmv":
        return BACKENDS[name]
    if not HAS_CC:
        pytest.skip("no C compiler on PATH: the bgmv kernel cannot be built")
    lib = cpu_kernels.load()
    assert lib is not None, "the CPU kernel did not build (see the warning logged)"
    return bgmv_backend(lib)


def _pool(slots: int, r_max: int, d_in: int, d_out: int, ranks: list[int], seed: int = 0,
          dtype: torch.dtype = torch.float32, separate: bool = False):
    """A slot pool laid out as LoraLinear's (each slot's A rows then its B rows), or as two
    contiguous tensors (`separate`); values drawn in fp32, rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    if separate:
        A = torch.zeros(slots, r_max, d_in, dtype=dtype)  # [S, r_max, in]
        B = torch.zeros(slots, r_max, d_out, dtype=dtype)  # [S, r_max, out]
    else:
        storage = torch.zeros(pool_size(slots, r_max, d_in, d_out), dtype=dtype)
        A, B = slot_pool(storage, slots, r_max, d_in, d_out)
    for s, r in enumerate(ranks, start=1):  # slot 0 stays zero
        A[s, :r] = torch.randn(r, d_in, generator=g)
        B[s, :r] = torch.randn(r, d_out, generator=g)
    return A, B


def _plan(slots: torch.Tensor, slot_ranks: list[int]) -> LoraPlan:
    """slot_ranks[s]: the rank of slot s's adapter."""
    plan = LoraPlan()
    plan.start_step(slots, slot_ranks, None, torch.device("cpu"))
    return plan


def _uniform(rank: int, slots: int = 8) -> list[int]:
    return [0] + [rank] * slots


SLOT_PATTERNS = {
    "sorted": lambda g, n: torch.sort(torch.randint(0, 3, (n,), generator=g)).values,
    "mixed": lambda g, n: torch.randint(0, 6, (n,), generator=g),  # includes 0 = base model
    "one_adapter": lambda g, n: torch.full((n,), 3),
    "base_only": lambda g, n: torch.zeros(n, dtype=torch.long),
    "sparse_slots": lambda g, n: torch.tensor([1, 5] * n)[:n],  # slots 2..4 unused
    # decodes of slots 1 and 3, then a prefill chunk of slot 2 (a run of its own when long)
    "decodes_then_chunk": lambda g, n: torch.tensor([1, 3] + [2] * n)[:n],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS) + ["bgmv"])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_backend_matches_loop(backend, num_tokens, pattern):
    ranks = [1, 4, 16, 8, 64]
    A, B = _pool(len(ranks) + 1, 64, 32, 48, ranks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, 32, generator=g)  # [T, in]
    slots = SLOT_PATTERNS[pattern](g, num_tokens)  # [T]
    base = torch.randn(num_tokens, 48, generator=g)  # [T, out]

    expected = base.clone()
    for t in range(num_tokens):  # the definition, written out once more
        s = int(slots[t])
        expected[t] += B[s].T @ (A[s] @ x[t])

    y = base.clone()
    _backend(backend)(y, x, A, B, _plan(slots, [0] + ranks))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_rank_truncation_skips_only_zero_padding():
    A, B = _pool(3, 64, 16, 16, [4, 8])
    x = torch.randn(5, 16)
    slots = torch.tensor([1, 2, 0, 2, 1])
    full, cut = torch.zeros(5, 16), torch.zeros(5, 16)
    lora_delta_grouped(full, x, A, B, _plan(slots, [0, 64, 64]))  # every row of the pool
    plan = _plan(slots, [0, 4, 8])
    assert plan.rank == 8  # the batch's largest
    assert [(g.rank, g.used.tolist()) for g in plan.segments.groups] == [(4, [1]), (8, [2])]
    lora_delta_segmented(cut, x, A, B, plan)
    torch.testing.assert_close(cut, full)
    assert cut.abs().sum() > 0
    assert torch.equal(cut[2], torch.zeros(16))  # the base-model token got nothing


def test_ranks_of_one_bucket_share_a_group_and_others_get_their_own():
    """One rank-64 adapter among rank-8 and rank-6 ones: the rank-8 bucket's matmuls read
    8 rows of A and B per slot, not 64. Long runs read their own slot's rank."""
    ranks = [8, 64, 6, 8]
    A, B = _pool(5, 64, 16, 24, ranks)
    slots = torch.tensor([1, 2, 3, 4, 1] + [2] * MIN_RUN + [3] * MIN_RUN)
    plan = _plan(slots, [0] + ranks)
    seg = plan.segments
    assert seg.runs == ((5, 5 + MIN_RUN, 2, 64), (5 + MIN_RUN, 5 + 2 * MIN_RUN, 3, 6))
    assert [(g.rank, g.used.tolist()) for g in seg.groups] == [(8, [1, 3, 4]), (64, [2])]
    assert seg.groups[0].weights(A).shape == (3, 8, 16)
    x = torch.randn(slots.numel(), 16)
    for backend in (lora_delta_segmented, lora_delta_grouped):
        ref, got = torch.zeros(slots.numel(), 24), torch.zeros(slots.numel(), 24)
        lora_delta_loop(ref, x, A, B, plan)
        backend(got, x, A, B, plan)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_segments_layout():
    seg = Segments.build(torch.tensor([0, 3, 2, 3, 0, 3]), _uniform(4))
    assert seg.runs == () and len(seg.groups) == 1
    group = seg.groups[0]
    assert (group.used.tolist(), group.lo, group.width, group.rank) == ([2, 3], 2, 3, 4)
    # slot 2: token 2; slot 3: tokens 1, 3, 5; padding rows point at row 6 (a zero row)
    assert group.gather_index.tolist() == [2, 6, 6, 1, 3, 5]
    assert sorted(zip(group.rows.tolist(), group.tokens.tolist())) == [
        (0, 2), (3, 1), (4, 3), (5, 5)]
    assert Segments.build(torch.zeros(4, dtype=torch.long), _uniform(4)) is None
    assert not group.contiguous


def test_segments_skip_idle_slots_between_busy_ones():
    """Slots 1 and 7 in use: two rows of weights take part, not the seven of 1..7."""
    A, B = _pool(8, 4, 16, 16, [4] * 7)
    slots = torch.tensor([7, 1, 7])
    group = Segments.build(slots, _uniform(4)).groups[0]
    assert (group.used.tolist(), group.lo, group.padded_rows) == ([1, 7], -1, 4)
    assert torch.equal(group.weights(A), A[[1, 7]])
    dense = Segments.build(torch.tensor([2, 3]), _uniform(4)).groups[0]
    assert dense.lo == 2 and dense.weights(A).data_ptr() == A[2].data_ptr()  # a view
    # 4 busy slots over a span of 5 (<= MAX_IDLE_SHARE): idle slot 4 is laid out as padding
    # and the weights are read in place
    nearly = torch.tensor([2, 3, 5, 6, 6])
    group = Segments.build(nearly, _uniform(4)).groups[0]
    assert (group.used.tolist(), group.lo, group.width) == ([2, 3, 4, 5, 6], 2, 2)
    assert group.weights(A).data_ptr() == A[2].data_ptr()
    x = torch.randn(5, 16)
    ref, got = torch.zeros(5, 16), torch.zeros(5, 16)
    lora_delta_loop(ref, x, A, B, _plan(nearly, _uniform(4)))
    lora_delta_segmented(got, x, A, B, _plan(nearly, _uniform(4)))
    torch.testing.assert_close(got, ref)
    x = torch.randn(3, 16)
    ref, got = torch.zeros(3, 16), torch.zeros(3, 16)
    lora_delta_loop(ref, x, A, B, _plan(slots, _uniform(4)))
    lora_delta_segmented(got, x, A, B, _plan(slots, _uniform(4)))
    torch.testing.assert_close(got, ref)


def test_segments_in_batch_order_are_read_in_place():
    def group(slots: list[int]):
        return Segments.build(torch.tensor(slots), _uniform(4)).groups[0]

    in_order = group([0, 0, 1, 1, 2, 2])  # base tokens first, then by slot
    assert in_order.contiguous and in_order.first_token == 2
    assert not group([2, 1]).contiguous  # slots out of order
    assert not group([1, 1, 2]).contiguous  # padding needed


def test_long_runs_get_matmuls_of_their_own():
    """A prefill chunk among decodes is done in place on its rows, not padded to a
    [slots, 50, in] block with the decodes."""
    slots = torch.tensor([1, 2, 3] + [2] * 50 + [0, 0] + [4] * 9)
    seg = Segments.build(slots, _uniform(8))
    assert seg.runs == ((3, 53, 2, 8), (55, 64, 4, 8))
    group, = seg.groups
    assert (group.used.tolist(), group.width, group.contiguous) == ([1, 2, 3], 1, True)
    only_runs = Segments.build(torch.tensor([0] + [5] * MIN_RUN), _uniform(8))
    assert only_runs.runs == ((1, 1 + MIN_RUN, 5, 8),) and only_runs.groups == ()
    assert Segments.build(torch.tensor([5] * MIN_RUN), _uniform(8), MIN_RUN + 1).runs == ()
    ranks = [8, 2, 4, 8, 1]
    A, B = _pool(6, 8, 16, 16, ranks)
    for slots in (slots, torch.tensor([0] + [5] * MIN_RUN)):
        x = torch.randn(slots.numel(), 16)
        ref, got = torch.zeros(slots.numel(), 16), torch.zeros(slots.numel(), 16)
        lora_delta_loop(ref, x, A, B, _plan(slots, [0] + ranks))
        lora_delta_segmented(got, x, A, B, _plan(slots, [0] + ranks))
        torch.testing.assert_close(got, ref)


def test_layer_sees_only_the_adapters_that_target_it():
    """Slot 1's adapter targets some other module; slots 2 and 3's target this one."""
    plan = LoraPlan()
    base = torch.nn.Linear(8, 6)
    layer = LoraLinear(base, 8, 6, num_slots=4, max_rank=4, dtype=torch.float32,
                       device=torch.device("cpu"), plan=plan)
    g = torch.Generator().manual_seed(0)
    for slot in (2, 3):
        layer.set_slot(slot, torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g))
    calls = []

    def counting(y, x, A, B, plan):
        calls.append(plan.slots.tolist())
        lora_delta_segmented(y, x, A, B, plan)

    def step(slots: list[int]) -> torch.Tensor:  # [T, out]
        plan.start_step(torch.tensor(slots), _uniform(4, 3), counting, torch.device("cpu"))
        with torch.no_grad():
            return layer(x)

    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        expected_base = base(x)
        reference = expected_base.clone()
    lora_delta_loop(reference, x, layer.lora_A, layer.lora_B, _plan(torch.tensor([1, 2, 3]),
                                                                     _uniform(4, 3)))

    assert torch.equal(step([1, 1, 0]), expected_base) and calls == []  # skipped altogether
    mixed = step([1, 2, 3])
    assert calls == [[0, 2, 3]]  # slot 1's token runs as the base model's here
    torch.testing.assert_close(mixed, reference)
    assert torch.equal(mixed[0], expected_base[0])
    step([2, 3, 2])
    assert calls[-1] == [2, 3, 2]  # every adapter of the step targets the layer: plan as is
    layer.set_slot(2, None, None)  # slot 2 emptied: it no longer reaches the layer
    assert torch.equal(step([2, 2, 1]), expected_base) and len(calls) == 2


def test_the_layers_plans_are_made_before_the_forward(monkeypatch):
    """start_step makes the narrowed plans of the active sets it is given, so that the
    forward pass makes none (on a GPU, one made there would wait for the queued kernels)."""
    plan = LoraPlan()
    both, two = frozenset({1, 2}), frozenset({2, 3})
    plan.start_step(torch.tensor([1, 2, 2, 0]), _uniform(4, 3), lora_delta_segmented,
                    torch.device("cpu"), [both, two])
    monkeypatch.setattr(LoraPlan, "_narrow", lambda self, active: pytest.fail("made late"))
    assert plan.for_layer(both) is plan  # every adapter of the step targets it
    assert plan.for_layer(two).slots.tolist() == [0, 2, 2, 0]  # slot 1's token: base model


def test_the_runner_hands_the_layers_active_sets_to_the_plan():
    """What makes the eager plans above happen in serving: each step, the runner gives
    start_step the distinct active sets of the model's wrapped layers."""
    from loraplex.model.runner import ModelRunner

    seen = {}
    sets = [frozenset({1}), frozenset({1, 2}), frozenset({1})]
    plan = SimpleNamespace(start_step=lambda slots, ranks, delta, device, active_sets=():
                           seen.update(sets=set(active_sets)))
    runner = SimpleNamespace(slot_ranks=[0, 4, 4], lora_delta=lora_delta_segmented,
                             loaded=SimpleNamespace(
                                 lora_plan=plan, device=torch.device("cpu"),
                                 lora_layers={i: SimpleNamespace(active_slots=s)
                                              for i, s in enumerate(sets)}))
    ModelRunner._set_lora(runner, [1, 2, 0])
    assert seen["sets"] == {frozenset({1}), frozenset({1, 2})}


def test_backend_choice():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_backend("auto", cuda, torch.bfloat16) is lora_delta_segmented
    assert choose_backend("auto", cpu, torch.float16) is lora_delta_segmented  # kernel: fp32, bf16
    assert choose_backend("grouped") is lora_delta_grouped
    with pytest.raises(ValueError, match="fp32 or bf16 on the CPU"):
        choose_backend("bgmv", cuda, torch.float32)
    with pytest.raises(ValueError, match="fp32 or bf16 on the CPU"):
        choose_backend("bgmv", cpu, torch.float16, torch.float32)  # fp16 activations
    if HAS_CC:
        for dtype in (torch.float32, torch.bfloat16):
            assert choose_backend("auto", cpu, dtype).__name__ == "lora_delta_bgmv"


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
def test_kernel_builds_once_into_its_folder(tmp_path):
    """Built under a temporary name and renamed; loaded from the folder after that."""
    lib = cpu_kernels.load(tmp_path)
    assert lib is not None and cpu_kernels.load(tmp_path) is lib
    assert [p.name for p in tmp_path.iterdir()] == [cpu_kernels.library_name()]
    assert cpu_kernels.build(tmp_path) == tmp_path / cpu_kernels.library_name()  # not rebuilt


def test_kernel_without_compiler_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    monkeypatch.delenv("CC", raising=False)
    assert cpu_kernels.load(tmp_path / "kernels") is None
    assert not (tmp_path / "kernels").exists()


def test_triton_backend_is_refused_off_cuda(tiny_models, adapter_root):
    """Chosen at start, not found out at the first step: the kernels need a GPU."""
    from engine_helpers import build_engine
    with pytest.raises(ValueError, match="CUDA only"):
        build_engine(tiny_models["llama"], adapter_root, lora_backend="triton")


def test_bgmv_long_runs_and_tiles():
    """The kernel's tiles (8 tokens of one slot at a time, a shorter last one), a long
    prefill chunk among them (in the kernel too: no matmul pairs), beside scattered
    tokens, against the loop."""
    ranks = [3, 16, 64]
    A, B = _pool(4, 64, 40, 24, ranks, seed=3)
    slots = torch.tensor([2, 1, 3] + [1] * 13 + [0, 3] + [2] * 2053 + [3, 3])
    x = torch.randn(slots.numel(), 40, generator=torch.Generator().manual_seed(4))
    plan = LoraPlan()
    delta = _backend("bgmv")
    plan.start_step(slots, [0] + ranks, delta, torch.device("cpu"))
    assert plan.segments.runs == () and plan.segments.rest_tokens == slots.numel() - 1
    ref, got = torch.ones(slots.numel(), 24), torch.ones(slots.numel(), 24)
    lora_delta_loop(ref, x, A, B, plan)
    delta(got, x, A, B, plan)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("separate", [False, True], ids=["slot_blocks", "separate"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_in,d_out", [(37, 29), (64, 48), (8, 16), (300, 520)])
def test_bgmv_tiles_of_every_shape(pool_dtype, d_in, d_out, separate):
    """The kernel's code paths against the loop: one token alone (a decode) and tiles of 2
    to 8 tokens (register blocks of token pairs, and a single one left over), ranks that
    are and are not multiples of the 4-row blocks, and widths with and without a tail
    past the vector blocks (37 inputs: 4 x 8 + 5; 29 outputs: 16 + 13; 300 and 520: a
    bf16 token's prefetches run past its slot into the next one's), on LoraLinear's pool
    and on separate A and B."""
    if not HAS_CC:
        pytest.skip("no C compiler on PATH")
    ranks = [1, 3, 4, 5, 16]
    A, B = _pool(len(ranks) + 1, 16, d_in, d_out, ranks, seed=7, dtype=pool_dtype,
                 separate=separate)
    assert A.is_contiguous() == separate
    # runs of 1 to 11 tokens of each slot (11 = a tile of 8 and one of 3), base tokens between
    slots = torch.tensor([s for n in range(1, 12) for s in [1 + n % 5] * n + [0]])
    x = torch.randn(slots.numel(), d_in, generator=torch.Generator().manual_seed(8))
    plan = LoraPlan()
    delta = choose_backend("bgmv", torch.device("cpu"), torch.float32, pool_dtype)
    plan.start_step(slots, [0] + ranks, delta, torch.device("cpu"))
    assert not plan.segments.runs  # every token in the kernel
    ref = torch.ones(slots.numel(), d_out)
    got = ref.clone()
    lora_delta_loop(ref, x, A.float(), B.float(), plan)
    delta(got, x, A, B, plan)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float32])
def test_bgmv_bf16_activations(pool_dtype):
    """A bf16 model on the CPU: the kernel reads x's and y's bf16 rows itself, sums every
    adapter token's delta in fp32 (a prefill chunk too), and rounds each row of y once:
    bit for bit the fp32 kernel's sums on the same values, rounded; rows of the base model
    stay as they were."""
    if not HAS_CC:
        pytest.skip("no C compiler on PATH")
    ranks = [3, 16, 8]
    A, B = _pool(4, 16, 40, 24, ranks, seed=9, dtype=pool_dtype)
    A, B = A * 0.2, B * 0.2  # (copies: still each slot's rows contiguous)
    g = torch.Generator().manual_seed(10)
    delta = choose_backend("bgmv", torch.device("cpu"), torch.bfloat16, pool_dtype)
    in_fp32 = choose_backend("bgmv", torch.device("cpu"), torch.float32, pool_dtype)
    for slots in ([2, 1, 3, 0, 3] + [2] * 20 + [0, 0],  # decodes, a chunk, base tokens last
                  [1, 1, 0, 2] + [3] * 12 + [1] * 3):  # ... a short chunk last
        slots = torch.tensor(slots)
        plan = LoraPlan()
        plan.start_step(slots, [0] + ranks, delta, torch.device("cpu"))
        assert plan.segments.runs == ()
        x = torch.randn(slots.numel(), 40, generator=g).to(torch.bfloat16)
        y = torch.randn(slots.numel(), 24, generator=g).to(torch.bfloat16)
        sums = y.float()
        in_fp32(sums, x.float(), A, B, plan)  # [T, 24]
        exact = y.float()
        lora_delta_loop(exact, x.float(), A.float(), B.float(), plan)
        torch.testing.assert_close(sums, exact, rtol=1e-5, atol=1e-5)
        got = y.clone()
        delta(got, x, A, B, plan)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, sums.to(torch.bfloat16))
        assert torch.equal(got[slots == 0], y[slots == 0])
        assert (got[slots > 0] != y[slots > 0]).float().mean() > 0.9  # the deltas count


@pytest.mark.parametrize("slots", [[1, 1, 1, 1], [1, 2, 1, 2]], ids=["tile", "tokens"])
def test_bgmv_rounds_bf16_rows_as_torch_does(slots):
    """y's bf16 rows: the fp32 sum rounded to nearest, ties to even, NaN and infinities
    kept, as torch's .to(bfloat16) (bit for bit, but for NaN's bits, which torch's own
    conversions do not agree on). Rank 1 with A = e_0 makes the delta x[t, 0] * B[0], and
    x[t, 0] = y[t] gives y(1 + B): 1 + 2^-8 is a tie (down to even 1), 1 + 3 * 2^-8 one
    up to even 1 + 2^-6, 1 - 2^-9 and 1 - 3 * 2^-9 ties below 1, one just off a tie; the
    same at y = 2^-3, 4 and -1. bf16's largest + 1e36 rounds to inf; a NaN whose low bits
    would carry into the sign stays NaN. 21 columns: the rows as one tile (4 x 21 values:
    vector blocks and a tail of 4, in row 3) and as tokens alone (a tail of 5 a row)."""
    if not HAS_CC:
        pytest.skip("no C compiler on PATH")
    A, B = _pool(3, 1, 8, 21, [1, 1], seed=0)
    A.zero_(), B.zero_()
    A[1:, 0, 0] = 1.0
    tie = 2.0 ** -8
    ties = [tie, 3 * tie, tie * (1 + 2 ** -10), -tie / 2, -3 * tie / 2, -tie / 2]
    B[1:, 0] = torch.tensor([ties[c % len(ties)] for c in range(21)])
    B[1:, 0, 7:10] = torch.tensor([1e36, 0.0, 0.0])
    B[1:, 0, 8] = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # NaN
    rows = torch.tensor([1.0, 2 ** -3, 4.0, -1.0])
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    x[:, 0] = rows
    y = rows[:, None].expand(4, 21).to(torch.bfloat16).clone()
    y[:, 7] = torch.finfo(torch.bfloat16).max
    y[:, 9] = float("inf")
    delta = choose_backend("bgmv", torch.device("cpu"), torch.bfloat16, torch.float32)
    plan = LoraPlan()
    plan.start_step(torch.tensor(slots), [0, 1, 1], delta, torch.device("cpu"))
    got = y.clone()
    delta(got, x, A, B, plan)
    want = (y.float() + x.float()[:, :1] * B[1, 0]).to(torch.bfloat16)  # [4, 21]
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan[:, 8].all()
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert got[0, 0] == 1.0 and got[0, 1] == 1 + 2 ** -6 and got[0, 7] == float("inf")
    assert got[0, 3] == 1.0 and got[0, 4] == 1 - 2 ** -7  # ties below 1
    assert got[3, 18] == -1.0 and got[3, 19] == -(1 + 2 ** -6)  # in either tail


def test_bgmv_refuses_what_it_would_read_out_of_bounds():
    A, B = _pool(3, 8, 16, 16, [8, 8])
    delta = _backend("bgmv")
    x, y = torch.randn(2, 16), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="within the pool"):
        delta(y, x, A, B, _plan(torch.tensor([1, 3]), [0, 8, 8, 8]))  # slot 3 of 3
    with pytest.raises(ValueError, match=r"y \[T, out\]"):
        delta(torch.zeros(2, 8), x, A, B, _plan(torch.tensor([1, 2]), [0, 8, 8]))  # y: [T, 8]
    with pytest.raises(ValueError, match=r"x \[T, in\]"):
        delta(y, torch.randn(2, 8), A, B, _plan(torch.tensor([1, 2]), [0, 8, 8]))  # x: [T, 8]
    with pytest.raises(ValueError, match="fp32"):
        delta(y.double(), x.double(), A.double(), B.double(), _plan(torch.tensor([1, 2]), [0, 8, 8]))
    plan = _plan(torch.tensor([1, 2]), [0, 8, 8])
    delta(y, x, A, B, plan)
    ref = torch.zeros(2, 16)
    lora_delta_loop(ref, x, A, B, plan)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["bgmv", "segmented", "grouped", "gather"])
def test_bf16_pool_under_fp32_activations(backend):
    """EngineConfig.lora_dtype "bfloat16" on an fp32 model: the kernel reads the bf16 pool
    as it is and sums in fp32 (so it matches the loop on the same rounded weights to fp32
    noise, long runs included); the torch backends compute in bf16 beside y and add to it."""
    if backend == "bgmv" and not HAS_CC:
        pytest.skip("no C compiler on PATH")
    ranks = [3, 16, 64]
    A, B = _pool(4, 64, 40, 24, ranks, seed=5, dtype=torch.bfloat16)
    # decodes, tiles of one slot, and a run long enough for the torch backends' matmul pair
    slots = torch.tensor([2, 1, 3] + [1] * 13 + [0, 3] + [2] * 261 + [3, 3])
    x = torch.randn(slots.numel(), 40, generator=torch.Generator().manual_seed(6))  # fp32
    delta = choose_backend(backend, torch.device("cpu"), torch.float32, torch.bfloat16)
    plan = LoraPlan()
    plan.start_step(slots, [0] + ranks, delta, torch.device("cpu"))
    ref, got = torch.ones(slots.numel(), 24), torch.ones(slots.numel(), 24)
    lora_delta_loop(ref, x, A.float(), B.float(), plan)
    delta(got, x, A, B, plan)
    assert got.dtype == torch.float32
    if backend == "bgmv":
        assert plan.segments.runs == () and plan.segments.groups == ()  # `rest` alone
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    else:  # x and the sums rounded to bf16 (|delta| up to ~200 here)
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=1.0)


def test_pool_dtype_choice():
    cpu = torch.device("cpu")
    same = choose_backend("segmented", cpu, torch.float32, torch.float32)
    assert same is lora_delta_segmented  # no cast around a pool of the activations' dtype
    assert choose_backend("segmented", cpu, torch.float32, torch.bfloat16).__name__ == \
        "lora_delta_cast"
    # fp16 weights: no kernel reads them; auto falls back to torch ops, bgmv refuses
    assert choose_backend("auto", cpu, torch.float32, torch.float16).__name__ == \
        "lora_delta_cast"
    with pytest.raises(ValueError, match="float32 or bfloat16 adapter weights"):
        choose_backend("bgmv", cpu, torch.float32, torch.float16)
    if HAS_CC:
        assert choose_backend("auto", cpu, torch.float32, torch.bfloat16).__name__ == \
            "lora_delta_bgmv"
