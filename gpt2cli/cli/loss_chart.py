"""The live loss chart of `gpt2 train` on a terminal: train and validation loss as two aligned sparklines."""

from __future__ import annotations

import time
from typing import Any

from gpt2cli.observe.curves import step_sparkline


class LossChart:
    """Collects the logged losses and renders them as text; keeps the time its renders took (they must stay far
    below the step time: they run on the training thread)."""

    def __init__(self, width: int = 60) -> None:
        self.width = width
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.val_losses: list[float] = []
        self.render_seconds = 0.0
        self.renders = 0

    def add(self, record: dict[str, Any]) -> None:
        self.steps.append(record["step"])
        self.losses.append(record["loss"])
        if "val_loss" in record:
            self.val_steps.append(record["step"])
            self.val_losses.append(record["val_loss"])

    def add_history(self, run: str) -> None:
        """The records a resumed run logged before this process (metrics.jsonl, cut back to the checkpoint)."""
        from gpt2cli.errors import UsageError
        from gpt2cli.observe.metrics import read_metrics

        try:
            for record in read_metrics(run).records:
                if isinstance(record.get("loss"), (int, float)):
                    self.add(record)
        except UsageError:  # no metrics yet: the chart starts empty
            pass

    def render(self) -> str:
        """Two lines (`train ▇▆▅▄▃ 4.812 (min 4.790)`, `val ...` aligned by step), or "" before any record."""
        started = time.perf_counter()
        text = self._text()
        self.render_seconds += time.perf_counter() - started
        self.renders += 1
        return text

    def _text(self) -> str:
        if not self.steps:
            return ""
        everything = self.losses + self.val_losses
        low, high = min(everything), max(everything)  # one scale, so the gap between train and val shows
        first, last = self.steps[0], self.steps[-1]
        columns = min(self.width, len(self.steps))
        lines = [
            f"train {step_sparkline(self.steps, self.losses, first, last, columns, low, high)}"
            f"  {self.losses[-1]:.4f} (min {min(self.losses):.4f})"
        ]
        if self.val_losses:
            val = step_sparkline(self.val_steps, self.val_losses, first, last, columns, low, high)
            lines.append(f"val   {val}  {self.val_losses[-1]:.4f} (min {min(self.val_losses):.4f})")
        return "\n".join(lines)
