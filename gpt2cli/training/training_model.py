"""What the training step calls: GPT-2's hidden states and the fused output-projection loss in one `forward`.

`GPT2.forward` stays plain (logits, then the loss). Training never needs the (B, T, 50257) logits, so this module
computes the loss block by block without storing them (`losses.fused_linear_cross_entropy`), and hands the tied
embedding's gradient to the loss's (`losses.TiedGradient`). DDP and FSDP2 wrap this module, not the GPT2 inside it:
their forward hooks (gradient sync, unsharding the root's weights) run only when training goes through this
module's `forward`. The GPT2 inside keeps its own parameter names: checkpoints are saved from it, without prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gpt2cli.model.gpt2 import GPT2
from gpt2cli.training.loss import TiedGradient, fused_linear_cross_entropy, tied_embedding


class TrainingModel(nn.Module):
    def __init__(self, model: GPT2, compiled_loss: bool = False) -> None:
        super().__init__()
        self.model = model
        self.compiled_loss = compiled_loss  # the loss kernel compiled by torch.compile (with --compile)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the next tokens `targets` `(B, T)` (-1 ignored) after `idx` `(B, T)`."""
        model = self.model
        wte = model.transformer.wte
        tied = TiedGradient() if model.lm_head.weight is wte.weight else None
        tok_emb = wte(idx) if tied is None else tied_embedding(idx, wte.weight, tied)  # (B, T, C)
        x = model.hidden_states(idx, tok_emb=tok_emb)  # (B, T, C)
        flat = x.view(-1, x.size(-1))  # (B*T, C)
        # Evaluation (no gradient) keeps the eager kernel: no second compilation for a few calls.
        compiled = self.compiled_loss and torch.is_grad_enabled()
        return fused_linear_cross_entropy(flat, model.lm_head.weight, targets.reshape(-1), compiled=compiled, tied=tied)


def block_compile_options() -> dict[str, Any]:
    """torch.compile options for the blocks. On the CPU, Inductor then computes GELU's tanh from one exp instead of
    a vectorised tanh: 2.3x faster forward (1.9 → 0.8 ms for 2048 × 1024 values on a 2-core Xeon), 1.3x backward.
    torch leaves it off because the decomposition loses relative precision for tanh near 0, but GELU adds tanh's
    output to 1: against float64, GELU's largest error is 5.2e-7 with it and 4.3e-7 without. GPUs ignore it, and
    torch releases before the option (2.7) would refuse it, so it is only passed where it exists."""
    import torch._inductor.config as inductor_config

    return {"cpp.use_decompose_tanh": True} if hasattr(inductor_config.cpp, "use_decompose_tanh") else {}


def compile_blocks(model: GPT2) -> None:
    """torch.compile every block in place (one compilation serves them all: the code is the same)."""
    options = block_compile_options()
    for block in model.transformer.h:
        block.compile(options=options)
