"""The LoRA delta as two Triton kernels (the S-LoRA / Punica "SGMV" shrink and expand).

Computes what `lora_delta_loop` defines, y[t] += (A[s] @ x[t]) @ B[s] with s = slots[t],
on CUDA tensors (or on CPU tensors under the Triton interpreter, TRITON_INTERPRET=1,
which is how the tests check it). Only imported when lora_backend == "triton".

Layout: the step's `Segments` (plan.segments) already lays the adapter tokens out. Its
long runs of one slot (prefill chunks) are plain matmuls (`add_runs`, cuBLAS on a GPU); the
kernels take the other tokens (decodes), one `Group` (rank bucket) per pair of launches,
grouped by slot: the u-th slot of the group, used[u], has its i-th token in padded row
u * width + i, and gather_index maps each padded row to its token (padding rows -> T,
past the batch).
A slot's tokens fill its first rows, so padding only ever follows them.

Grid: a program takes BLOCK_T consecutive padded rows of one slot (program axis 0: the
block within the slot, axis 1: the slot in use), so every token in it shares one A[s] and
one B[s] and the products are real matrix products (tl.dot):

    shrink  (ceil(width / BLOCK_T), U):          h[t] = x[t] @ A[s, :rank].T  (loops over in)
    expand  (ceil(width / BLOCK_T), U, ceil(out / BLOCK_N)):
                                                 y[t, n-block] += h[t] @ B[s, :rank, n-block]

h: [T, rank] is kept in fp32 between the two, indexed by token (base-model tokens never get a
row written or read). Rows >= rank of A and B are never read. A block made of padding only
(a slot with fewer tokens than the widest) returns after one load; widths stay small, since
long runs never reach the kernels.

Precision: tiles are widened to fp32 before tl.dot, the products accumulate in fp32 and y
gets its delta added in fp32 and is stored in its own dtype. With fp32 inputs the dot is
IEEE fp32 (as torch's default matmul); with bf16/fp16 inputs it runs as TF32, which holds
16-bit values exactly, so x @ A.T is what a bf16/fp16 tensor-core dot gives, and h enters
the expand dot with 10 mantissa bits (a bf16 matmul would round it to 7). Widening also
keeps the interpreter exact: it does not support tl.dot on bfloat16.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from loraplex.lora.ops import LoraPlan, add_runs

BLOCK_K = 64  # shrink: columns of x / A read per loop step
BLOCK_N = 64  # expand: columns of y / B per program
MAX_BLOCK_T = 64  # tokens per program: the slot's width rounded up to a power of 2, capped here
MIN_DOT = 16  # tl.dot wants every block dim >= 16 on a GPU
# ptxas for sm_90, bf16/fp16: no register spills up to 64 tokens x rank 128 at 8 warps (at 4,
# the 64 x 128 shrink spills). fp32 (IEEE dot, no tensor cores) spills in expand from rank 64.
NUM_WARPS = 8


@triton.jit
def _shrink_kernel(
    x_ptr, A_ptr, h_ptr, used_ptr, gather_ptr,  # x: [T, in], A: [S, r_max, in], h: [T, rank]
    T, width, d_in, rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ht, stride_hr,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block, u = tl.program_id(0), tl.program_id(1)
    first_row = u * width + block * BLOCK_T
    if tl.load(gather_ptr + first_row) == T:  # padding only: this slot has fewer tokens
        return
    i = block * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] index within the slot
    tokens = tl.load(gather_ptr + first_row + tl.arange(0, BLOCK_T), mask=i < width, other=T)
    is_token = tokens < T  # [BLOCK_T]
    slot = tl.load(used_ptr + u)
    r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_T, 1]
    A_cols = A_ptr + slot * stride_as + r[None, :] * stride_ar  # [1, BLOCK_R]: A[s] read as A[s].T
    # tl.full, not tl.zeros: tl.zeros is a @triton.jit helper, compiled (not interpretable) when
    # triton was imported before TRITON_INTERPRET was set (the tests import it via bitsandbytes)
    acc = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        in_k = k0 + k < d_in  # [BLOCK_K]
        x_tile = tl.load(x_rows + (k0 + k)[None, :] * stride_xk,  # [BLOCK_T, BLOCK_K]
                         mask=is_token[:, None] & in_k[None, :], other=0.0)
        A_tile = tl.load(A_cols + (k0 + k)[:, None] * stride_ak,  # [BLOCK_K, BLOCK_R]
                         mask=in_k[:, None] & (r < rank)[None, :], other=0.0)
        acc += tl.dot(x_tile.to(tl.float32), A_tile.to(tl.float32), input_precision=PRECISION)
    tl.store(h_ptr + tokens[:, None] * stride_ht + r[None, :] * stride_hr, acc,
             mask=is_token[:, None] & (r < rank)[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, B_ptr, y_ptr, used_ptr, gather_ptr,  # h: [T, rank], B: [S, r_max, out], y: [T, out]
    T, width, d_out, rank,
    stride_ht, stride_hr, stride_bs, stride_br, stride_bn, stride_yt, stride_yn,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block, u, n_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first_row = u * width + block * BLOCK_T
    if tl.load(gather_ptr + first_row) == T:  # padding only
        return
    i = block * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    tokens = tl.load(gather_ptr + first_row + tl.arange(0, BLOCK_T), mask=i < width, other=T)
    is_token = tokens < T  # [BLOCK_T]
    slot = tl.load(used_ptr + u)
    r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    in_n = n < d_out
    h_tile = tl.load(h_ptr + tokens[:, None] * stride_ht + r[None, :] * stride_hr,
                     mask=is_token[:, None] & (r < rank)[None, :], other=0.0)  # [BLOCK_T, BLOCK_R]
    B_tile = tl.load(B_ptr + slot * stride_bs + r[:, None] * stride_br  # [BLOCK_R, BLOCK_N]
                     + n[None, :] * stride_bn, mask=(r < rank)[:, None] & in_n[None, :], other=0.0)
    delta = tl.dot(h_tile, B_tile.to(tl.float32), input_precision=PRECISION)  # [BLOCK_T, BLOCK_N]
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + n[None, :] * stride_yn  # [BLOCK_T, BLOCK_N]
    in_y = is_token[:, None] & in_n[None, :]
    y_tile = tl.load(y_ptrs, mask=in_y, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y_tile + delta).to(y_ptr.dtype.element_ty), mask=in_y)


def lora_delta_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      plan: LoraPlan) -> None:
    """y: [T, out] (updated in place), x: [T, in], A: [S, r_max, in], B: [S, r_max, out]."""
    seg = plan.segments
    if seg is None:
        return
    add_runs(y, x, A, B, plan)  # long runs (prefill chunks): a pair of matmuls each
    T, d_in = x.shape
    d_out = y.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # launches go to the current CUDA device: make it x's (a CPU tensor: TRITON_INTERPRET=1)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for group in seg.groups:  # one pair of launches per rank bucket
            rank, used, width = group.rank, group.used.numel(), group.width
            block_t = min(MAX_BLOCK_T, max(MIN_DOT, triton.next_power_of_2(width)))  # decodes: 16
            block_r = max(MIN_DOT, triton.next_power_of_2(rank))
            h = torch.empty(T, rank, dtype=torch.float32, device=x.device)  # [T, rank]
            blocks = triton.cdiv(width, block_t)
            _shrink_kernel[(blocks, used)](
                x, A, h, group.used, group.gather_index, T, width, d_in, rank,
                *x.stride(), *A.stride(), *h.stride(),
                PRECISION=precision, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
                num_warps=NUM_WARPS)
            _expand_kernel[(blocks, used, triton.cdiv(d_out, BLOCK_N))](
                h, B, y, group.used, group.gather_index, T, width, d_out, rank,
                *h.stride(), *B.stride(), *y.stride(),
                PRECISION=precision, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=BLOCK_N,
                num_warps=NUM_WARPS)
