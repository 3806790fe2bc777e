"""Will a training step fit in memory? An estimate of what a step needs and a reading of what the process may use,
so that a CPU run that cannot fit is refused before it starts instead of being killed by the kernel mid-step.

The estimate follows the run: which parameters it trains, with which optimizer, and whether blocks are recomputed.
In bytes:
    trained parameters     4 (float32 weight) + 4 (gradient) + the optimizer's state: AdamW 8 (two moments), Muon 4
                           (one momentum, on the blocks' matrices; AdamW's two on the rest); +2 with autocast (the
                           16-bit copy of each float32 weight); +4 under DDP (its gradient buckets)
    frozen parameters      their own size (LoRA's base: 2 for its 16-bit matrices, 4 for float32 ones, +2 for
                           each float32 one under autocast: its 16-bit copy, kept for the backward pass); no gradient
                           or optimizer state
    activations            batch × sequence × (per layer ACTIVATION_WIDTHS × n_embd values + the embeddings') in
                           the compute dtype's size; with activation checkpointing one block's worth plus each
                           block's float32 input, recomputed one block at a time in the backward pass; plus one block
                           of the fused loss's logits and, where the head trains, its float32 weight gradient
    RUNTIME_BYTES          what the first step adds whatever the shape (thread pools, kernel scratch buffers)
Measured against the peak resident memory of real CPU steps in `benchmarks/memory_estimate.py`: within -11% and
+19% over six shapes from 7M to 124M parameters, float32 and bf16 (docs/reliability.md); the LoRA, Muon and
checkpointing cases are in its table too (benchmarks/README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2cli.errors import Gpt2Error
from gpt2cli.model.gpt2 import GPT2Config
from gpt2cli.settings.types import OptimizerName
from gpt2cli.training.loss import BLOCK_ELEMENTS

if TYPE_CHECKING:
    import torch

    from gpt2cli.model.gpt2 import GPT2
    from gpt2cli.runtime.devices import Precision
    from gpt2cli.runtime.distributed import World
    from gpt2cli.settings.sections import TrainSettings
    from gpt2cli.training.plan import RunPlan

GIB = 2**30
# Values of n_embd width each layer keeps for the backward pass, per token (fitted to measured peaks; the
# layer's own tensors are ~16 wide: ln 2×C, qkv 3C, attention out C, projections 2C, fc 4C, gelu 4C).
ACTIVATION_WIDTHS = 20
RUNTIME_BYTES = 256 * 2**20
# Refuse when the estimate exceeds this share of the memory available: the estimate's error (see the benchmark),
# the allocator's slack, and what the rest of the machine may take meanwhile.
USABLE_SHARE = 0.85


class NotEnoughMemory(Gpt2Error):
    """A run whose first step would not fit in the memory this process may use."""


@dataclass(frozen=True)
class TrainedParameters:
    """Which parameters a run trains and how it holds the others: plain counts, so that full training, Muon and
    LoRA (a frozen base plus small adapters) are all one estimate."""

    trainable: int  # parameters with a gradient and optimizer state (float32)
    muon: int = 0  # of those, the ones Muon holds: one moment instead of AdamW's two
    frozen: int = 0  # parameters held without gradient or optimizer state (LoRA's base)
    # Bytes per frozen parameter: 2 for 16-bit, 4 for float32, their mean where they mix (LoRA's base keeps its block
    # matrices in the compute dtype and the rest in float32).
    frozen_bytes: float = 4
    head_trained: bool = True  # the output projection (the tied embedding) trains: the loss computes its gradient

    @classmethod
    def full(cls, config: GPT2Config, optimizer: OptimizerName = "adamw") -> TrainedParameters:
        """Every parameter trained (pretraining, full fine-tuning)."""
        return cls(parameter_count(config), muon=block_matrix_count(config) if optimizer == "muon" else 0)

    @classmethod
    def adapters(
        cls, config: GPT2Config, adapter_parameters: int, base_bytes: float, muon: int = 0
    ) -> TrainedParameters:
        """LoRA: the whole base frozen in `base_bytes` per parameter, only `adapter_parameters` trained (`muon` of
        them by Muon)."""
        frozen = parameter_count(config)
        return cls(adapter_parameters, muon=muon, frozen=frozen, frozen_bytes=base_bytes, head_trained=False)

    @classmethod
    def of_model(cls, model: GPT2, optimizer: OptimizerName = "adamw") -> TrainedParameters:
        """Read off a built model: what requires a gradient is trained, the rest is frozen in its own dtype (each
        tensor once: the tied embedding is one)."""
        from gpt2cli.training.optim import muon_parameters

        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
        frozen_count = sum(parameter.numel() for parameter in frozen)
        frozen_total = sum(parameter.numel() * parameter.element_size() for parameter in frozen)
        return cls(
            trainable=sum(parameter.numel() for parameter in trained),
            muon=sum(parameter.numel() for parameter in muon_parameters(model)) if optimizer == "muon" else 0,
            frozen=frozen_count,
            frozen_bytes=frozen_total / frozen_count if frozen_count else 4,
            head_trained=model.lm_head.weight.requires_grad,
        )


@dataclass(frozen=True)
class StepShape:
    """Everything the memory of one training step depends on."""

    config: GPT2Config
    batch_size: int  # sequences per micro-batch per process
    seq_len: int
    compute_bytes: int = 4  # 4 for float32, 2 under bf16/fp16 autocast
    dtype_name: str = "float32"
    parameters: TrainedParameters | None = None  # None: every parameter trained with AdamW
    optimizer: OptimizerName = "adamw"  # named in messages; `parameters.muon` carries its memory
    activation_checkpointing: bool = False  # blocks recomputed in the backward pass
    ddp: bool = False
    shards: int = 1  # processes FSDP spreads the weights, gradients and moments over

    @property
    def trained(self) -> TrainedParameters:
        return self.parameters or TrainedParameters.full(self.config, self.optimizer)


@dataclass(frozen=True)
class MemoryEstimate:
    state_bytes: int  # weights, gradients, optimizer moments
    activation_bytes: int  # everything that depends on the batch's shape, and the runtime's own buffers
    state_label: str = "weights, gradients and AdamW"  # what `state_bytes` holds, as messages name it

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def parameter_count(config: GPT2Config) -> int:
    """GPT-2's parameters, the tied embedding counted once (as `GPT2.num_parameters`)."""
    c = config.n_embd
    per_layer = 12 * c * c + (13 * c if config.bias else 2 * c)  # four matrices; LayerNorms (and biases)
    return config.vocab_size * c + config.block_size * c + config.n_layer * per_layer + (2 if config.bias else 1) * c


