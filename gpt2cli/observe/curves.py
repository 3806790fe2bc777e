"""What `gpt2 plot` and the live training chart draw, without any plotting library: the series of each run's
metrics, smoothing, downsampling that keeps what the eye can see, bench results as bars, and text sparklines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.errors import UsageError
from gpt2cli.observe.metrics import MetricsLog

# The metrics.jsonl fields that can be drawn, with the label of their axis.
METRICS: dict[str, str] = {
    "loss": "loss",
    "val_loss": "loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "tok_per_s": "tokens/s",
    "mfu": "MFU",
    "hellaswag_acc": "HellaSwag accuracy",
    "hellaswag_acc_norm": "HellaSwag accuracy",
}
# --x choices -> (metrics.jsonl field, axis label).
X_AXES: dict[str, tuple[str, str]] = {
    "step": ("step", "step"),
    "tokens": ("tokens", "tokens"),
    "time": ("elapsed_s", "time (s)"),
}
DEFAULT_POINTS = 2000  # per series in files: far more than a figure's pixels can show apart


@dataclass
class Series:
    """One line: a run's metric against the chosen x."""

    run: str
    metric: str
    x: np.ndarray
    y: np.ndarray
    alone: bool = False  # the only run drawn: name what the line is, not whose

    @property
    def label(self) -> str:
        if self.alone:
            return {"loss": "train", "val_loss": "validation", "hellaswag_acc_norm": "acc_norm"}.get(
                self.metric, self.metric
            )
        suffix = {"val_loss": " (val)", "hellaswag_acc_norm": " (norm)"}.get(self.metric, "")
        return self.run + suffix


@dataclass
class Panel:
    """One chart: the lines that share a y axis (train and validation loss share one)."""

    ylabel: str
    xlabel: str
    series: list[Series]


def check_metrics(metrics: Sequence[str]) -> list[str]:
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise UsageError("--metric needs at least one metric")
    return list(dict.fromkeys(metrics))


def build_panels(
    logs: Sequence[MetricsLog],
    metrics: Sequence[str],
    x: str = "step",
    smooth: int = 1,
    max_points: int = DEFAULT_POINTS,
) -> list[Panel]:
    """One panel per axis label (loss and val_loss together), one series per run and metric that has values."""
    metrics = check_metrics(metrics)
    if x not in X_AXES:
        raise UsageError(f"unknown x axis {x!r}; choose from {', '.join(X_AXES)}")
    x_field, x_label = X_AXES[x]
    panels: dict[str, Panel] = {}
    for metric in metrics:
        panel = panels.setdefault(METRICS[metric], Panel(ylabel=METRICS[metric], xlabel=x_label, series=[]))
        for log in logs:
            xs, ys = _column(log.records, x_field, metric)
            if len(xs) == 0:
                continue
            ys = moving_average(ys, smooth)
            xs, ys = downsample(xs, ys, max_points)
            panel.series.append(Series(run=log.name, metric=metric, x=xs, y=ys, alone=len(logs) == 1))
    drawn = [panel for panel in panels.values() if panel.series]
    if not drawn:
        raise UsageError(f"none of the runs has values for {', '.join(metrics)}")
    return drawn


def _column(records: list[dict[str, Any]], x_field: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [
        (record[x_field], record[metric])
        for record in records
        if isinstance(record.get(metric), (int, float)) and isinstance(record.get(x_field), (int, float))
    ]
    if not pairs:
        return np.empty(0), np.empty(0)
    values = np.asarray(pairs, dtype=np.float64)
    return values[:, 0], values[:, 1]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start), so a smoothed curve never looks ahead."""
    if window <= 1 or len(values) < 2:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points: the lowest and highest point of each of max_points/2 equal buckets.

    Keeping both extremes (not a mean) means a spike or a divergence stays visible at any zoom; the first and
    last points are always kept so the curve spans the whole run.
    """
    count = len(y)
    buckets = max(1, max_points // 2)
    if count <= max_points:
        return x, y
    size = math.ceil(count / buckets)
    padded = np.full(buckets * size, np.nan)
    padded[:count] = y
    rows = padded.reshape(buckets, size)
    filled = ~np.all(np.isnan(rows), axis=1)
    rows = rows[filled]
    offsets = np.flatnonzero(filled) * size
    lows = offsets + np.nanargmin(rows, axis=1)
    highs = offsets + np.nanargmax(rows, axis=1)
    keep = np.unique(np.concatenate([[0, count - 1], lows, highs]))
    return x[keep], y[keep]


# ---------------------------------------------------------------- bench results


@dataclass
class BenchFile:
    """The results of one `gpt2 bench --json` file."""

    name: str
    results: list[dict[str, Any]]


def is_bench_file(path: Path) -> bool:
    """A `gpt2 bench --json` document (an object with `results`), as opposed to a metrics.jsonl."""
    if path.is_dir() or path.suffix != ".json":
        return False
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get("results"), list)


