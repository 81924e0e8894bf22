"""The LoRA delta for a batch whose tokens use different adapters.

Every backend computes exactly this loop (the definition the tests check):

    for t in range(tokens):
        s = slots[t]
        y[t] += (A[s] @ x[t]) @ B[s]

with A: [slots, r_max, in] and B: [slots, r_max, out] (B is stored transposed, so
both factors are row-major along the rank). Slot 0 of the pool is all zeros (the
base model). The PEFT scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is
folded into B when the store reads an adapter. Ranks below r_max are
zero-padded; `plan.rank` (the batch's largest) and the segments' per-run and per-group
ranks let a backend skip padding rows.

Backends, all `fn(y, x, A, B, plan)` with the step's `LoraPlan`:
- `lora_delta_loop`: the definition itself; slow, used by tests.
- `lora_delta_gather`: copies each token's A and B, two batched matmuls.
- `lora_delta_grouped`: a pair of matmuls per distinct slot over that slot's tokens.
- `lora_delta_segmented` (the default except for fp32 and bf16 on the CPU with the C
  kernel):
  each long run of one slot's tokens (a prefill chunk) gets a pair of matmuls on views,
  at its adapter's rank; the other tokens (decodes) are grouped by slot into a padded
  [slots, tokens, in] block per rank bucket (`rank_bucket`), and each block gets two batched matmuls that read the weights
  of its slots (in place when those slots are consecutive, else a copy of just them).
  The layout is built once per step, see `Segments`.
- `bgmv_backend(lib, dtype)` (the default for fp32 and bf16 on the CPU): every adapter
  token through a C kernel (cpu_kernels.c) that reads each token's slot in place at its
  own rank, from an fp32 or a bf16 pool; a run of one slot's tokens (a prefill chunk) 8
  tokens at a time; bf16 activations read and written by the kernel itself.
- `lora_delta_triton` (triton_ops.py, CUDA, opt-in): the segmented layout in Triton.

A backend may carry `min_run`, the shortest run it wants as a matmul pair (default
MIN_RUN), and `groups = False` when it never reads `Segments.groups`; `LoraPlan.start_step`
builds the segments with them.

The slot pool may hold another dtype than the activations (EngineConfig.lora_dtype, e.g.
bf16 adapters on an fp32 model): the CPU kernel reads bf16 pools as they are, the torch
backends get `with_pool_dtype` around them.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from loraplex import cpu_kernels


# A run of at least this many consecutive tokens of one adapter (a prefill chunk, or the
# decodes of one adapter, which the runner packs side by side) gets a pair of matmuls of its
# own, on views of x and y. Shorter ones (decodes) share one pair of batched matmuls, padded
# to the widest: padding a 50-token chunk among 31 decodes would multiply 32 x 50 rows.
MIN_RUN = 8


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Each token's slot -> (start, stop, slot) of every maximal run of one slot, base
    included. (A list, not a tensor: a decode step has tens of tokens, and a Python loop
    over them costs a tenth of the torch ops that would find the same bounds.)"""
    runs, start = [], 0
    for slot, run in itertools.groupby(slots):
        stop = start + len(list(run))
        runs.append((start, stop, slot))
        start = stop
    return runs


# Reading the weights of the slots in use in place needs them consecutive. When requests
# finish, idle slots open up between busy ones; copying the busy slots' weights costs about
# 1.25x reading them in place, so idle slots are laid out too (their rows all padding) while
# the slots spanned are at most this many times the slots in use.
MAX_IDLE_SHARE = 1.25


def rank_bucket(rank: int) -> int:
    """Slots whose ranks round up to the same power of two share one pair of batched
    matmuls, at the largest of their ranks: one rank-64 adapter among rank-8 ones does not
    make every slot read 64 rows of A and B."""
    return (rank - 1).bit_length()


