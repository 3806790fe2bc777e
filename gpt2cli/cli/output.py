"""One place for presenting results: data and JSON to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
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


def print_json(document: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


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
