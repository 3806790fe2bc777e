"""Batches for training: fixed-length windows over token segments, drawn without replacement.

Each epoch is a seeded permutation of all training windows; the position in it (epoch, cursor) is the whole
data state, so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpt2cli.runtime.devices import device_rules


@dataclass
class Batch:
    """One micro-batch: inputs and targets `(B, T)` (IGNORE_INDEX where a target does not count) and, for packed
    examples, each token's example number in its row `(B, T)` (None: one text runs through the whole row)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    documents: torch.Tensor | None = None


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device_rules(device).pin_memory:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class Windows:
    """Non-overlapping windows of `seq_len + 1` tokens (inputs and shifted targets) over a list of segments."""

    def __init__(self, segments: list[np.ndarray], seq_len: int) -> None:
        self.segments = segments
        self.seq_len = seq_len
        counts = np.array([(segment.size - 1) // seq_len if segment.size > 1 else 0 for segment in segments])
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first window of each segment

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets `(len(indices), seq_len)` for the given windows."""
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        segment_of = np.searchsorted(self.starts, indices, side="right") - 1
        for row, (window, segment) in enumerate(zip(indices, segment_of, strict=True)):
            offset = (int(window) - int(self.starts[segment])) * self.seq_len
            rows[row] = self.segments[segment][offset : offset + self.seq_len + 1]
        tensor = to_device(rows, device)
        return tensor[:, :-1], tensor[:, 1:]

    def training_batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        return Batch(*self.batch(indices, device))

    def target_count(self, indices: np.ndarray) -> int:
        """Targets that count in these windows: all of them."""
        return len(indices) * self.seq_len


@dataclass
class SamplerState:
    epoch: int = 0
    cursor: int = 0  # windows already taken from this epoch's permutation


class WindowSampler:
    """Window indices without replacement: a fresh seeded permutation every epoch."""

    def __init__(self, count: int, seed: int, state: SamplerState | None = None) -> None:
        self.count = count
        self.seed = seed
        self.state = state or SamplerState()
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def take(self, n: int) -> np.ndarray:
        """The next `n` windows, continuing into the next epoch when this one runs out."""
        taken = []
        while n > 0:
            order = self._permutation(self.state.epoch)
            part = order[self.state.cursor : self.state.cursor + n]
            taken.append(part)
            n -= part.size
            self.state.cursor += part.size
            if self.state.cursor >= self.count:
                self.state.epoch += 1
                self.state.cursor = 0
        return np.concatenate(taken)

    @property
    def epochs_done(self) -> float:
        return self.state.epoch + self.state.cursor / self.count
