"""Token data: llm.c's shard format, and the streaming, parallel text-to-token pipeline.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by the tokens as little-endian uint16. Documents are joined with `<|endoftext|>`
placed before each one, as llm.c's and modded-nanogpt's FineWeb shards are.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpt2cli.errors import DataError, UsageError
from gpt2cli.files import commit, temporary_sibling
from gpt2cli.settings import MAX_SHARD_TOKENS
from gpt2cli.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
CHUNK_BYTES = 256 << 10  # work unit for the encoder threads; measured fastest between 128 KiB and 4 MiB

# ---------------------------------------------------------------- shards


SHARD_MAGIC_BYTES = np.array([SHARD_MAGIC], dtype="<i4").tobytes()


def is_shard(path: str | os.PathLike[str]) -> bool:
    """A token shard by its name (`.bin`) or its first four bytes (the magic), whatever it is called."""
    with open(path, "rb") as handle:
        return handle.read(4) == SHARD_MAGIC_BYTES or Path(path).suffix == ".bin"


def parse_json_line(line: str, source: str, number: int) -> Any:
    """One line of a .jsonl file; a broken line is an error naming the file and the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{source}:{number}: invalid JSON ({error.msg})") from None


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

    def __init__(self, path: str | os.PathLike[str], shard_size: int | None = None) -> None:
        self.path = Path(path)
        self.shard_size = shard_size
        self.limit = shard_size or MAX_SHARD_TOKENS
        self.finished: list[tuple[Path, Path]] = []  # (temporary, final)
        self.total_tokens = 0
        self._handle: BinaryIO | None = None
        self._current: tuple[Path, Path] | None = None
        self._count = 0

    def _shard_path(self, index: int) -> Path:
        if self.shard_size is None:
            return self.path
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

    def close(self) -> list[Path]:
        """Make every shard visible; returns their paths in order."""
        if self._handle is not None:
            self._close_current()
        for temporary, final in self.finished:
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


# ---------------------------------------------------------------- text sources

STDIN = "-"


@dataclass(frozen=True)
class Source:
    """One input: a text file (one document) or a .jsonl file (one document per line), optionally gzipped."""

    name: str  # a path, or "-" for stdin

    @property
    def is_jsonl(self) -> bool:
        return self.name.removesuffix(".gz").endswith(".jsonl")

    @property
    def is_gzip(self) -> bool:
        return self.name.endswith(".gz")

    def size(self) -> int | None:
        """Bytes to read, where known in advance (not for stdin or compressed files)."""
        return None if self.name == STDIN or self.is_gzip else Path(self.name).stat().st_size

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.name == STDIN:
            yield sys.stdin.buffer  # not ours to close
        elif self.is_gzip:
            with gzip.open(self.name, "rb") as handle:
                yield handle  # type: ignore[misc]
        else:
            with open(self.name, "rb") as handle:
                yield handle


def check_sources(names: Iterable[str]) -> list[Source]:
    """Sources for `names`, each an existing, readable file (or "-")."""
    sources = []
    for name in names:
        if name != STDIN:
            path = Path(name)
            if path.is_dir():
                raise UsageError(f"{name}: is a directory, not a file")
            if not path.exists():
                raise UsageError(f"{name}: no such file")
            if not os.access(path, os.R_OK):
                raise UsageError(f"{name}: permission denied")
        sources.append(Source(name))
    if [s.name for s in sources].count(STDIN) > 1:
        raise UsageError("stdin ('-') can be read only once")
    return sources


def _is_text_boundary(buffer: bytes | bytearray, index: int) -> bool:
    """True where GPT-2's pre-tokenizer must start a new piece, so encoding can split here.

    Before a line break that follows a printable, non-space ASCII character no pattern of the
    split regex can span the two sides: each side encodes the same alone as in the whole text.
    """
    return index > 0 and buffer[index] in b"\r\n" and 0x21 <= buffer[index - 1] <= 0x7E


def _split_point(buffer: bytearray, jsonl: bool) -> int:
    """The last position in `buffer` where it can be cut (0 if none)."""
    end = len(buffer)
    while True:
        newline = buffer.rfind(b"\n", 0, end)
        if newline < 0:
            return 0
        if jsonl:
            return newline + 1
        cut = newline - 1 if newline > 0 and buffer[newline - 1] == 0x0D else newline
        if _is_text_boundary(buffer, cut):
            return cut
        end = newline