@dataclass(frozen=True)
class Group:
    """Adapter tokens outside the long runs (decodes), of slots of one rank bucket, laid out
    by slot for one pair of batched matmuls: the u-th slot laid out, used[u], has its i-th
    token at row u * width + i. The idle slots between busy ones are skipped (their weights
    not multiplied through), unless there are few of them."""

    rank: int  # the largest rank among the group's slots: rows of A and B it reads
    used: torch.Tensor  # [U] the slots laid out, ascending (all >= 1): see MAX_IDLE_SHARE
    lo: int  # used[0] when used == arange(lo, lo + U): the weights are a view; else -1
    width: int  # most tokens any slot has
    gather_index: torch.Tensor  # [U * width] token per padded row; padding -> T (a zero row)
    rows: torch.Tensor  # [n] padded rows that hold a token
    tokens: torch.Tensor  # [n] the token in each of those rows
    first_token: int = -1  # >= 0 when tokens == arange(first_token, first_token + n)

    @classmethod
    def build(cls, tokens: torch.Tensor, tok_slots: torch.Tensor, num_tokens: int,
              rank: int) -> Group:
        """tokens: [n] ascending, tok_slots: [n] their slots (CPU), of a T = num_tokens batch."""
        order = torch.argsort(tok_slots, stable=True)
        tokens, tok_slots = tokens[order], tok_slots[order]
        used, tok_u, counts = torch.unique_consecutive(  # [U], [n], [U]
            tok_slots, return_inverse=True, return_counts=True)
        lo, hi = int(used[0]), int(used[-1])
        if used.numel() < hi - lo + 1 <= used.numel() * MAX_IDLE_SHARE:
            # a few idle slots between busy ones (requests that finished): lay them out too
            # (rows of padding) and read the pool in place, rather than copy the busy ones
            used, tok_u = torch.arange(lo, hi + 1), tok_slots - lo
            counts = torch.bincount(tok_u, minlength=used.numel())
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts  # first sorted position of each slot
        position = torch.arange(tokens.numel()) - starts[tok_u]  # index within its slot
        rows = tok_u * width + position
        gather_index = torch.full((used.numel() * width,), num_tokens, dtype=torch.long)
        gather_index[rows] = tokens
        n, start = tokens.numel(), int(tokens[0])
        in_place = used.numel() * width == n and bool(
            (tokens == torch.arange(start, start + n)).all())
        dense = bool((used == torch.arange(lo, lo + used.numel())).all())
        return cls(rank, used, lo if dense else -1, width, gather_index, rows, tokens,
                   start if in_place else -1)

    def to(self, device: torch.device) -> Group:
        return Group(self.rank, self.used.to(device), self.lo, self.width,
                     self.gather_index.to(device), self.rows.to(device),
                     self.tokens.to(device), self.first_token)

    @property
    def padded_rows(self) -> int:
        return self.used.numel() * self.width

    @property
    def unpadded(self) -> bool:
        """Every padded row holds a token (then rows == arange(n) and no zero row is needed)."""
        return self.padded_rows == self.tokens.numel()

    @property
    def contiguous(self) -> bool:
        """Unpadded, and the tokens are already in slot order in the batch: the grouped
        block is then the slice tokens[0] .. tokens[0] + n of the batch, no copy needed.
        (The runner packs decodes sorted by slot to make this the common case.)"""
        return self.first_token >= 0

    def weights(self, W: torch.Tensor) -> torch.Tensor:
        """W: [S, r_max, d] slot pool -> [U, rank, d] of the slots in use: a view when they
        are consecutive, else a copy of just those (never every slot in between)."""
        if self.lo >= 0:
            return W[self.lo:self.lo + self.used.numel(), :self.rank]
        return W[:, :self.rank].index_select(0, self.used)


