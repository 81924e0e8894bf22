"""Multi-head latent attention (DeepSeek-V2/V3's MLA) with its latent cached, not its keys
and values.

Such a layer compresses each token to a latent c [kv_lora_rank] (after kv_a_layernorm) and
one rotary key k_rot [rope] shared by every head. Hugging Face's layer then expands the
latent through kv_b_proj into every head's keys k_h = [W_UK_h c, k_rot] and values
v_h = W_UV_h c (its `expand_kv`) before attention, so a cache of what attention is passed
holds heads x (nope + rope + v) values a token and layer: 40,960 for DeepSeek-V3, whose
latent and rotary key are 576.

`patch_latent_attention` replaces `expand_kv`: attention is passed the latent as one kv
head, keys [c, k_rot] and values c, and kv_b_proj is absorbed into the queries and the
output (as DeepSeek-V2's paper and vLLM's MLA do):

    q_h . k_h = (W_UK_h^T q_nope_h) . c + q_rot_h . k_rot
    sum_j p_j v_h,j = W_UV_h (sum_j p_j c_j)

An adapter on kv_b_proj (W + B A, its scaling in B; B's rows split by head as W's) is
absorbed per token the same way: q_lat_h += A^T (B_K,h^T q_nope_h), and
out_h += B_V,h (A o_lat_h). The scores and outputs are HF's up to summation order.

The cache then holds the kv_lora_rank + rope keys a token and layer, whose first
kv_lora_rank are the values too (KVCache's values_in_keys): DeepSeek-V3's 576, 71x less
than its expanded 40,960. The price: absorbed, attention runs over kv_lora_rank + rope wide
queries (576 against 192) and kv_lora_rank wide values (512 against 128), and each layer
keeps kv_b_proj's weight unquantized ([heads, nope, rank] and [heads, rank, v]: DeepSeek-V3
32 MiB a layer in bf16) beside the base layer.

So a prefill chunk is attended expanded instead where that costs less (`expands`, as
vLLM's MLA prefill): its context's latents are read from the cache and expanded through
kv_b_proj (its adapter's LoRA included) into every head's keys and values, HF's
expand_kv. For q new tokens over a context of L (new ones included), a head then costs
L x rank x (nope + v) multiply-adds more to expand, q x rank x (nope + v) fewer to absorb,
and q x L x (2 rank - nope - v) fewer to attend. A whole prompt (L = q) gains wherever
2 rank > nope + v (DeepSeek-V3's 1,024 > 256; 2,048 tokens: 3.0x fewer); on the CPU a
short chunk over a long cached context, as a decode, stays absorbed (DeepSeek-V3: below
~171 new tokens). On CUDA every prefill chunk is expanded: there SDPA repeats a masked
chunk's one kv head per query head (attention.sdpa's expand_kv), 1,152 values a head and
position (keys, and values padded to them) against the expanded 384 (DeepSeek-V3).
"""

from __future__ import annotations

import types

import torch
from torch import nn


_PARTS = ("kv_b_proj", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
          "num_heads", "expand_kv")


