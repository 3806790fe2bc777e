"""One place for presenting results: data and JSON to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@lru_cache(maxsize=1)
def stderr_console() -> Console:
    return Console(stderr=True)


def info(message: str) -> None:
    """A human-readable message on stderr (never on stdout, which carries data)."""
    stderr_console().print(message, highlight=False)


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
def byte_progress(description: str, total: int | None) -> Iterator[Progress]:
    """A transient bytes / MB/s / ETA bar on stderr, shown only when stderr is a terminal."""
    console = stderr_console()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        progress.add_task(description, total=total)
        yield progress