@dataclass(frozen=True)
class Segments:
    """A step's adapter tokens, laid out for the LoRA matmuls in two parts.

    - `runs`: every run of at least `min_run` consecutive tokens of one slot, done in place
      at that slot's own rank.
    - `groups`: the other adapter tokens, one `Group` per rank bucket (usually one); left
      empty when built with groups=False, for a backend that reads `rest` alone.
    """

    runs: tuple[tuple[int, int, int, int], ...]  # (start, stop, slot, rank): tokens start..stop-1
    groups: tuple[Group, ...]
    rest: torch.Tensor  # [T] each token's slot, 0 inside the runs: what the groups hold
    rest_tokens: int  # adapter tokens outside the runs
    rest_stop: int  # 1 + the index of the last of them (0: none)

    @classmethod
    def build(cls, slots: torch.Tensor, slot_ranks: Sequence[int],
              min_run: int = MIN_RUN, groups: bool = True) -> Segments | None:
        """slots: [T] (CPU); slot_ranks[s]: the rank of slot s's adapter. None when no
        token uses an adapter."""
        values = slots.tolist()
        runs = tuple((start, stop, slot, slot_ranks[slot])
                     for start, stop, slot in slot_runs(values)
                     if slot > 0 and stop - start >= min_run)
        rest = slots.clone() if runs else slots  # [T]
        for start, stop, _, _ in runs:
            rest[start:stop] = 0
        in_runs = sum(stop - start for start, stop, _, _ in runs)
        rest_tokens = len(values) - values.count(0) - in_runs
        if rest_tokens == 0:
            return cls(runs, (), rest, 0, 0) if runs else None
        tokens = rest.nonzero().squeeze(1)  # [n]
        rest_stop = int(tokens[-1]) + 1
        if not groups:
            return cls(runs, (), rest, rest_tokens, rest_stop)
        tok_slots = rest[tokens]
        by_bucket: dict[int, list[int]] = {}
        for slot in torch.unique(tok_slots).tolist():
            by_bucket.setdefault(rank_bucket(slot_ranks[slot]), []).append(slot)
        layout = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            mine = torch.isin(tok_slots, torch.tensor(members))  # [n]
            layout.append(Group.build(tokens[mine], tok_slots[mine], slots.numel(),
                                      max(slot_ranks[s] for s in members)))
        return cls(runs, tuple(layout), rest, tokens.numel(), rest_stop)

    def to(self, device: torch.device) -> Segments:
        return Segments(self.runs, tuple(g.to(device) for g in self.groups),
                        self.rest.to(device), self.rest_tokens, self.rest_stop)


@dataclass
class LoraPlan:
    """One step's LoRA inputs, shared by every wrapped layer of the model."""

    slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [T]
    rank: int = 0  # largest rank among this step's adapters; 0 = no adapter in the batch
    segments: Segments | None = None
    delta: Callable = None  # the backend chosen for this step
    used_slots: frozenset[int] = frozenset()  # the slots of this step's adapters (never 0)
    max_slot: int = 0  # the largest of them (0 = none)
    # q/k/v (and gate/up) read the same input: its slot-grouped copy is made once per layer.
    # An entry holds x itself, so its storage (and address) cannot be reused while cached;
    # layer inputs are never modified in place between the projections that read them.
    _grouped_inputs: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)  # group index -> (key of x, x, grouped x)
    _host_slots: list[int] = field(default_factory=list)  # slots, as a list
    _slot_ranks: Sequence[int] = ()
    _rank_table: torch.Tensor | None = None  # see rank_table
    _adapter_runs: list[tuple[int, int, int, int]] | None = None  # see adapter_runs
    _narrowed: dict[frozenset[int], LoraPlan] = field(default_factory=dict)  # see for_layer
    _for_active: dict[frozenset[int], LoraPlan | None] = field(default_factory=dict)  # ditto

    def grouped_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x: [T, in] -> [U, W, in], the tokens of segments.groups[i] laid out by slot."""
        key = (x.data_ptr(), x.shape, x.stride())
        cached = self._grouped_inputs.get(i)
        if cached is not None and cached[0] == key:
            return cached[2]
        group = self.segments.groups[i]
        if group.contiguous:
            x_pad = x[group.first_token:group.first_token + group.tokens.numel()]  # a view
        elif group.unpadded:
            x_pad = x.index_select(0, group.tokens)  # [n, in]
        else:
            x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(  # [U*W, in]
                0, group.gather_index)  # (index_select: ~8x faster than x[index] on CPU)
        x_pad = x_pad.view(group.used.numel(), group.width, -1)
        self._grouped_inputs[i] = (key, x, x_pad)
        return x_pad

    def start_step(self, slots: torch.Tensor, slot_ranks: Sequence[int], delta: Callable,
                   device: torch.device, active_sets: Iterable[frozenset[int]] = ()) -> None:
        """slots: [T] (CPU) each token's slot, 0 = no adapter, kept (not copied) and never
        to be changed afterwards; slot_ranks[s]: the rank of the adapter in slot s;
        active_sets: the wrapped layers' `active_slots`, whose plans (for_layer) are made
        now rather than inside the forward pass, where on a GPU a narrowed plan's copies
        to the device would wait for every kernel queued before them."""
        host = slots.tolist()
        self.used_slots = frozenset(host) - {0}
        self.max_slot = max(self.used_slots, default=0)
        self.rank = max((slot_ranks[s] for s in self.used_slots), default=0)
        min_run = getattr(delta, "min_run", MIN_RUN)  # a backend may want other runs,
        groups = getattr(delta, "groups", True)  # or no groups
        self.segments = (Segments.build(slots, slot_ranks, min_run, groups).to(device)
                         if self.used_slots else None)
        self.slots, self.delta = slots.to(device), delta
        self._host_slots, self._slot_ranks = host, slot_ranks
        self._grouped_inputs = {}
        self._narrowed = {}
        self._for_active = {}
        self._rank_table = None
        self._adapter_runs = None
        for active in active_sets:
            self.for_layer(active)

    def adapter_runs(self) -> list[tuple[int, int, int, int]]:
        """(start, stop, slot, rank) of every run of one adapter's consecutive tokens (slot
        0's left out), found once per step: latent_attention reads them twice a layer."""
        if self._adapter_runs is None:
            self._adapter_runs = [(start, stop, slot, self._slot_ranks[slot])
                                  for start, stop, slot in slot_runs(self._host_slots) if slot]
        return self._adapter_runs

    def rank_table(self) -> torch.Tensor:
        """[S] int32 on the plan's device: the rank of each slot's adapter (0 = empty)."""
        if self._rank_table is None:
            self._rank_table = torch.tensor(self._slot_ranks, dtype=torch.int32,
                                            device=self.slots.device)
        return self._rank_table

    def for_layer(self, active: frozenset[int]) -> LoraPlan | None:
        """This step's plan for a layer whose `active` slots hold an adapter that targets
        it: None when no adapter of the step does (the layer adds nothing), the plan
        itself when all of them do, else a plan whose other tokens use slot 0. Kept per
        `active` for the step: the layers of one module kind usually hold the same set,
        whose hash Python keeps, so most calls are one dict lookup."""
        if not self.used_slots:
            return None
        plan = self._for_active.get(active, _UNSET)
        if plan is _UNSET:
            plan = self._for_active[active] = self._narrow(active)
        return plan

    def _narrow(self, active: frozenset[int]) -> LoraPlan | None:
        if self.used_slots <= active:
            return self
        subset = self.used_slots & active
        if not subset:
            return None
        narrowed = self._narrowed.get(subset)  # (sets that differ outside this step's slots)
        if narrowed is None:
            narrowed = LoraPlan()
            narrowed.start_step(torch.tensor([s if s in subset else 0 for s in self._host_slots]),
                                self._slot_ranks, self.delta, self.slots.device)
            self._narrowed[subset] = narrowed
        return narrowed