class LatentProjection:
    """kv_b_proj of one MLA layer, absorbed: attention (attention.paged_attention) calls
    `queries` before it attends over the cached latents and `outputs` after; for a prefill
    chunk that `expands`, `expand` instead, and attends over HF's keys and values."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module = module  # its kv_b_proj is read at each call: a LoraLinear once wrapped
        self.nope, self.rope, self.v = (module.qk_nope_head_dim, module.qk_rope_head_dim,
                                        module.v_head_dim)
        self.rank, self.heads = module.kv_lora_rank, module.num_heads
        proj = module.kv_b_proj
        device = next(proj.parameters()).device
        with torch.no_grad():  # the weight as the layer computes with it (dequantized)
            eye = torch.eye(self.rank, dtype=dtype, device=device)
            w = (proj(eye) - proj(torch.zeros_like(eye[:1]))).float()  # [rank, H * (nope + v)]
        w = w.view(self.rank, self.heads, self.nope + self.v)
        self.w_uk = w[..., :self.nope].permute(1, 2, 0).to(dtype).contiguous()  # [H, nope, rank]
        self.w_uv = w[..., self.nope:].transpose(0, 1).to(dtype).contiguous()  # [H, rank, v]

    def expands(self, queries: int, context: int) -> bool:
        """Whether a prefill chunk of `queries` new tokens over a context of `context`
        (new ones included) attends expanded: with fewer multiply-adds than absorbed (see
        the module's doc)."""
        saved = 2 * self.rank - self.nope - self.v  # a head, query and context token
        return queries * context * saved > self.rank * (self.nope + self.v) * (context - queries)

    def _adapter_runs(self, start: int, stop: int):
        """(lo, hi, A [r, rank], B_K [r, H, nope], B_V [r, H, v]) of each run of tokens of
        one adapter on kv_b_proj among the step's tokens [start, stop), at [start + lo,
        start + hi) (none outside the runner's steps)."""
        proj = self.module.kv_b_proj
        plan = getattr(proj, "plan", None)
        plan = plan.for_layer(proj.active_slots) if plan is not None else None
        if plan is None:
            return
        for lo, hi, slot, r in plan.adapter_runs():
            if lo < stop and hi > start:
                a = proj.lora_A[slot, :r]  # [r, rank]
                b = proj.lora_B[slot, :r].view(r, self.heads, -1)  # [r, H, nope + v]
                yield (max(lo, start) - start, min(hi, stop) - start, a, b[..., :self.nope],
                       b[..., self.nope:])

    def queries(self, query: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[1, H, n, nope + rope] (the step's tokens [start, start + n)) ->
        [1, H, n, rank + rope]: W_UK_h^T q_nope_h, q_rot_h."""
        q_nope, q_rot = query[0].split((self.nope, self.rope), dim=-1)  # [H, n, nope], [.., rope]
        q_lat = torch.bmm(q_nope, self.w_uk)  # [H, n, rank]
        for lo, hi, a, b_k, _ in self._adapter_runs(start, start + q_nope.shape[1]):
            u = torch.einsum("htn,rhn->htr", q_nope[:, lo:hi], b_k.to(q_nope.dtype))
            q_lat[:, lo:hi] += u @ a.to(q_nope.dtype)  # [H, hi - lo, rank]
        return torch.cat((q_lat, q_rot), dim=-1).unsqueeze(0)

    def outputs(self, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[1, n, H, rank] (attention over the latents, the step's tokens [start, start + n))
        -> [1, n, H, v]: W_UV_h o_h."""
        o_lat = out[0].transpose(0, 1)  # [H, n, rank]
        o = torch.bmm(o_lat, self.w_uv)  # [H, n, v]
        for lo, hi, a, _, b_v in self._adapter_runs(start, start + o_lat.shape[1]):
            w = o_lat[:, lo:hi] @ a.to(o_lat.dtype).T  # [H, hi - lo, r]
            o[:, lo:hi] += torch.einsum("hnr,rhv->hnv", w, b_v.to(o_lat.dtype))
        return o.transpose(0, 1).unsqueeze(0)

    def expand(self, cached: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's cached keys [L, 1, rank + rope] -> its keys [H, L, nope + rope] and
        values [H, L, v], as HF's expand_kv makes them: through kv_b_proj with the adapter
        of the step's token `row` (the sequence's first new one)."""
        c, k_rot = cached[:, 0].split((self.rank, self.rope), dim=-1)  # [L, rank], [L, rope]
        k_nope = torch.matmul(c, self.w_uk.transpose(1, 2))  # [H, L, nope]
        v = torch.matmul(c, self.w_uv)  # [H, L, v]
        for _, _, a, b_k, b_v in self._adapter_runs(row, row + 1):
            u = c @ a.to(c.dtype).T  # [L, r]
            k_nope += torch.einsum("lr,rhn->hln", u, b_k.to(c.dtype))
            v += torch.einsum("lr,rhv->hlv", u, b_v.to(c.dtype))
        return torch.cat((k_nope, k_rot.expand(self.heads, -1, -1)), dim=-1), v


def _latent_kv(self: nn.Module, kv_nope: torch.Tensor,
               k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """expand_kv's replacement: the latent [B, 1, T, rank] and rotary key [B, 1, T, rope]
    -> keys [B, 1, T, rank + rope], values [B, 1, T, rank] (one kv head)."""
    return torch.cat((kv_nope, k_rot), dim=-1), kv_nope


def patch_latent_attention(model: nn.Module, dtype: torch.dtype) -> frozenset[int]:
    """Every MLA layer of `model` (one with HF's expand_kv and kv_b_proj) made to cache its
    latent; their layer indices (whose cached values are their keys' first kv_lora_rank:
    KVCache's values_in_keys). Before the linears are wrapped (the absorbed weight is read
    from the base layer)."""
    layers = set()
    for module in model.modules():
        if all(hasattr(module, part) for part in _PARTS):
            module.loraplex_latent = LatentProjection(module, dtype)
            module.expand_kv = types.MethodType(_latent_kv, module)
            layers.add(module.layer_idx)
    return frozenset(layers)
