"""Atomic file writes: a crash at any instant leaves either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from gpt2cli.errors import Gpt2Error

# What a write or an fsync reports when the storage, not the program, fails: a full disk or quota, a permission
# lost mid-run, a read-only remount, a failing device.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG})


class StorageError(Gpt2Error):
    """A file could not be written (full disk, lost permission, I/O error); whatever was half-written is gone."""


def describe_os_error(error: OSError) -> str:
    """`No space left on device (ENOSPC)`: the system's words and the code to search for."""
    name = errno.errorcode.get(error.errno or 0, "")
    reason = error.strerror or str(error)
    return f"{reason} ({name})" if name else reason


@contextlib.contextmanager
def storage_errors(what: str, consequence: str = "") -> Iterator[None]:
    """Turn a storage failure inside the block into one line: what could not be written, why, and what it means."""
    try:
        yield
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        suffix = f"; {consequence}" if consequence else ""
        raise StorageError(f"cannot write {what}: {describe_os_error(error)}{suffix}") from error


def temporary_sibling(path: Path) -> Path:
    """A temporary name in the same folder, so that the final `os.replace` never crosses filesystems."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def flush_to_disk(path: Path) -> None:
    """fsync: the data is on the disk, or the error (ENOSPC, EIO) is raised here."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def commit(temporary: Path, path: Path) -> None:
    """Flush `temporary` to disk and move it onto `path` in one step, with the permissions of a plain new file."""
    flush_to_disk(temporary)
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


def default_cache_dir() -> Path:
    """gpt2cli's cache folder (token cache, compiled code): $XDG_CACHE_HOME/gpt2cli, else ~/.cache/gpt2cli."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt2cli"