_UNSET = object()  # LoraPlan.for_layer: no answer kept yet (None is one)


def lora_delta_loop(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    plan: LoraPlan) -> None:
    """y: [T, out] (updated in place), x: [T, in], A: [S, r_max, in], B: [S, r_max, out]."""
    for t in range(x.shape[0]):
        s = int(plan.slots[t])
        y[t] += (A[s, :plan.rank] @ x[t]) @ B[s, :plan.rank]


def lora_delta_gather(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      plan: LoraPlan) -> None:
    a = A[plan.slots, :plan.rank]  # [T, rank, in]
    b = B[plan.slots, :plan.rank]  # [T, rank, out]
    h = torch.bmm(a, x.unsqueeze(-1)).transpose(1, 2)  # [T, 1, rank]
    y += torch.bmm(h, b).squeeze(1)  # [T, out]


def lora_delta_grouped(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       plan: LoraPlan) -> None:
    for s in torch.unique(plan.slots).tolist():
        if s == 0:
            continue  # the zero slot adds nothing
        idx = (plan.slots == s).nonzero().squeeze(-1)  # [T_s]
        h = x.index_select(0, idx) @ A[s, :plan.rank].T  # [T_s, rank]
        y.index_add_(0, idx, h @ B[s, :plan.rank])  # [T_s, out]


def add_runs(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             plan: LoraPlan) -> None:
    """The segments' long runs: y[a:b] += (x[a:b] @ A[s].T) @ B[s], on views, in place
    (the slot's weights copied into x's dtype first when the pool's differs)."""
    for start, stop, slot, rank in plan.segments.runs:
        a, b = A[slot, :rank].to(x.dtype), B[slot, :rank].to(x.dtype)  # [rank, in], [rank, out]
        h = x[start:stop] @ a.T  # [L, rank]
        y[start:stop].addmm_(h, b)  # [L, out]


