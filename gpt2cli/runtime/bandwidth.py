"""The measured memory bandwidth of this machine: the ceiling of batch-1 decoding, which reads every weight once
per token.

Read bandwidth is what a sum over a buffer much larger than the caches achieves (every byte read once, nothing
written); the best of a few passes, so a moment of contention on a shared machine counts less.
"""

from __future__ import annotations

import time

import torch

DEFAULT_BUFFER_BYTES = 512 * 2**20  # far beyond any CPU's last-level cache


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(
    device: torch.device | str = "cpu", buffer_bytes: int = DEFAULT_BUFFER_BYTES, passes: int = 5
) -> float:
    """Bytes per second read from a `buffer_bytes` float32 buffer by `sum()`, the best of `passes` timed passes."""
    device = torch.device(device)
    source = torch.ones(buffer_bytes // 4, device=device)
    source.sum()  # first touch and warm-up: page faults are not bandwidth
    _synchronize(device)
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        source.sum()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    del source
    return buffer_bytes / best
