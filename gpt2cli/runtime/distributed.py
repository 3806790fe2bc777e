"""Training across processes under PyTorch's launcher, `torchrun`: one process per device, DDP or FSDP2.

The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) says whether this process is part of a job; nothing is
started or networked here beyond `init_process_group`.

DDP keeps a full copy of the model on every process and averages gradients. FSDP2 (`fully_shard`) keeps only a
slice of every weight, gradient and optimizer moment per process, as DTensors: whole tensors exist only
transiently (gathered per block for compute, or per tensor with `full_tensor` for checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2cli.errors import UsageError
from gpt2cli.runtime.devices import device_rules


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_environment() -> World:
    """This process's place in a torchrun job (a single process when not launched by torchrun)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (`DeviceRules.distributed_backend`: NCCL on CUDA, gloo on the CPU, and on CUDA where
    torch has no NCCL: its Windows builds); returns this rank's device. A device without a backend (MPS) is refused."""
    if not world.distributed:
        return device
    backend = device_rules(device).distributed_backend
    if backend is None:
        raise UsageError(f"torchrun on {device.type} is not supported (no process-group backend for it)")
    if backend == "nccl":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        if dist.is_nccl_available():
            # Bound to its GPU from the start: NCCL creates its communicator eagerly and never guesses the device.
            dist.init_process_group(backend="nccl", device_id=device)
            return device
        # gloo passes CUDA tensors through host memory: it works, far slower than NCCL
    dist.init_process_group(backend="gloo")
    return device


def parallelize(module: torch.nn.Module, world: World, parallel: str, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: `module` (a `TrainingModel`) itself, its DDP wrapper, or `module`
    sharded in place. Training must call the returned module's `forward`: that is where DDP and FSDP hook in."""
    if not world.distributed:
        return module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One unit per block (gathered for its forward and backward only), then the root, the training module:
        # embeddings, the final LayerNorm and the tied output projection, gathered for its forward (the loss).
        for block in module.model.transformer.h:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(trained: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate gradients locally unless `enabled` (the last micro-step), which averages them across ranks."""
    if hasattr(trained, "set_requires_gradient_sync"):  # FSDP2
        trained.set_requires_gradient_sync(enabled)
        yield
    elif enabled or not hasattr(trained, "no_sync"):  # a single process, or DDP's syncing micro-step
        yield
    else:
        with trained.no_sync():
            yield


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank must call it); other tensors as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` cut into this rank's shard the way `like` is sharded (each rank holds `whole`: no communication)."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def sum_across(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_across(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        sum_across(value, world)
        value /= world.world_size
    return value


# How long a stop request may wait for the ranks to agree on it: torchrun and Slurm kill the job about 30 s after
# their signal, and the checkpoint must be written within that time too.
STOP_POLL_SECONDS = 5.0


def poll_interval(step_seconds: float, budget_s: float = STOP_POLL_SECONDS, most: int = 1000) -> int:
    """Steps between two agreements on stopping, so that they are at most `budget_s` apart (at least every step)."""
    if not step_seconds > 0:
        return 1
    return max(1, min(most, int(budget_s / step_seconds)))


class StopPoll:
    """When all ranks agree to stop (Ctrl-C), without a collective every step.

    A single process reads its own flag every step. Under torchrun the ranks exchange their flag, with the time their
    steps took since the last exchange (evaluation and saving included), only every K steps, K chosen from the
    slowest rank's time so that a request waits at most `budget_s` seconds; every rank gets the same values, so all
    check (and stop) at the same steps.
    """

    def __init__(
        self,
        world: World,
        device: torch.device,
        budget_s: float = STOP_POLL_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.world, self.device, self.budget_s, self.clock = world, device, budget_s, clock
        self.next_check = 0  # the first step always checks (it also measures the first, compiling, step)
        self.since = clock()
        self.steps = 0

    def agreed_stop(self, step: int, requested: bool) -> bool:
        """Whether to stop after `step`: called by every rank after every step, with its own request flag."""
        if not self.world.distributed:
            return requested
        self.steps += 1
        if step < self.next_check:
            return False
        seconds_per_step = (self.clock() - self.since) / self.steps
        value = torch.tensor([1.0 if requested else 0.0, seconds_per_step], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        stop, slowest = value.tolist()
        self.next_check = step + poll_interval(slowest, self.budget_s)
        self.since, self.steps = self.clock(), 0
        return stop > 0
