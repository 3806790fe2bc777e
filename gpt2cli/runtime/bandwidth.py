"""The measured memory bandwidth of this machine: the ceiling of batch-1 decoding, which reads every weight once
per token.

Read bandwidth is what a sum over a buffer much larger than the caches achieves (every byte read once, nothing
written); the best of a few passes, so a moment of contention on a shared machine counts less.

On the CPU a pass is one sum timed with the host clock. On CUDA one sum of 512 MiB takes ~0.2 ms, so the host
clock's launch and synchronisation overhead would make it 5-10% slower than it is: a pass there is several sums
queued back to back between two CUDA events, which time the GPU's own work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from gpt2cli.runtime.devices import synchronize

DEFAULT_BUFFER_BYTES = 512 * 2**20  # far beyond any CPU's last-level cache
CUDA_SUMS_PER_PASS = 10  # back-to-back sums per timed pass on CUDA: one event pair's overhead spread over ~2 ms


class PassTimer(Protocol):
    """Times one pass of work: `start` before it is issued, `stop` after; seconds the pass took."""

    def start(self) -> None: ...

    def stop(self) -> float: ...


class HostTimer:
    """The host clock, after the device has finished (`devices.synchronize`: CUDA and MPS queue their work)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._started = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self._started


class CudaEventTimer:
    """CUDA events recorded on the device's current stream around the pass: the GPU's time, not the host's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._begin: torch.cuda.Event | None = None

    def start(self) -> None:
        with torch.cuda.device(self.device):
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()

    def stop(self) -> float:
        assert self._begin is not None, "stop() before start()"
        with torch.cuda.device(self.device):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        end.synchronize()
        return self._begin.elapsed_time(end) / 1000.0  # milliseconds


def pass_timer(device: torch.device) -> PassTimer:
    return CudaEventTimer(device) if device.type == "cuda" else HostTimer(device)


def runs_per_pass(device: torch.device) -> int:
    return CUDA_SUMS_PER_PASS if device.type == "cuda" else 1


def best_seconds_per_run(work: Callable[[], object], timer: PassTimer, passes: int, runs: int) -> float:
    """The fastest of `passes` timed passes of `runs` back-to-back calls of `work`, per call."""
    best = float("inf")
    for _ in range(passes):
        timer.start()
        for _ in range(runs):
            work()
        best = min(best, timer.stop() / runs)
    return best


def read_bandwidth(
    device: torch.device | str = "cpu", buffer_bytes: int = DEFAULT_BUFFER_BYTES, passes: int = 5
) -> float:
    """Bytes per second read from a `buffer_bytes` float32 buffer by `sum()`, the best of `passes` timed passes."""
    device = torch.device(device)
    source = torch.ones(buffer_bytes // 4, device=device)
    timer = pass_timer(device)
    best_seconds_per_run(source.sum, HostTimer(device), 1, 1)  # first touch and warm-up: page faults are not bandwidth
    seconds = best_seconds_per_run(source.sum, timer, passes, runs_per_pass(device))
    del source
    return buffer_bytes / seconds
