"""Gated DeltaNet (linear attention) layers, Qwen3.5's and Qwen3-Next's, over loraplex's
packed batch.

Hugging Face's layer runs rows of one sequence each, its state in one cache object; the
runner packs every sequence's new tokens into one row. So each such layer's forward is
replaced (`patch_linear_attention`):

- its projections (Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a; Qwen3-Next's
  fused in_proj_qkvz and in_proj_ba, regrouped by its own fix_query_key_value_ordering;
  out_proj; and so their LoRA) and its gated norm run once over the packed row, as every
  other linear does;
- the causal convolution and the delta rule run per sequence, from and into that
  sequence's slot of a `RecurrentState`: the convolution's last K - 1 inputs and the
  delta rule's [value heads, key dim, value dim] state, in fp32 as HF keeps it. The
  decodes (one token each) go through HF's recurrent rule together; each prefill chunk
  through its chunked rule, from its slot's state (zeros at position 0: the runner
  clears a slot whose sequence starts, or restarts after a preemption). HF's generate
  does the same for a prompt and then each token, so the numbers are its own, up to
  where the chunks of a long prompt end.

A sequence's state covers all its tokens so far and cannot be rebuilt from KV blocks, so
a model with these layers runs without prefix caching. Other recurrent layers (Mamba's)
are not patched: loader.probe_attention refuses their models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen3_5.modeling_qwen3_5 import (torch_chunk_gated_delta_rule,
                                                          torch_recurrent_gated_delta_rule)

from loraplex.model.attention import LayerProbe, current_step

_PARTS = ("conv1d", "norm", "out_proj", "A_log", "dt_bias", "conv_dim", "conv_kernel_size",
          "num_v_heads", "head_k_dim", "head_v_dim", "key_dim", "value_dim", "activation")
_PROJECTIONS = (("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),  # Qwen3.5
                ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering"))  # Qwen3-Next


def _is_gated_delta_net(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("GatedDeltaNet")
            and all(hasattr(module, part) for part in _PARTS)
            and any(all(hasattr(module, p) for p in parts) for parts in _PROJECTIONS))


def _projections(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden_states [1, T, hidden] -> the convolution's input [T, channels] (queries, keys,
    values), z [1, T, Hv * dv], b and a [T, Hv]."""
    if hasattr(self, "in_proj_qkvz"):  # Qwen3-Next: grouped by key head, regrouped
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                             self.in_proj_ba(hidden_states))
        mixed = torch.cat([x.reshape(*x.shape[:2], -1) for x in (q, k, v)], dim=-1)
        return mixed[0], z.reshape(*z.shape[:2], -1), b[0], a[0]
    return (self.in_proj_qkv(hidden_states)[0], self.in_proj_z(hidden_states),
            self.in_proj_b(hidden_states)[0], self.in_proj_a(hidden_states)[0])