def read_bench(path: Path) -> BenchFile:
    try:
        document = json.loads(path.read_text())
        results = [row for row in document["results"] if row.get("tokens_per_s") is not None]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{path}: not a gpt2 bench --json file") from None
    return BenchFile(name=path.stem, results=results)


@dataclass
class BarGroup:
    """One group of bars: a file's cases of one test, as (label, tokens/s, std)."""

    name: str
    bars: list[tuple[str, float, float]]


def bench_groups(files: Sequence[BenchFile]) -> dict[str, list[BarGroup]]:
    """Per test (train, pp512, ...): one group per file, one bar per batch size (and sequence length if it varies).

    Tests get their own charts because their tokens/s differ by orders of magnitude (prefill vs decode)."""
    seq_lens = {row["seq_len"] for file in files for row in file.results if row["test"] in ("train", "fwd")}
    charts: dict[str, list[BarGroup]] = {}
    for file in files:
        for test in dict.fromkeys(row["test"] for row in file.results):
            rows = [row for row in file.results if row["test"] == test]
            bars = [
                (_case_label(row, len(seq_lens) > 1), row["tokens_per_s"], row.get("tokens_per_s_std") or 0.0)
                for row in rows
            ]
            charts.setdefault(test, []).append(BarGroup(name=file.name, bars=bars))
    if not charts:
        raise UsageError("the bench files hold no results with tokens/s")
    return charts


def _case_label(row: dict[str, Any], show_seq: bool) -> str:
    seq = f" s{row['seq_len']}" if show_seq and row["test"] in ("train", "fwd") else ""
    return f"batch {row['batch_size']}{seq}"


# ---------------------------------------------------------------- sparklines

_BLOCKS = "▁▂▃▄▅▆▇█"


def step_sparkline(
    steps: Sequence[int], values: Sequence[float], first: int, last: int, width: int, low: float, high: float
) -> str:
    """Values placed by step in `width` columns spanning steps first..last (a column's values averaged; a
    column without any is a space), so lines logged at different steps (train, validation) line up."""
    if not values or width < 1:
        return ""
    columns = min(width, last - first + 1)
    where = ((np.asarray(steps) - first) * columns // (last - first + 1)).clip(0, columns - 1)
    counts = np.bincount(where, minlength=columns)
    sums = np.bincount(where, weights=np.asarray(values, dtype=np.float64), minlength=columns)
    means = np.divide(sums, counts, out=np.full(columns, np.nan), where=counts > 0)
    return _blocks(means, low, high)


def _blocks(data: np.ndarray, low: float | None, high: float | None) -> str:
    finite = data[np.isfinite(data)]
    if len(finite) == 0:
        return " " * len(data)
    low = float(finite.min()) if low is None else low
    high = float(finite.max()) if high is None else high
    span = high - low
    top = len(_BLOCKS) - 1
    scaled = (data - low) / span * top if span > 0 and math.isfinite(span) else np.zeros_like(data)
    levels = np.nan_to_num(scaled, nan=-1).round().clip(-1, top).astype(int)
    return "".join(
        " " if np.isnan(value) else _BLOCKS[max(level, 0)] for value, level in zip(data, levels, strict=True)
    )