def block_matrix_count(config: GPT2Config) -> int:
    """The parameters of the blocks' 2-D matrices (qkv, attention projection, MLP in and out): what Muon holds."""
    return config.n_layer * 12 * config.n_embd * config.n_embd


def training_memory(shape: StepShape) -> MemoryEstimate:
    """What one training step holds at its peak in one process."""
    config, trained, compute_bytes = shape.config, shape.trained, shape.compute_bytes
    autocast = compute_bytes < 4
    # Autocast's 16-bit copy of each float32 weight, cached (trained) or kept for the backward pass (frozen).
    per_trained = 4 + 4 + 8 + (2 if autocast else 0) + (4 if shape.ddp else 0)  # weight, gradient, moments, buckets
    float32_share = max(0.0, trained.frozen_bytes - 2) / 2  # of the frozen parameters (16- and 32-bit ones mixed)
    per_frozen = trained.frozen_bytes + (2 * float32_share if autocast else 0)
    state = trained.trainable * per_trained - trained.muon * 4 + round(trained.frozen * per_frozen)  # Muon: 1 moment
    state = -(-state // shape.shards)
    tokens = shape.batch_size * shape.seq_len
    kept_layers = 1 if shape.activation_checkpointing else config.n_layer
    per_token = (kept_layers * ACTIVATION_WIDTHS + 4) * config.n_embd * compute_bytes
    if shape.activation_checkpointing:
        per_token += config.n_layer * config.n_embd * 4  # each block's input, the float32 residual stream
    # The fused loss: one block of logits (float32 statistics + the compute dtype's softmax) and the output
    # projection's gradient, computed during the forward pass and held until the backward.
    rows = max(1, min(tokens, BLOCK_ELEMENTS // config.vocab_size))
    loss_bytes = rows * config.vocab_size * (4 + compute_bytes)
    if trained.head_trained:  # a frozen head (LoRA) has no weight gradient to accumulate
        loss_bytes += config.vocab_size * config.n_embd * 4
    return MemoryEstimate(state, tokens * per_token + loss_bytes + RUNTIME_BYTES, _state_label(shape))


def _state_label(shape: StepShape) -> str:
    trained = shape.trained
    optimizer = "Muon and AdamW" if trained.muon else "AdamW"
    if trained.frozen:
        base = {2.0: "16-bit", 4.0: "float32"}.get(float(trained.frozen_bytes), "16- and 32-bit")
        return f"frozen {base} base, trained weights with their gradients and {optimizer}"
    return f"weights, gradients and {optimizer}"


def parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes a built model's parameters take (each tensor once)."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def run_step_shape(train: TrainSettings, model: GPT2, plan: RunPlan, precision: Precision, world: World) -> StepShape:
    """The step a run is about to take, read off its settings and its built model (so a LoRA model's frozen base
    and adapters count as they are held)."""
    return StepShape(
        config=model.config,
        batch_size=plan.batch_size,
        seq_len=plan.seq_len,
        compute_bytes=precision.compute_bytes,
        dtype_name=precision.name,
        parameters=TrainedParameters.of_model(model, train.optimizer),
        optimizer=train.optimizer,
        activation_checkpointing=train.activation_checkpointing,
        ddp=world.distributed and train.parallel == "ddp",
        shards=world.world_size if world.distributed and train.parallel == "fsdp" else 1,
    )


def memory_remedies(train: TrainSettings, shape: StepShape) -> tuple[str, ...]:
    """The flags of this tool that would shrink the step, beyond a smaller batch: LoRA for a fine-tune that trains
    every weight, block recomputation for a run that keeps every block's activations."""
    remedies = []
    if not shape.trained.frozen and train.init_from is not None:
        remedies.append("train adapters only with --lora-rank 16")
    if not shape.activation_checkpointing:
        remedies.append("--activation-checkpointing")
    return tuple(remedies)


# ---------------------------------------------------------------- what the process may use


def memory_available() -> tuple[int, str] | None:
    """The bytes this process may still allocate and where the number comes from: the container's limit (cgroup
    memory.max less its usage) where one is set, the machine's MemAvailable otherwise, whichever is lower."""
    readings = [reading for reading in (_cgroup_free(), _meminfo_available()) if reading is not None]
    return min(readings) if readings else None


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, str] | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available memory (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> tuple[int, str] | None:
    """The tightest `limit - usage` over this process's cgroup and its ancestors (cgroup v2, else v1)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    free: list[int] = []
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if controllers == "":  # v2: limits may be set on any ancestor
            group = root / relative.lstrip("/")
            for folder in [group, *group.parents]:
                if not folder.is_relative_to(root):
                    break
                free.extend(_free_in(folder, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            folder = root / "memory" / relative.lstrip("/")
            for candidate in (folder, root / "memory"):
                free.extend(_free_in(candidate, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    return (max(0, min(free)), "the container's memory limit (cgroup memory.max)") if free else None


def _free_in(folder: Path, limit_file: str, usage_file: str) -> list[int]:
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return []
    if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
        return []
    return [int(limit) - usage]


def local_processes() -> int:
    """Processes sharing this machine's memory: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ---------------------------------------------------------------- the check


def check_training_memory(
    shape: StepShape, already_resident: int = 0, remedies: tuple[str, ...] = ()
) -> MemoryEstimate:
    """Refuse (NotEnoughMemory) a run whose step would not fit; `already_resident` bytes of the estimate (the
    weights, once built) are in use already and so not counted as available. `remedies`: flags that would shrink
    the run's state further, offered after the batch's own (e.g. LoRA for a full fine-tune)."""
    estimate = training_memory(shape)
    available = memory_available()
    if available is None:
        return estimate
    free, source = available
    share = local_processes()
    budget = (free // share + already_resident) * USABLE_SHARE
    if estimate.total_bytes <= budget:
        return estimate
    each = f" per process ({share} on this machine)" if share > 1 else ""
    raise NotEnoughMemory(
        f"a training step needs about {_gib(estimate.total_bytes)} GiB{each} ({_breakdown(shape, estimate)}), but "
        f"{_gib(free // share + already_resident)} GiB is available ({source}); {_what_to_lower(shape, remedies)}; "
        "--no-memory-check runs it anyway"
    )


def _breakdown(shape: StepShape, estimate: MemoryEstimate) -> str:
    recomputed = ", blocks recomputed" if shape.activation_checkpointing else ""
    return (
        f"{estimate.state_label} {_gib(estimate.state_bytes)} GiB; activations {_gib(estimate.activation_bytes)} "
        f"GiB for batch {shape.batch_size} × {shape.seq_len} tokens in {shape.dtype_name}{recomputed}"
    )


def _what_to_lower(shape: StepShape, remedies: tuple[str, ...]) -> str:
    lower_dtype = ", or --dtype bfloat16" if shape.compute_bytes == 4 else ""
    advice = f"lower --batch-size (add --total-batch-tokens to keep the step's size) or --seq-len{lower_dtype}"
    return f"{advice}; or {', '.join(remedies)}" if remedies else advice


def _gib(value: int | float) -> str:
    return f"{value / GIB:.1f}" if value >= GIB / 10 else f"{value / GIB:.2f}"


def out_of_memory_message(shape: StepShape, device: str, device_bytes: int | None) -> str:
    """The one line for an out-of-memory error in a run's first step: the estimate, the device's memory, what
    to change."""
    estimate = training_memory(shape)
    has = f" of the {_gib(device_bytes)} GiB it has" if device_bytes else ""
    lower_dtype = ", --dtype bfloat16" if shape.compute_bytes == 4 else ""
    return (
        f"out of memory on {device}{has} in the first step: it needs about {_gib(estimate.total_bytes)} GiB "
        f"({_breakdown(shape, estimate)}); lower --batch-size (add --total-batch-tokens to keep the step's size) or "
        f"--seq-len{lower_dtype}, or shard the model with torchrun --parallel fsdp"
    )