def lora_delta_segmented(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         plan: LoraPlan) -> None:
    seg = plan.segments
    if seg is None:
        return
    add_runs(y, x, A, B, plan)
    for i, group in enumerate(seg.groups):
        x_pad = plan.grouped_input(x, i)  # [U, W, in]
        h = torch.bmm(x_pad, group.weights(A).transpose(1, 2))  # [U, W, rank]
        if group.contiguous:  # y's rows of these tokens, as [U, W, out], updated in place
            first = group.first_token
            y[first:first + group.padded_rows].view(*h.shape[:2], -1).baddbmm_(
                h, group.weights(B))
            continue
        out = torch.bmm(h, group.weights(B)).view(group.padded_rows, -1)  # [U*W, out]
        y.index_add_(0, group.tokens,  # [n, out]
                     out if group.unpadded else out.index_select(0, group.rows))


# The CPU kernel takes a run of one adapter's tokens 8 at a time, in register blocks,
# reading each row of its weights once per 8 tokens; it beats a matmul pair on runs of any
# length. Prefill steps of one prompt with an all-linear rank-16 adapter, same process,
# over no adapter: 300 tokens +8.5 ms as a matmul pair, +4.1 ms in the kernel; 1000 tokens
# +22.7 / +18.1 ms; 2000 tokens +64.9 / +63.1 ms on a 732 ms step.
NO_RUNS = sys.maxsize  # the kernel's min_run: no token is left to a matmul pair


def rows_contiguous(W: torch.Tensor) -> bool:
    """W [S, r, n]: each slot's r rows one contiguous block (slots at any stride)."""
    rows, width = W.shape[1], W.shape[2]
    return W.stride(2) == 1 and W.stride(1) == width and W.stride(0) >= rows * width


