"""Plain linear layers on the CPU, with their weights prepacked for oneDNN.

torch runs a CPU `nn.Linear` through MKL's sgemm, which lays the weight out afresh on
every call; with the few rows of a decode step that is most of the work (and MKL takes
a slower path on AMD CPUs). oneDNN keeps a packed copy instead. Measured on this
project's 2-core x86_64 CPU (AMD EPYC, AVX-512), fp32, hot caches:

    [32 x 512] @ [512 x 1376]    387 us -> 228 us
    [4 x 512] @ [512 x 512]       60 us ->  28 us
    [1 x 512] @ [512 x 8000]    2020 us -> 361 us   (a small model's output head)

Results differ from MKL's by summation order only (~5e-6 relative in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def can_pack(module: nn.Module) -> bool:
    """A plain nn.Linear (not a bitsandbytes subclass) or a transformers Conv1D (GPT-2's)
    on the CPU, in a dtype oneDNN packs here: fp32, or bf16 where the CPU has AVX-512 (BW,
    VL, DQ) or AVX-NE-CONVERT (oneDNN refuses bf16 elsewhere, e.g. on an AVX2-only Zen 3;
    such a layer stays as it is)."""
    if type(module) not in (nn.Linear, Conv1D) or module.weight.device.type != "cpu":
        return False
    dtype = module.weight.dtype
    return torch.backends.mkldnn.is_available() and (
        dtype == torch.float32
        or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


@dataclass(frozen=True)
class WeightInfo:
    """What model code may read of a packed layer's weight (HunYuan-MoE's router checks its
    dtype). Not a tensor: code that would compute with it fails, rather than run without
    the packed weight (or its LoRA)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W held in oneDNN's packed layout (an opaque copy of the weight)."""

    def __init__(self, linear: nn.Linear | Conv1D):
        super().__init__()
        weight = linear.weight.detach()  # [out, in]; a Conv1D's is [in, out]
        if isinstance(linear, Conv1D):
            weight = weight.T.contiguous()
        self.out_features, self.in_features = weight.shape
        # not a parameter or buffer: an mkldnn tensor supports no state_dict() or .to()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(),
                                                                   requires_grad=False)
        self.weight = WeightInfo(linear.weight.shape, linear.weight.dtype, linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"
