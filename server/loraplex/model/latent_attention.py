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
from dataclasses import dataclass

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

    def lora(self, start: int, stop: int, dtype: torch.dtype) -> AbsorbedLora | None:
        """The LoRA of kv_b_proj over the step's tokens [start, stop), in `dtype` (None: no
        adapter of theirs targets it, or outside the runner's steps)."""
        proj = self.module.kv_b_proj
        plan = getattr(proj, "plan", None)
        plan = plan.for_layer(proj.active_slots) if plan is not None else None
        runs = [run for run in plan.adapter_runs() if run[0] < stop and run[1] > start] if plan else []
        if not runs:
            return None
        if len(runs) == 1:  # one adapter's tokens (a prefill chunk's, or decodes')
            lo, hi, slot, r = runs[0]
            a = proj.lora_A[slot, :r].to(dtype)  # [r, rank]
            b = proj.lora_B[slot, :r].to(dtype).view(r, self.heads, -1)  # [r, H, nope + v]
            return AbsorbedLora(max(lo, start) - start, min(hi, stop) - start, a,
                                b[..., :self.nope], b[..., self.nope:], per_token=False)
        slots = plan.slots[start:stop]  # [n]
        table = proj.lora_B[:, :plan.rank].unflatten(2, (self.heads, -1))  # [S, R, H, nope + v]
        # (index_select, each part on its own, contiguous for the einsums: 32 decodes of 32
        # adapters at GLM-4.7-Flash's shapes, both ways, 6.6 ms a layer against 7.3 ms)
        a, b_k, b_v = (t.index_select(0, slots).to(dtype)  # [n, R, rank], [n, R, H, nope / v]
                       for t in (proj.lora_A[:, :plan.rank], table[..., :self.nope],
                                 table[..., self.nope:]))
        return AbsorbedLora(0, stop - start, a, b_k, b_v, per_token=True)

    def queries(self, query: torch.Tensor, lora: AbsorbedLora | None) -> torch.Tensor:
        """[1, H, n, nope + rope] (the tokens of `lora`, `lora` over them) ->
        [1, H, n, rank + rope]: W_UK_h^T q_nope_h, q_rot_h."""
        q_nope, q_rot = query[0].split((self.nope, self.rope), dim=-1)  # [H, n, nope], [.., rope]
        q_lat = torch.bmm(q_nope, self.w_uk)  # [H, n, rank]
        if lora is not None and lora.per_token:
            u = torch.einsum("htn,trhn->htr", q_nope, lora.b_k)  # [H, n, R]
            q_lat += torch.einsum("htr,trk->htk", u, lora.a)
        elif lora is not None:
            rows = slice(lora.lo, lora.hi)
            u = torch.einsum("htn,rhn->htr", q_nope[:, rows], lora.b_k)  # [H, hi - lo, r]
            q_lat[:, rows] += u @ lora.a
        return torch.cat((q_lat, q_rot), dim=-1).unsqueeze(0)

    def outputs(self, out: torch.Tensor, lora: AbsorbedLora | None) -> torch.Tensor:
        """[1, n, H, rank] (attention over the latents, for the tokens of `lora`) ->
        [1, n, H, v]: W_UV_h o_h."""
        o_lat = out[0].transpose(0, 1)  # [H, n, rank]
        o = torch.bmm(o_lat, self.w_uv)  # [H, n, v]
        if lora is not None and lora.per_token:
            w = torch.einsum("htk,trk->htr", o_lat, lora.a)  # [H, n, R]
            o += torch.einsum("htr,trhv->htv", w, lora.b_v)
        elif lora is not None:
            rows = slice(lora.lo, lora.hi)
            w = o_lat[:, rows] @ lora.a.T  # [H, hi - lo, r]
            o[:, rows] += torch.einsum("hnr,rhv->hnv", w, lora.b_v)
        return o.transpose(0, 1).unsqueeze(0)

    def expand(self, cached: torch.Tensor,
               lora: AbsorbedLora | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's cached keys [L, 1, rank + rope] -> its keys [H, L, nope + rope] and
        values [H, L, v], as HF's expand_kv makes them: through kv_b_proj with `lora` (of the
        sequence's new tokens: one adapter's)."""
        c, k_rot = cached[:, 0].split((self.rank, self.rope), dim=-1)  # [L, rank], [L, rope]
        k_nope = torch.matmul(c, self.w_uk.transpose(1, 2))  # [H, L, nope]
        v = torch.matmul(c, self.w_uv)  # [H, L, v]
        if lora is not None:
            u = c @ lora.a.T  # [L, r]
            k_nope += torch.einsum("lr,rhn->hln", u, lora.b_k)
            v += torch.einsum("lr,rhv->hlv", u, lora.b_v)
        return torch.cat((k_nope, k_rot.expand(self.heads, -1, -1)), dim=-1), v


@dataclass(frozen=True)
class AbsorbedLora:
    """The LoRA of kv_b_proj (scaling in B, B's rows split by head) over n of a step's
    tokens: one adapter's over rows [lo, hi) of them (A [r, rank], B_K [r, H, nope], B_V
    [r, H, v]), or `per_token` each token's, gathered by slot (A [n, R, rank], B_K [n, R,
    H, nope], B_V [n, R, H, v]; R the step's largest rank, zeros past an adapter's own and
    for tokens of none). Per token, the tokens of many adapters (decodes) take one einsum
    each way, where a run each took a few small ops: 32 requests of 32 adapters on
    kv_b_proj, a 4-layer MLA model of 16 heads on 2 threads, 464 to 584 tok/s that way,
    1,221 to 1,356 so (~1,600 with no adapter on kv_b_proj)."""

    lo: int
    hi: int
    a: torch.Tensor
    b_k: torch.Tensor
    b_v: torch.Tensor
    per_token: bool


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
