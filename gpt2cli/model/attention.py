"""Causal attention for compiled bf16 training on the CPU: SDPA's forward, a backward that Inductor compiles.

On the CPU, `F.scaled_dot_product_attention` runs a flash-attention kernel whose backward is slow for GPT-2's
shapes: 7.8 ms of a layer's 8.8 ms forward + backward for 8 × 4 heads × 256 positions × 64 in bf16 on a 2-core Xeon
(~0.1 TFLOP/s). Here the forward calls that same kernel directly, keeping the log-sum-exp it computes anyway, and the
backward is written as batched products plus elementwise work, which torch.compile fuses: 6.0 ms against 9.5 ms
for that shape, 12.3 against 14.5 ms at 512 positions, but 26 against 17 ms at 1024, as it computes the whole
(T × T) score matrix, masked half included. Gradient error against float64 is that of SDPA's bf16 backward or up
to 1.6 times it (scores up to 80). So this path is taken only for bf16 inside torch.compile, for sequences of at
most LONGEST_SEQUENCE; eager, in float32 or longer, the kernel's own backward is faster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_cpu_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
LONGEST_SEQUENCE = 512  # measured break-even: faster up to 512 positions, slower at 1024


def compiled_cpu_attention_applies(q: torch.Tensor, dropout: float) -> bool:
    """Whether `causal_attention` is the faster choice for these queries (see the module docstring)."""
    return (
        _cpu_flash_attention is not None
        and torch.compiler.is_compiling()
        and q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.size(-2) <= LONGEST_SEQUENCE
        and dropout == 0.0
        and torch.is_grad_enabled()
        and q.requires_grad
    )


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        out, log_sum_exp = _cpu_flash_attention(q, k, v, 0.0, True)  # type: ignore[misc]
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, out, log_sum_exp = ctx.saved_tensors  # type: ignore[attr-defined]
        length, scale = q.size(-2), 1.0 / math.sqrt(q.size(-1))
        grad_out = grad_out.to(q.dtype)
        # In float32, as the forward's: bf16 scores would drift from its log-sum-exp when they are large.
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        probs = torch.where(causal, torch.exp(scores - log_sum_exp[..., None]), 0.0)  # the forward's softmax
        grad_v = probs.to(q.dtype).transpose(-2, -1) @ grad_out
        grad_probs = (grad_out @ v.transpose(-2, -1)).float()
        # The softmax's backward: Σ_j p_j · dp_j equals the row's dO · O, which is cheaper to form.
        row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_scores = (probs * (grad_probs - row_dot)).to(q.dtype)
        grad_q = (grad_scores @ k) * scale
        grad_k = (grad_scores.transpose(-2, -1) @ q) * scale
        return grad_q, grad_k, grad_v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True)` for `(B, nh, T, hs)` tensors, without dropout."""
    return _CausalAttention.apply(q, k, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention of queries `(B, nh, T, hs)` over keys and values `(B, nh, S, hs)`.

    SDPA picks flash / memory-efficient kernels where the device has them; compiled bf16 training on the CPU takes
    `causal_attention`, SDPA's kernel with a faster backward (see the module docstring)."""
    if mask is None and causal and k.size(-2) == q.size(-2) and compiled_cpu_attention_applies(q, dropout):
        return causal_attention(q, k, v)
    if mask is not None and q.size(-2) == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
        return _one_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A decode step's attention (one query per row) written out for Inductor, which fuses it into a few loops:
    SDPA's CPU kernel costs ~300 us per layer for 8 rows of one query each, far more than the arithmetic."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, 1, L)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ v.float()).to(q.dtype)
