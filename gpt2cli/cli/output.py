"""One place for presenting results: data and JSON to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Rich is imported on first use: a command that prints only data never pays for it
    from rich.console import Console

PROG = "gpt2"  # the program's name: `gpt2: warning: ...`, `gpt2: error: ...`


@lru_cache(maxsize=1)
def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def info(message: str) -> None:
    """A human-readable message on stderr (never on stdout, which carries data)."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """`gpt2: warning: MESSAGE` on stderr: something the user should know about, that does not stop the command."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class OutputClosed(Exception):
    """The reader of stdout went away (`| head`): the command stops quietly with exit code 0.

    Not an OSError on purpose: click would turn a BrokenPipeError into exit code 1.
    """


def write_stdout(pieces: Iterable[str]) -> None:
    """Stream text to stdout as it is produced, so pipes and terminals see it at once."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def print_json(document: Any) -> None:
    """One JSON document on stdout."""
    write_stdout([json.dumps(document) + "\n"])


class ProgressBar:
    """A task on a transient Rich bar; every call is a no-op when stderr is not a terminal."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, amount)

    def update(self, completed: int, total: int | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, total=total)


@contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "items") -> Iterator[ProgressBar]:
    """A transient bar with ETA on stderr (bytes and MB/s for `unit="bytes"`), shown only on a terminal."""
    if not sys.stderr.isatty():
        yield ProgressBar()  # no bar, and no Rich import either: pipelines start faster
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
    columns = (TextColumn("{task.description}"), BarColumn(), *counts, TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        yield ProgressBar(progress, progress.add_task(description, total=total))