def bgmv_backend(lib: ctypes.CDLL, dtype: torch.dtype = torch.float32) -> Callable:
    """The `bgmv` backend on a loaded CPU kernel (loraplex.cpu_kernels), for activations of
    `dtype`, fp32 or bf16, on the CPU, and a pool of fp32 or bf16; x and y contiguous, and
    each slot's rows of A and of B (as in LoraLinear's `slot_pool`).

    Every adapter token goes through the kernel, straight from the slot pool (no grouping,
    no gathered weights, each slot at its own rank). The kernel sums in fp32; with bf16
    activations it widens each tile's rows of x and y to fp32 itself and rounds y's rows
    once, after the whole delta (PEFT's arithmetic, which keeps a bf16 model's adapters in
    fp32). On the bench model in bf16, 32 adapters, a prefill step's LoRA share took 49 ms
    through fp32 copies of the rows made by torch and 28 ms this way, a decode step's 3.1
    and 2.5 ms. Prefill chunks as bf16 matmul pairs instead took longer still (prefill 198
    against 164 ms: 32 adapters' chunks are ~1300 small matmuls a step) and strayed
    further from PEFT."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the CPU LoRA kernel takes fp32 or bf16 activations, not {dtype}")
    kernels = {torch.float32: lib.lora_bgmv, torch.bfloat16: lib.lora_bgmv_bf16}
    act_bf16 = int(dtype == torch.bfloat16)
    # A layer's pool is allocated once and only ever written in place: what the kernel
    # needs of it is checked and kept the first time it is seen (about half the Python
    # time of a call, ~0.5 ms of a 32-adapter decode step). The entry holds the pool, so
    # its id cannot be reused while the entry exists.
    pools: dict[int, tuple] = {}  # id(A) -> (A, B, kernel, in, A, A's slot stride, B, B's, out, slots)

    def pool_args(A: torch.Tensor, B: torch.Tensor) -> tuple:
        entry = pools.get(id(A))
        if entry is None or entry[0] is not A or entry[1] is not B:
            kernel = kernels.get(A.dtype)
            if not (kernel is not None and B.dtype == A.dtype and A.shape[:2] == B.shape[:2]
                    and rows_contiguous(A) and rows_contiguous(B)):
                raise ValueError("the CPU LoRA kernel takes a slot pool of fp32 or bf16, A "
                                 "[S, r_max, in] and B [S, r_max, out], each slot's rows "
                                 "contiguous")
            entry = (A, B, kernel, A.shape[2], A.data_ptr(), A.stride(0), B.data_ptr(),
                     B.stride(0), B.shape[2], A.shape[0])
            pools[id(A)] = entry
        return entry

    def lora_delta_bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        plan: LoraPlan) -> None:
        seg = plan.segments
        if seg is None:  # no adapter token in the step
            return
        add_runs(y, x, A, B, plan)  # none in a plan built for this backend (NO_RUNS)
        if not seg.rest_tokens:
            return
        _, _, kernel, n_in, a, a_slot, b, b_slot, n_out, n_slots = pool_args(A, B)
        ranks, rest = plan.rank_table(), seg.rest
        # the kernel trusts its pointers: check what it will read
        if not (x.dtype == y.dtype == dtype and y.is_contiguous() and x.dim() == 2
                and x.shape[1] == n_in and y.shape == (x.shape[0], n_out)
                and rest.dtype == torch.int64 and rest.is_contiguous()
                and rest.numel() == x.shape[0] and plan.max_slot < min(n_slots, ranks.numel())):
            raise ValueError(f"the CPU LoRA kernel takes contiguous {dtype} x [T, in] and y "
                             "[T, out], T int64 slots, all within the pool and the rank table")
        x = x.contiguous()
        if kernel(x.data_ptr(), n_in, a, a_slot, b, b_slot, n_out, rest.data_ptr(),
                  ranks.data_ptr(), seg.rest_stop, y.data_ptr(), act_bf16):
            raise MemoryError("the CPU LoRA kernel could not allocate its tile list")

    lora_delta_bgmv.min_run = NO_RUNS  # read by LoraPlan.start_step
    lora_delta_bgmv.groups = False
    return lora_delta_bgmv


def with_pool_dtype(delta: Callable) -> Callable:
    """A torch backend for a pool whose dtype is not the activations': the delta is computed
    in the pool's dtype into a zeroed buffer, then added to y in y's (so y, the base's
    output, is never rounded to the pool's dtype)."""
    def lora_delta_cast(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        plan: LoraPlan) -> None:
        out = torch.zeros(y.shape, dtype=A.dtype, device=y.device)  # [T, out]
        delta(out, x.to(A.dtype), A, B, plan)
        y += out

    lora_delta_cast.min_run = getattr(delta, "min_run", MIN_RUN)
    lora_delta_cast.groups = getattr(delta, "groups", True)
    return lora_delta_cast


BACKENDS: dict[str, Callable] = {
    "loop": lora_delta_loop,
    "gather": lora_delta_gather,
    "grouped": lora_delta_grouped,
    "segmented": lora_delta_segmented,
}


def choose_backend(name: str, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32,
                   pool_dtype: torch.dtype | None = None) -> Callable:
    """`name` from EngineConfig.lora_backend, for activations of `dtype` on `device` and a
    slot pool of `pool_dtype` (default: `dtype`). "auto": the CPU kernel (`bgmv`) for fp32
    or bf16 activations on the CPU with an fp32 or bf16 pool, when it can be built here,
    else `segmented`; "bgmv" raises ValueError where it cannot run. (The runner refuses "triton"
    off CUDA; the tests run it on the CPU in Triton's interpreter.)"""
    pool_dtype = pool_dtype or dtype
    if name in ("auto", "bgmv"):
        required_by = "lora_backend 'bgmv'" if name == "bgmv" else ""
        kernel_reads_pool = pool_dtype in (torch.float32, torch.bfloat16)
        if required_by and not kernel_reads_pool:
            raise ValueError(f"{required_by} reads float32 or bfloat16 adapter weights, not "
                             f"{pool_dtype}: use 'auto' or another lora_dtype")
        lib = cpu_kernels.load_for(device.type, str(dtype).removeprefix("torch."), required_by,
                                   takes=("float32", "bfloat16"))
        if lib is not None and kernel_reads_pool:
            return bgmv_backend(lib, dtype)
        name = "segmented"
    if name == "triton":  # opt-in; imported here so triton stays optional
        from loraplex.lora.triton_ops import lora_delta_triton
        delta = lora_delta_triton
    else:
        delta = BACKENDS[name]
    return delta if pool_dtype == dtype else with_pool_dtype(delta)
