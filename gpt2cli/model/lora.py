"""LoRA (Hu et al., 2021): train a low-rank update of chosen projections while the model itself stays frozen.

A target `nn.Linear` of weight W (out, in) becomes a `LoRALinear` computing `x W^T + b + (alpha / r) · x A^T B^T`,
with A (r, in) random and B (out, r) zero, so training starts from the model unchanged. Only A and B train: the
optimizer holds r · (in + out) values per target instead of in · out, and the base needs no gradients or moments.
`merge_adapters` folds B A into W for a plain GPT-2 that every tool reads.

Adapters are named after the projection they adapt, `transformer.h.N.attn.c_attn.lora_a` and `.lora_b`; the base
weights keep their names, so the model's checkpoint names are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.errors import UsageError
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.model.lora_targets import DEFAULT_TARGETS, TARGETS

ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # full paths inside a block (`lora_targets.resolve_targets`)

    @property
    def scaling(self) -> float:
        """alpha / r: the update's scale, so that changing the rank needs no new learning rate."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` (its `weight` and `bias` as before) plus the trainable low-rank update."""

    def __init__(self, base: nn.Linear, spec: LoraSpec) -> None:
        nn.Module.__init__(self)  # the base's own tensors are reused, not allocated again
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.__dict__.update({key: value for key, value in base.__dict__.items() if key == "is_residual_projection"})
        self.scaling = spec.scaling
        # A probability, not an nn.Dropout: `GPT2.set_dropout` sets every nn.Dropout to the model's own.
        self.lora_dropout = spec.dropout
        device = base.weight.device
        # Adapters in float32 whatever the base's dtype: they are what the optimizer updates.
        self.lora_a = nn.Parameter(torch.empty(spec.rank, self.in_features, device=device))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, spec.rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own initialisation, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        update = F.linear(F.linear(dropped, self.lora_a), self.lora_b)  # (..., r), then (..., out)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.size(0)}, scaling={self.scaling:g}"


def add_adapters(model: GPT2, spec: LoraSpec) -> GPT2:
    """Freeze every weight of `model` and put adapters on `spec.targets` of every block, in place (A drawn from
    torch's generator: seed it first). Returns the model."""
    unknown = sorted(set(spec.targets) - set(TARGETS))
    if unknown:
        raise UsageError(f"unknown LoRA target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    widest = max(model.config.n_embd, 1)
    if not 1 <= spec.rank <= widest:
        raise UsageError(f"--lora-rank must be between 1 and the model's width {widest}, got {spec.rank}")
    model.requires_grad_(False)
    for block in model.transformer.h:
        for target in spec.targets:
            parent_name, _, child_name = target.rpartition(".")
            parent = block.get_submodule(parent_name)
            base = getattr(parent, child_name)
            if isinstance(base, LoRALinear):
                raise UsageError(f"{target}: the model has adapters already")
            setattr(parent, child_name, LoRALinear(base, spec))
    return model


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_state(model: GPT2) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (what a LoRA checkpoint stores instead of the model)."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter(name)}


def load_adapter_state(model: GPT2, tensors: dict[str, torch.Tensor], source: str = "adapters") -> None:
    """Copy saved adapters into a model that `add_adapters` prepared with the same spec."""
    parameters = {name: parameter for name, parameter in model.named_parameters() if is_adapter(name)}
    missing, extra = sorted(set(parameters) - set(tensors)), sorted(set(tensors) - set(parameters))
    if missing or extra:
        raise UsageError(f"{source}: the adapters do not match the LoRA settings ({(missing or extra)[0]} ...)")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.shape != tensors[name].shape:
                raise UsageError(
                    f"{source}: {name} has shape {list(tensors[name].shape)}, the settings need {list(parameter.shape)}"
                )
            parameter.copy_(tensors[name])


def adapted_weights(adapters: dict[str, torch.Tensor]) -> list[str]:
    """The names of the weights `adapters` update (`transformer.h.N.attn.c_attn.weight`, ...), in order."""
    return [name.removesuffix(".lora_a") + ".weight" for name in adapters if name.endswith(".lora_a")]


@torch.no_grad()
def merged_weight(
    weight: torch.Tensor, adapters: dict[str, torch.Tensor], name: str, scaling: float, transposed: bool = False
) -> torch.Tensor:
    """The weight `name` with its adapters folded in: W + (alpha / r) · B A, computed in float32 and returned in W's
    own dtype. `transposed`: W is stored (in, out), as transformers' Conv1D and checkpoint files hold it."""
    prefix = name.removesuffix(".weight")
    a, b = adapters[f"{prefix}.lora_a"].float(), adapters[f"{prefix}.lora_b"].float()  # (r, in), (out, r)
    update = (b @ a) * scaling  # (out, in)
    return (weight.float() + (update.t() if transposed else update)).to(weight.dtype)


@torch.no_grad()
def merge_adapters(model: GPT2, adapters: dict[str, torch.Tensor], scaling: float) -> GPT2:
    """Fold `adapters` into the plain `model`'s weights in place. Returns the model, still a plain GPT-2."""
    for name in adapted_weights(adapters):
        weight = model.get_parameter(name)
        weight.copy_(merged_weight(weight, adapters, name, scaling))
    return model
