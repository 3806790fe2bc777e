"""Will a training step fit in memory? An estimate of what a step needs and a reading of what the process may use,
so that a CPU run that cannot fit is refused before it starts instead of being killed by the kernel mid-step.

The estimate, in bytes (float32 weights, as training keeps them):
    16 per parameter       weights, gradients and AdamW's two moments (+2 with autocast: the 16-bit weight copies)
    activations            batch × sequence × (per layer ACTIVATION_WIDTHS × n_embd values + the embeddings'),
                           in the compute dtype's size, plus one block of the fused loss's logits
    RUNTIME_BYTES          what the first step adds whatever the shape (thread pools, kernel scratch buffers)
Measured against the peak resident memory of real CPU steps in `benchmarks/memory_estimate.py`: within -11% and
+19% over six shapes from 7M to 124M parameters, float32 and bf16 (docs/reliability.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpt2cli.errors import Gpt2Error
from gpt2cli.model.gpt2 import GPT2Config
from gpt2cli.training.loss import BLOCK_ELEMENTS

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
class MemoryEstimate:
    state_bytes: int  # weights, gradients, optimizer moments
    activation_bytes: int  # everything that depends on the batch's shape, and the runtime's own buffers

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def parameter_count(config: GPT2Config) -> int:
    """GPT-2's parameters, the tied embedding counted once (as `GPT2.num_parameters`)."""
    c = config.n_embd
    per_layer = 12 * c * c + (13 * c if config.bias else 2 * c)  # four matrices; LayerNorms (and biases)
    return config.vocab_size * c + config.block_size * c + config.n_layer * per_layer + (2 if config.bias else 1) * c


def training_memory(
    config: GPT2Config, batch_size: int, seq_len: int, compute_bytes: int = 4, ddp: bool = False, shards: int = 1
) -> MemoryEstimate:
    """What one training step holds at its peak in one process (`compute_bytes`: 4 for float32, 2 under bf16/fp16
    autocast; `shards`: processes FSDP spreads the weights, gradients and moments over)."""
    parameters = -(-parameter_count(config) // shards)
    per_parameter = 16 + (2 if compute_bytes < 4 else 0) + (4 if ddp else 0)  # DDP: its gradient buckets
    tokens = batch_size * seq_len
    per_token = (config.n_layer * ACTIVATION_WIDTHS + 4) * config.n_embd * compute_bytes
    # The fused loss: one block of logits (float32 statistics + the compute dtype's softmax) and the output
    # projection's gradient, computed during the forward pass and held until the backward.
    rows = max(1, min(tokens, BLOCK_ELEMENTS // config.vocab_size))
    loss_bytes = rows * config.vocab_size * (4 + compute_bytes) + config.vocab_size * config.n_embd * 4
    return MemoryEstimate(parameters * per_parameter, tokens * per_token + loss_bytes + RUNTIME_BYTES)


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
    config: GPT2Config,
    batch_size: int,
    seq_len: int,
    compute_bytes: int,
    dtype_name: str,
    already_resident: int = 0,
    ddp: bool = False,
    shards: int = 1,
) -> MemoryEstimate:
    """Refuse (NotEnoughMemory) a run whose step would not fit; `already_resident` bytes of the estimate (the
    weights, once built) are in use already and so not counted as available."""
    estimate = training_memory(config, batch_size, seq_len, compute_bytes, ddp, shards)
    available = memory_available()
    if available is None:
        return estimate
    free, source = available
    share = local_processes()
    budget = (free // share + already_resident) * USABLE_SHARE
    if estimate.total_bytes <= budget:
        return estimate
    each = f" per process ({share} on this machine)" if share > 1 else ""
    lower_dtype = ", or --dtype bfloat16" if compute_bytes == 4 else ""
    raise NotEnoughMemory(
        f"a training step needs about {_gib(estimate.total_bytes)} GiB{each} (weights, gradients and AdamW "
        f"{_gib(estimate.state_bytes)} GiB; activations {_gib(estimate.activation_bytes)} GiB for batch "
        f"{batch_size} × {seq_len} tokens in {dtype_name}), but {_gib(free // share + already_resident)} GiB is "
        f"available ({source}); lower --batch-size (add --total-batch-tokens to keep the step's size) or "
        f"--seq-len{lower_dtype}; --no-memory-check runs it anyway"
    )


def _gib(value: int | float) -> str:
    return f"{value / GIB:.1f}" if value >= GIB / 10 else f"{value / GIB:.2f}"


def out_of_memory_message(
    config: GPT2Config,
    batch_size: int,
    seq_len: int,
    compute_bytes: int,
    dtype_name: str,
    device: str,
    device_bytes: int | None,
    ddp: bool = False,
    shards: int = 1,
) -> str:
    """The one line for an out-of-memory error in a run's first step: the estimate, the device's memory, what
    to change."""
    estimate = training_memory(config, batch_size, seq_len, compute_bytes, ddp, shards)
    has = f" of the {_gib(device_bytes)} GiB it has" if device_bytes else ""
    lower_dtype = ", --dtype bfloat16" if compute_bytes == 4 else ""
    return (
        f"out of memory on {device}{has} in the first step: it needs about {_gib(estimate.total_bytes)} GiB "
        f"(weights, gradients and AdamW {_gib(estimate.state_bytes)} GiB; activations "
        f"{_gib(estimate.activation_bytes)} GiB for batch {batch_size} × {seq_len} tokens in {dtype_name}); lower "
        f"--batch-size (add --total-batch-tokens to keep the step's size) or --seq-len{lower_dtype}, or shard the "
        "model with torchrun --parallel fsdp"
    )
