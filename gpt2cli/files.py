"""Atomic file writes: a crash at any instant leaves either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A temporary name in the same folder, so that the final `os.replace` never crosses filesystems."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def commit(temporary: Path, path: Path) -> None:
    """Flush `temporary` to disk and move it onto `path` in one step, with the permissions of a plain new file."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(temporary, _DEFAULT_MODE)  # some writers (safetensors) create private 0600 files
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


_DEFAULT_MODE = _default_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed."""
    final = Path(path)
    temporary = temporary_sibling(final)
    try:
        yield temporary
        commit(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
