"""One place for presenting results: data and JSON to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Rich is imported on first use: a command that prints only data never pays for it
    from rich.console import Console


@lru_cache(maxsize=1)
def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def info(message: str) -> None:
    """A human-readable message on stderr (never on stdout, which carries data)."""
    print(message, file=sys.stderr, flush=True)


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


@contextmanager
def byte_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n_bytes)`: a transient bytes / MB/s / ETA bar on stderr when it is a terminal, else a no-op."""
    if not sys.stderr.isatty():
        yield lambda _: None  # no bar, and no Rich import either: pipelines start faster
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=stderr_console(), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda done: progress.advance(task, done)
