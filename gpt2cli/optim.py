"""The optimizer and learning-rate schedules of the GPT-2 recipe (llm.c / nanoGPT)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gpt2cli.distributed import full_tensor
from gpt2cli.model import GPT2


@dataclass(frozen=True)
class Schedule:
    kind: str  # cosine | linear | constant | wsd
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int  # steps the schedule spans (warmup included)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)
        if self.kind == "linear":
            return self.lr - progress * (self.lr - self.min_lr)
        # wsd: warmup, a stable plateau, then a linear decay over the last 20% of the schedule
        decay_start = 0.8
        if progress < decay_start:
            return self.lr
        return self.lr - (progress - decay_start) / (1 - decay_start) * (self.lr - self.min_lr)


def parameter_groups(model: GPT2, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on 2-D weights (matmuls and embeddings) only; biases and LayerNorm gains are not decayed."""
    decay, no_decay = [], []
    for parameter in model.parameters():  # the tied embedding appears once
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: GPT2, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where the device has it (CUDA, CPU), else the multi-tensor version."""
    groups = parameter_groups(model, weight_decay)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # older torch without a fused CPU kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def clip_gradients_on_device(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients to at most `max_norm` in total without reading anything on the host; returns the norm
    before clipping (over all shards) as a device tensor. (A scale of exactly 1 below the limit: one cheap pass.)"""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    total_norm = full_tensor(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients to at most `max_norm` in total; returns the norm before clipping (over all shards)."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    total_norm = full_tensor(torch.nn.utils.get_total_norm(grads))
    norm = total_norm.item()  # the step reads it anyway (logs, divergence check): one host sync
    if norm + 1e-6 > max_norm:  # below it the scale is exactly 1: skip a pass over every gradient
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return norm