def read_chunks(handle: BinaryIO, jsonl: bool, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) pieces of a stream, each ending where encoding may split."""
    buffer = bytearray()
    offset = 0
    while True:
        block = handle.read(chunk_bytes)
        if block:
            buffer += block
            if len(buffer) < chunk_bytes:
                continue
            cut = _split_point(buffer, jsonl)
            if cut == 0:
                continue  # no boundary yet: keep reading (one very long line)
        else:
            cut = len(buffer)
        if cut:
            yield offset, bytes(buffer[:cut])
            offset += cut
            del buffer[:cut]
        if not block:
            return


# ---------------------------------------------------------------- encoding


@dataclass
class EncodedDocument:
    """Tokens of (part of) one document; `starts_document` marks the first part of each."""

    tokens: np.ndarray
    starts_document: bool


@dataclass(frozen=True)
class EncodeOptions:
    text_field: str = "text"
    errors: str = "strict"  # "strict" or "replace"
    allow_special: bool = False


def _decode_utf8(data: bytes, offset: int, source: Source, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{source.name}: invalid UTF-8 at byte {offset + error.start}; use --errors replace to substitute"
        ) from None


def _encode_chunk(
    data: bytes, offset: int, source: Source, options: EncodeOptions, first_line: int
) -> list[np.ndarray]:
    """Tokens of the documents in one chunk: the chunk of a text file, or whole lines of a .jsonl file."""
    tokenizer = get_tokenizer()
    text = _decode_utf8(data, offset, source, options.errors)
    if not source.is_jsonl:
        return [tokenizer.encode_to_numpy(text, allow_special=options.allow_special)]
    documents = []
    for number, line in enumerate(text.splitlines(), start=first_line):
        if not line.strip():
            continue
        record = parse_json_line(line, source.name, number)
        if not isinstance(record, dict) or not isinstance(record.get(options.text_field), str):
            raise DataError(f"{source.name}:{number}: no string field {options.text_field!r}")
        documents.append(tokenizer.encode_to_numpy(record[options.text_field], allow_special=options.allow_special))
    return documents


class _InlineExecutor(Executor):
    """Runs each task at once in the calling thread: one worker needs no pool."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future


def _encoder_pool(workers: int) -> Executor:
    """Worker processes for encoding.

    Processes, not threads: tiktoken releases the GIL, but two threads of one process encode about 30% slower
    each than two processes (measured on 2 cores), and IPC for 256 KiB chunks costs far less. On Linux the
    workers are forked after the tokenizer is built, so they start at once with it.
    """
    if workers == 1:
        return _InlineExecutor()
    method = "fork" if sys.platform == "linux" else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def encode_sources(
    sources: list[Source],
    options: EncodeOptions,
    workers: int = 0,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[EncodedDocument]:
    """Tokens of every document of `sources`, in order, encoded by `workers` processes (0: one per core).

    Streaming: at most two chunks per worker are in flight, whatever the input size.
    """
    workers = workers or available_cores()
    sizes = [source.size() for source in sources]
    if None not in sizes and sum(sizes) <= CHUNK_BYTES:  # type: ignore[arg-type]
        workers = 1  # one chunk of work: starting processes would cost more than it saves
    get_tokenizer()  # build it once here, before forking, so every worker inherits it
    with _encoder_pool(workers) as pool:
        pending: deque[tuple[Future[list[np.ndarray]], bool, int]] = deque()

        def drain(limit: int) -> Iterator[EncodedDocument]:
            while len(pending) > limit:
                future, continues_text, size = pending.popleft()
                for index, tokens in enumerate(future.result()):
                    yield EncodedDocument(tokens, starts_document=not (continues_text and index == 0))
                if on_bytes is not None:
                    on_bytes(size)

        try:
            for source in sources:
                with source.open() as handle:
                    line = 1
                    for chunk_index, (offset, data) in enumerate(read_chunks(handle, source.is_jsonl)):
                        future = pool.submit(_encode_chunk, data, offset, source, options, line)
                        line += data.count(b"\n")
                        pending.append((future, not source.is_jsonl and chunk_index > 0, len(data)))
                        yield from drain(2 * workers)
            yield from drain(0)
        finally:
            for future, _, _ in pending:
                future.cancel()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def with_document_separators(documents: Iterable[EncodedDocument]) -> Iterator[np.ndarray]:
    """The token stream of a shard: `<|endoftext|>` before each document."""
    eot = np.array([EOT_ID], dtype=np.uint32)
    for document in documents:
        if document.starts_document:
            yield eot
        if document.tokens.size:
            yield document.tokens


def check_token_ids(tokens: np.ndarray, source: str) -> None:
    """Refuse ids the GPT-2 vocabulary does not have."""
    if tokens.size:
        bad = tokens[(tokens < 0) | (tokens >= VOCAB_SIZE)]
        if bad.size:
            raise DataError(f"{source}: token id {int(bad[0])} is outside the vocabulary (0-{VOCAB_SIZE - 1})")
