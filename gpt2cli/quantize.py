"""Faster weights for decoding: weight-only int8 quantization and batch-1 matrix-vector products (gpt-fast style).

Both swap the model's `nn.Linear` modules in place and keep their parameters (so the tied output head stays tied
where it is not quantized); `gpt2 sample`, `gpt2 bench` and `gpt2 serve` use the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2cli.model import GPT2


class MatVecLinear(torch.nn.Linear):
    """A Linear that computes one-row inputs with `torch.mv`: bf16 matrix-vector products through `F.linear` run
    at ~2/3 of the speed on the CPU (108 us against 75 us for 768 -> 2304; 2.8 ms against 1.9 ms for the output head).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.size(-1) or x.device.type != "cpu":
            return super().forward(x)
        out = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


def use_matvec_for_decode(model: GPT2) -> GPT2:
    """Switch every Linear to `MatVecLinear` (same parameters, so tying is kept): faster batch-1 bf16 decoding."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = MatVecLinear
    return model


def quantize_int8(model: GPT2) -> GPT2:
    """Weight-only int8 (per output channel) for every projection and the output head, in place (gpt-fast style).

    The embedding keeps its float weights for the input lookup; the output head gets its own int8 copy.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    return model


class Int8Linear(torch.nn.Module):
    """y = x · dequant(W)ᵀ + b with W stored as int8 rows and one float scale per row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantized, scales.to(linear.weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.device.type == "cpu":
            # The CPU kernel is fast with bf16 activations only (measured 44 us against 478 us in float32 for a
            # 768 -> 2304 projection), so activations go through it in bf16.
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales_bf16).to(flat.dtype)
        else:
            out = F.linear(flat, self.weight.to(flat.dtype)) * self.scales.to(flat.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], -1)
