"""The token cache: text tokenized once and kept as llm.c shards under `CACHE_DIR/tokens/`, named by a hash of the
text's content and the encoding options, each with a SHA-256 of its bytes beside it (`KEY.bin.sha256`).

An entry heals: its size and header are checked on every use (cheap), its checksum where reading it fails and by
`gpt2 cache verify` (hashing a FineWeb-sized entry costs tens of seconds, too much for every start); a damaged
entry is discarded with one warning and tokenized again. Entries are written under a temporary name and renamed
into place, checksum first, so processes filling the same entry at once each end with a whole, correct file.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2cli.data.shards import HEADER_BYTES, TOKEN_DTYPE, ShardWriter, parse_shard_header, read_shard, shard_header
from gpt2cli.errors import DataError, UsageError
from gpt2cli.runtime.files import atomic_write_bytes, storage_errors

TOKENS = "tokens"
ENTRY_SUFFIX = ".bin"
CHECKSUM_SUFFIX = ".sha256"

Warn = Callable[[str], None]


def _warn_with_python(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EntryReport:
    """One entry as `gpt2 cache info|verify` shows it."""

    name: str
    bytes: int
    tokens: int | None  # None when the header is unreadable
    status: str  # ok | no checksum (written before checksums were kept) | damaged: REASON

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "bytes": self.bytes, "tokens": self.tokens, "status": self.status}


class TokenCache:
    """The cache folder `root / "tokens"` (root is the setting `data.cache_dir`)."""

    def __init__(self, root: Path, warn: Warn | None = None) -> None:
        self.root = root
        self.folder = root / TOKENS
        self.warn = warn or _warn_with_python

    def entry(self, key: str) -> Path:
        return self.folder / f"{key}{ENTRY_SUFFIX}"

    # ------------------------------------------------------------ use

    def tokens(self, key: str, source: str, encode: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
        """The cached tokens for `key`; a missing or damaged entry is (re)built from `encode()` first."""
        path = self.entry(key)
        if path.exists():
            problem = entry_problem(path)
            if problem is None:
                try:
                    return read_shard(path)
                except OSError:  # unreadable although its header looked right: is the content still intact?
                    problem = checksum_problem(path)
                    if problem is None:
                        raise
            self.warn(f"token cache entry for {source} is damaged ({problem}); discarded, tokenizing again")
            discard(path)
        return self.fill(path, source, encode)

    def fill(self, path: Path, source: str, encode: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
        """Write the entry and its checksum under temporary names, then rename them into place (checksum first).
        Returns the tokens mapped from the file written, which stays valid whatever other processes do to the
        entry's name afterwards."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"token cache {self.folder} is not writable ({error.strerror})") from None
        consequence = f"nothing was cached (free some space or set data.cache_dir to another folder: {self.root})"
        with storage_errors(f"the token cache entry for {source}", consequence), ShardWriter(path) as writer:
            for tokens in encode():
                writer.write(tokens)
            shards = writer.finish()
            if not shards:  # no tokens at all: the writer opened no file
                empty = shard_header(0)
                atomic_write_bytes(checksum_path(path), f"{hashlib.sha256(empty).hexdigest()}\n".encode())
                atomic_write_bytes(path, empty)
                return np.zeros(0, dtype=TOKEN_DTYPE)
            [(temporary, _)] = shards
            tokens = read_shard(temporary)
            atomic_write_bytes(checksum_path(path), f"{file_sha256(temporary)}\n".encode())
            writer.close()
        return tokens

    # ------------------------------------------------------------ `gpt2 cache`

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{ENTRY_SUFFIX}")) if self.folder.is_dir() else []

    def report(self, verify: bool) -> list[EntryReport]:
        """Each entry with its size and token count; with `verify`, its checksum checked and a damaged entry
        discarded (the next run that needs it tokenizes again)."""
        reports = []
        for path in self.entries():
            size = path.stat().st_size
            problem = entry_problem(path)
            tokens = None if problem else (size - HEADER_BYTES) // TOKEN_DTYPE.itemsize
            if problem is None and verify:
                problem = checksum_problem(path)
            if problem is None or problem == "no checksum":
                status = problem or "ok"
            else:
                status = f"damaged: {problem}"
                if verify:
                    discard(path)
            reports.append(EntryReport(path.name, size, tokens, status))
        return reports

    def size(self) -> int:
        """Bytes the cache folder holds (entries, checksums, leftovers)."""
        if not self.folder.is_dir():
            return 0
        return sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and anything else in the folder); returns (entries, bytes) removed."""
        entries, size = len(self.entries()), self.size()
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
        return entries, size


def checksum_path(entry: Path) -> Path:
    return entry.with_name(entry.name + CHECKSUM_SUFFIX)


def entry_problem(path: Path) -> str | None:
    """The cheap check, on every use: a readable header and exactly the size it announces."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        size = path.stat().st_size
        count = parse_shard_header(header, size, path.name)
    except DataError as error:
        return str(error).removeprefix(f"{path.name}: ")
    except OSError as error:
        return f"unreadable: {error.strerror}"
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if size != expected:
        return f"{size} bytes where its header announces {expected}"
    return None


def checksum_problem(path: Path) -> str | None:
    """The thorough check: the entry's bytes against the SHA-256 recorded when it was written."""
    try:
        recorded = checksum_path(path).read_text().strip()
    except FileNotFoundError:
        return "no checksum"
    try:
        actual = file_sha256(path)
    except OSError as error:
        return f"unreadable: {error.strerror}"
    return None if actual == recorded else "checksum mismatch"


def discard(entry: Path) -> None:
    entry.unlink(missing_ok=True)
    checksum_path(entry).unlink(missing_ok=True)