class RecurrentState:
    """Per patched layer, every state slot's convolution inputs [slots, channels, K - 1]
    (the model's dtype) and delta-rule state [slots, value heads, key dim, value dim]
    (fp32)."""

    def __init__(self, layers: dict[int, nn.Module], num_slots: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_slots = num_slots
        self.conv = {i: torch.zeros(num_slots, m.conv_dim, m.conv_kernel_size - 1, dtype=dtype,
                                    device=device) for i, m in layers.items()}
        self.delta = {i: torch.zeros(num_slots, m.num_v_heads, m.head_k_dim, m.head_v_dim,
                                     dtype=torch.float32, device=device)
                      for i, m in layers.items()}

    @staticmethod
    def bytes_per_slot(layers: dict[int, nn.Module], dtype: torch.dtype) -> int:
        return sum(m.conv_dim * (m.conv_kernel_size - 1) * torch.finfo(dtype).bits // 8
                   + m.num_v_heads * m.head_k_dim * m.head_v_dim * 4 for m in layers.values())

    def clear(self, slots: list[int]) -> None:
        """Zero the slots of sequences that start at position 0."""
        for states in (self.conv, self.delta):
            for state in states.values():
                state[slots] = 0


@dataclass
class RecurrentBatch:
    """What the patched layers need for one step; built by the runner beside the
    AttentionBatch, in the same packed order (decodes first)."""

    state: RecurrentState
    decode_slots: torch.Tensor  # [D] state slot of each decode (rows 0..D-1)
    prefills: list[tuple[int, int, torch.Tensor]]  # (start, length, [1] state slot) per chunk


def patch_linear_attention(model: nn.Module) -> dict[int, nn.Module]:
    """Replace the forward of every Gated DeltaNet layer by `packed_forward`; returns them
    by layer index (empty for a model without them)."""
    layers = {}
    for module in model.modules():
        if _is_gated_delta_net(module):
            module.forward = packed_forward.__get__(module)
            layers[module.layer_idx] = module
    return layers


def packed_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """hidden_states: [1, T, hidden] (the packed row) -> [1, T, hidden]; the state slots
    come with attention.attention_step's batch."""
    attn_batch = current_step()
    if isinstance(attn_batch, LayerProbe):
        attn_batch.layers.add(self.layer_idx)
        return torch.zeros_like(hidden_states)
    recurrent = getattr(attn_batch, "recurrent", None)
    if recurrent is None:
        raise RuntimeError("loraplex's linear attention runs only inside the loraplex runner")

    T = hidden_states.shape[1]
    Hv, dk, dv = self.num_v_heads, self.head_k_dim, self.head_v_dim
    mixed, z, b, a = _projections(self, hidden_states)  # [T, C], [1, T, Hv * dv], [T, Hv] x 2
    beta = b.sigmoid()  # [T, Hv]
    # (in fp32: a half-precision A could be -inf, as HF notes)
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [T, Hv]
    conv_state = recurrent.state.conv[self.layer_idx]  # [slots, channels, K - 1]
    delta_state = recurrent.state.delta[self.layer_idx]  # [slots, Hv, dk, dv]
    weight = self.conv1d.weight  # [channels, 1, K]
    out = hidden_states.new_empty(T, Hv, dv)

    def mix(rows: slice, slots: torch.Tensor, rule) -> None:
        """Rows of the packed batch, as len(slots) sequences of equal length."""
        n = len(slots)
        x = mixed[rows].view(n, -1, mixed.shape[1]).transpose(1, 2)  # [n, channels, L]
        window = torch.cat([conv_state[slots], x.to(conv_state.dtype)], dim=-1)  # [n, C, K-1+L]
        conv_state[slots] = window[..., -conv_state.shape[-1]:]
        y = F.conv1d(window.to(weight.dtype), weight, self.conv1d.bias,
                     groups=weight.shape[0])  # [n, channels, L]
        y = ACT2FN[self.activation](y).to(hidden_states.dtype).transpose(1, 2)  # [n, L, C]
        q, k, v = torch.split(y, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        L = q.shape[1]
        o, state = rule(q.reshape(n, L, -1, dk), k.reshape(n, L, -1, dk),
                        v.reshape(n, L, Hv, dv), g=g[rows].view(n, L, Hv),
                        beta=beta[rows].view(n, L, Hv), initial_state=delta_state[slots],
                        output_final_state=True, use_qk_l2norm_in_kernel=True)
        delta_state[slots] = state
        out[rows] = o.reshape(-1, Hv, dv)

    D = recurrent.decode_slots.numel()
    if D:
        mix(slice(0, D), recurrent.decode_slots, torch_recurrent_gated_delta_rule)
    for start, length, slot in recurrent.prefills:
        mix(slice(start, start + length), slot, torch_chunk_gated_delta_rule)
    core = self.norm(out.view(-1, dv), z.reshape(-1, dv))  # [T * Hv, dv]
    return self.out_proj(core.view(1, T, -1))  # [1, T, hidden]
