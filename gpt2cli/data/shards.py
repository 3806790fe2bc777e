"""llm.c's token shard format: write, read (memory-mapped) and recognise shards.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by the tokens as little-endian uint16. Documents are joined with `<|endoftext|>`
placed before each one, as llm.c's and modded-nanogpt's FineWeb shards are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gpt2cli.data.shard_format import HEADER_INTS, MAX_SHARD_TOKENS, SHARD_MAGIC, SHARD_VERSION
from gpt2cli.data.tokenizer import VOCAB_SIZE
from gpt2cli.errors import DataError
from gpt2cli.runtime.files import commit, flush_to_disk, temporary_sibling

HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
SHARD_MAGIC_BYTES = np.array([SHARD_MAGIC], dtype="<i4").tobytes()


def is_shard(path: str | os.PathLike[str]) -> bool:
    """A token shard by its name (`.bin`) or its first four bytes (the magic), whatever it is called."""
    with open(path, "rb") as handle:
        return handle.read(4) == SHARD_MAGIC_BYTES or Path(path).suffix == ".bin"


def shard_header(token_count: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, token_count)
    return header.tobytes()


def parse_shard_header(header: bytes, size: int, name: str) -> int:
    """The token count from a shard's first bytes, after checking magic, version and total `size`."""
    values = np.frombuffer(header[:HEADER_BYTES], dtype="<i4")
    if values.size < HEADER_INTS or values[0] != SHARD_MAGIC:
        raise DataError(f"{name}: not a token shard (expected magic {SHARD_MAGIC} in a {HEADER_BYTES}-byte header)")
    if values[1] != SHARD_VERSION:
        raise DataError(f"{name}: unsupported shard version {values[1]} (expected {SHARD_VERSION})")
    count = int(values[2])
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size < expected:
        raise DataError(f"{name}: truncated shard ({size} of {expected} bytes for {count} tokens)")
    return count


def read_shard_header(path: str | os.PathLike[str]) -> int:
    """The token count of a shard file, after checking its magic, version and length."""
    with open(path, "rb") as handle:
        header = handle.read(HEADER_BYTES)
    return parse_shard_header(header, Path(path).stat().st_size, str(path))


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """The tokens of a shard, memory-mapped (nothing is read until used)."""
    count = read_shard_header(path)
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardWriter:
    """Writes tokens to `path`, or to `stem_000000.bin`, ... every `shard_size` tokens.

    Shards are written under temporary names and only appear, all together, on `close()`;
    `abort()` (or an exception inside `with`) removes them, so a failure leaves nothing behind.
    """

    def __init__(
        self, path: str | os.PathLike[str], shard_size: int | None = None, first_index: int | None = None
    ) -> None:
        self.path = Path(path)
        self.shard_size = shard_size
        self.first_index = first_index  # numbers the shards from here, even without `shard_size`
        self.limit = shard_size or MAX_SHARD_TOKENS
        self.finished: list[tuple[Path, Path]] = []  # (temporary, final)
        self.total_tokens = 0
        self._handle: BinaryIO | None = None
        self._current: tuple[Path, Path] | None = None
        self._count = 0

    def _shard_path(self, index: int) -> Path:
        if self.shard_size is None and self.first_index is None:
            return self.path
        index += self.first_index or 0
        return self.path.with_name(f"{self.path.stem}_{index:06d}{self.path.suffix or '.bin'}")

    def _open_next(self) -> None:
        final = self._shard_path(len(self.finished))
        temporary = temporary_sibling(final)
        self._current = (temporary, final)
        self._handle = open(temporary, "wb")  # noqa: SIM115 (closed by _close_current or abort)
        self._handle.write(shard_header(0))
        self._count = 0

    def _close_current(self) -> None:
        assert self._handle is not None and self._current is not None
        self._handle.seek(0)
        self._handle.write(shard_header(self._count))
        self._handle.close()
        self.finished.append(self._current)
        self._handle, self._current = None, None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        while tokens.size:
            if self._handle is None:
                self._open_next()
            room = self.limit - self._count
            if room == 0:
                if self.shard_size is None:
                    raise DataError(f"more than {MAX_SHARD_TOKENS} tokens do not fit in one shard; use --shard-size")
                self._close_current()
                continue
            part = tokens[:room]
            self._handle.write(part.astype(TOKEN_DTYPE, copy=False).tobytes())  # type: ignore[union-attr]
            self._count += part.size
            self.total_tokens += part.size
            tokens = tokens[room:]

    def finish(self) -> list[tuple[Path, Path]]:
        """Complete every shard, still under its temporary name: (temporary, final) pairs, for a caller that
        checks or records them before `close()` makes them visible."""
        if self._handle is not None:
            self._close_current()
        return list(self.finished)

    def close(self) -> list[Path]:
        """Make every shard visible; returns their paths in order."""
        shards = self.finish()
        for temporary, _ in shards:  # a full disk shows here at the latest: before any shard becomes visible
            flush_to_disk(temporary)
        for temporary, final in shards:
            commit(temporary, final)
        return [final for _, final in self.finished]

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        paths = [*self.finished, *([self._current] if self._current else [])]
        for temporary, _ in paths:
            temporary.unlink(missing_ok=True)
        self.finished = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def check_token_ids(tokens: np.ndarray, source: str) -> None:
    """Refuse ids the GPT-2 vocabulary does not have."""
    if tokens.size:
        bad = tokens[(tokens < 0) | (tokens >= VOCAB_SIZE)]
        if bad.size:
            raise DataError(f"{source}: token id {int(bad[0])} is outside the vocabulary (0-{VOCAB_SIZE - 1})")
