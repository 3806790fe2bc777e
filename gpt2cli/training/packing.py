"""Fine-tuning examples packed into training windows: whole examples, best fit, each one kept apart.

Each window (row) holds `seq_len + 1` tokens: inputs are its first `seq_len`, targets its last. Examples are placed
longest first, each into the row with the least room that still fits it (best-fit decreasing, as nanochat's SFT
packs conversations); a new row is opened when none fits. No example is split across rows; one longer than a row is
cut to the row's length (counted in `PackedRows.cut`). The rest of a row is padding (`<|endoftext|>`, no loss).

At inference a conversation starts alone at position 0. So the model sees each packed example the same way: its
positions count from its own first token and it attends only to itself (block-diagonal causal attention, from the
example numbers the batch carries: `GPT2.hidden_states`). An example's loss in a packed row is then its loss alone.
Padding one example per row would give the same numbers with plain causal attention, but with examples much shorter
than the window most of each row would be padding: see docs/fine-tuning.md for the measured trade.

The packing depends only on the examples and `seq_len`, so a resumed run rebuilds the same rows, and the sampler's
(epoch, cursor) is the whole data state, as for text windows.
"""

from __future__ import annotations

import numpy as np
import torch

from gpt2cli.data.examples import LOSS, ExampleSet
from gpt2cli.data.tokenizer import EOT_ID
from gpt2cli.model.gpt2 import IGNORE_INDEX
from gpt2cli.training.batches import Batch, to_device


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of example indices: each example (length at most `capacity`) into the fullest row it fits, longest
    first; deterministic (ties keep the examples' order)."""
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    room_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # rows by the room left in them
    has_room = np.zeros(capacity + 1, dtype=bool)
    for index in order.tolist():
        length = int(lengths[index])
        fits = has_room[length:]
        room = length + int(fits.argmax())
        if fits.size and has_room[room]:  # the row with the least room that fits
            row = room_rows[room].pop()
            has_room[room] = bool(room_rows[room])
        else:
            row, room = len(rows), capacity
            rows.append([])
        rows[row].append(index)
        left = room - length
        if left > 0:
            room_rows[left].append(row)
            has_room[left] = True
    return rows


class PackedRows:
    """Examples packed into rows of `seq_len + 1` tokens; the counterpart of `batches.Windows` for fine-tuning."""

    def __init__(self, examples: ExampleSet, seq_len: int) -> None:
        self.examples = examples
        self.seq_len = seq_len
        capacity = seq_len + 1
        lengths = examples.lengths
        self.cut = int((lengths > capacity).sum())  # examples longer than a row, cut to fit
        self.kept_lengths = np.minimum(lengths, capacity)
        self.rows = best_fit(self.kept_lengths, capacity) if len(examples) else []
        # Targets that count per example: its LOSS tokens after its first (a first token is never a target).
        loss = (examples.flags & LOSS).astype(np.int64)
        running = np.concatenate([[0], np.cumsum(loss)])
        starts = examples.offsets[:-1]
        self.example_targets = running[starts + self.kept_lengths] - running[starts + 1]
        self.row_targets = np.array([int(self.example_targets[row].sum()) for row in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fill(self) -> float:
        """The share of row positions holding example tokens (the rest is padding)."""
        return float(self.kept_lengths.sum()) / max(1, len(self.rows) * (self.seq_len + 1))

    def target_count(self, indices: np.ndarray) -> int:
        """Targets that count in these rows: the denominator of their mean loss."""
        return int(self.row_targets[indices].sum()) if len(indices) else 0

    def arrays(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens `(n, seq_len + 1)`, whether each token is a target that counts, and example numbers."""
        capacity = self.seq_len + 1
        tokens = np.full((len(indices), capacity), EOT_ID, dtype=np.int64)
        counts = np.zeros((len(indices), capacity), dtype=bool)
        documents = np.zeros((len(indices), capacity), dtype=np.int64)
        offsets = self.examples.offsets
        for row, index in enumerate(indices.tolist()):
            at = 0
            for number, example in enumerate(self.rows[index]):
                length = int(self.kept_lengths[example])
                begin = int(offsets[example])
                tokens[row, at : at + length] = self.examples.tokens[begin : begin + length]
                counts[row, at + 1 : at + length] = (self.examples.flags[begin + 1 : begin + length] & LOSS) != 0
                documents[row, at : at + length] = number
                at += length
            documents[row, at:] = len(self.rows[index])  # the padding: one more example of its own, never a target
        return tokens, counts, documents

    def training_batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        tokens, counts, documents = self.arrays(indices)
        targets = np.where(counts[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return Batch(
            inputs=to_device(np.ascontiguousarray(tokens[:, :-1]), device),
            targets=to_device(targets, device),
            documents=to_device(np.ascontiguousarray(documents[:, :-1]), device),
        )
