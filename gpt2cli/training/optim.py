"""The optimizers (AdamW, or Muon with AdamW as modded-nanogpt splits them) and the learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpt2cli.errors import CheckpointError
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.runtime.devices import device_rules
from gpt2cli.runtime.distributed import full_tensor, shard_like


@dataclass(frozen=True)
class Schedule:
    kind: str  # cosine | linear | constant | wsd
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int  # steps the schedule spans (warmup included)
    decay_fraction: float = 0.2  # wsd: the share of the schedule (after warmup) spent decaying to min_lr

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
        # wsd: warmup, a stable plateau, then a linear decay over the last `decay_fraction` of the schedule
        decay_start = 1.0 - self.decay_fraction
        if progress < decay_start or self.decay_fraction <= 0:
            return self.lr
        return self.lr - (progress - decay_start) / self.decay_fraction * (self.lr - self.min_lr)


def parameter_groups(
    model: GPT2, weight_decay: float, leave_out: Sequence[torch.nn.Parameter] = ()
) -> list[dict[str, object]]:
    """Weight decay on 2-D weights (matmuls and embeddings) only; biases and LayerNorm gains are not decayed.
    `leave_out`: parameters another optimizer holds (Muon's matrices)."""
    left_out = {id(parameter) for parameter in leave_out}
    decay, no_decay = [], []
    for parameter in model.parameters():  # the tied embedding appears once
        if parameter.requires_grad and id(parameter) not in left_out:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: GPT2, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where the device has one (`DeviceRules.fused_adamw`), else multi-tensor."""
    return _adamw(parameter_groups(model, weight_decay), lr, betas, device)


def _adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    if device_rules(device).fused_adamw:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # older torch without a fused CPU kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def muon_parameters(model: GPT2) -> list[torch.nn.Parameter]:
    """The hidden matrices Muon updates: every 2-D weight inside the blocks (attention qkv and projection, MLP in and
    out). Embeddings (the tied head), biases and LayerNorm gains stay with AdamW, as in modded-nanogpt."""
    return [
        parameter for parameter in model.transformer.h.parameters() if parameter.requires_grad and parameter.dim() == 2
    ]


def muon_available() -> bool:
    return hasattr(torch.optim, "Muon")  # torch >= 2.9


class MuonWithAdamW:
    """Muon for the blocks' matrices and AdamW for the rest, stepped together as one optimizer.

    `param_groups` lists both optimizers' groups (the same dicts), so the schedule, gradient clipping and the
    GradScaler (which unscales through `param_groups` and then calls `step`) treat it like a single optimizer.
    Each group's `lr_ratio` is its peak learning rate over the schedule's: the schedule multiplies both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.optimizers: tuple[torch.optim.Optimizer, ...] = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Every parameter's state, read-only (each optimizer keeps its own)."""
        return {parameter: state for optimizer in self.optimizers for parameter, state in optimizer.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def build_muon(
    model: GPT2,
    lr: float,
    muon_lr: float,
    adjust_lr: str,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> MuonWithAdamW:
    """Muon (Nesterov momentum 0.95, 5 Newton-Schulz steps) on the blocks' matrices; AdamW on the rest, with weight
    decay on the embeddings only. Both decay weights by `weight_decay` × their learning rate."""
    hidden = muon_parameters(model)
    adamw_groups = parameter_groups(model, weight_decay, leave_out=hidden)
    muon = torch.optim.Muon(
        [{"params": hidden, "lr_ratio": muon_lr / lr}],
        lr=muon_lr,
        weight_decay=weight_decay,
        momentum=0.95,
        nesterov=True,
        adjust_lr_fn=adjust_lr,
    )
    return MuonWithAdamW(muon, _adamw(adamw_groups, lr, betas, device))


Optimizer = torch.optim.Optimizer | MuonWithAdamW


def inner_optimizers(optimizer: Optimizer) -> tuple[torch.optim.Optimizer, ...]:
    return optimizer.optimizers if isinstance(optimizer, MuonWithAdamW) else (optimizer,)


def optimizer_tensors(model: GPT2, optimizer: Optimizer, keep: bool = True) -> dict[str, torch.Tensor]:
    """Optimizer state (AdamW's moments, Muon's momentum) by parameter name, gathered whole under FSDP."""
    tensors = {}
    state = optimizer.state
    for name, parameter in model.named_parameters():
        for key, value in state.get(parameter, {}).items():
            whole = full_tensor(value.detach())
            if keep:
                tensors[f"{name}.{key}"] = whole.contiguous().cpu()
    return tensors


def load_optimizer_tensors(model: GPT2, optimizer: Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    names = {parameter: name for name, parameter in model.named_parameters()}
    for inner in inner_optimizers(optimizer):
        fused = any(group.get("fused") for group in inner.param_groups)  # fused AdamW keeps `step` on the device
        keys = ("momentum_buffer",) if type(inner).__name__ == "Muon" else ("step", "exp_avg", "exp_avg_sq")
        for parameter in (parameter for group in inner.param_groups for parameter in group["params"]):
            name = names[parameter]
            if f"{name}.{keys[-1]}" not in tensors:
                raise CheckpointError(f"optimizer state has no moments for {name} (saved by another --optimizer?)")
            # Copies: optimizer state is updated in place and must not alias the loaded file's buffers. Under FSDP
            # each rank keeps its own shard of the whole moments saved in the file.
            inner.state[parameter] = {
                key: tensors[f"{name}.{key}"].to(parameter.device if fused else "cpu", copy=True)
                if key == "step"
                else shard_like(tensors[f"{name}.{key}"].to(parameter.device, copy=True), parameter)
                for key in keys
            }


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
