"""Text to tokens: input sources (text, .jsonl, gzip, stdin), cut into chunks that encode independently,
encoded by a streaming pool of worker processes.

The GPT-2 encoding itself is `tokenizer.py`; the file format the tokens go to is `shards.py`.
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
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from gpt2cli.data.parquet import DocumentBatch, document_batches, is_parquet
from gpt2cli.data.tokenizer import EOT_ID, get_tokenizer
from gpt2cli.errors import DataError, UsageError

if TYPE_CHECKING:
    from gpt2cli.settings.sections import DataSettings

CHUNK_BYTES = 256 << 10  # work unit for the encoder threads; measured fastest between 128 KiB and 4 MiB

# ---------------------------------------------------------------- text sources


def parse_json_line(line: str, source: str, number: int) -> Any:
    """One line of a .jsonl file; a broken line is an error naming the file and the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{source}:{number}: invalid JSON ({error.msg})") from None


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

    @property
    def is_parquet(self) -> bool:
        return is_parquet(self.name)

    @property
    def has_documents(self) -> bool:
        """Many documents (.jsonl lines, Parquet rows) rather than one text."""
        return self.is_jsonl or self.is_parquet

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

    @classmethod
    def from_settings(cls, data: DataSettings) -> EncodeOptions:
        """The options of the `[data]` settings, the one place every command takes them from."""
        return cls(text_field=data.text_field, errors=data.errors, allow_special=data.allow_special)


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


def _encode_documents(batch: DocumentBatch, options: EncodeOptions) -> list[np.ndarray]:
    """Tokens of whole documents (Parquet rows)."""
    tokenizer = get_tokenizer()
    return [
        tokenizer.encode_to_numpy(text, allow_special=options.allow_special) for text in batch.texts(options.errors)
    ]


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
    on_nulls: Callable[[int], None] | None = None,
) -> Iterator[EncodedDocument]:
    """Tokens of every document of `sources`, in order, encoded by `workers` processes (0: one per core).

    Streaming: at most two chunks per worker are in flight, whatever the input size. Null Parquet rows are skipped
    and counted through `on_nulls`.
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
                if source.is_parquet:
                    for batch, size in document_batches(source.name, options.text_field, CHUNK_BYTES, on_nulls):
                        pending.append((pool.submit(_encode_documents, batch, options), False, size))
                        yield from drain(2 * workers)
                    continue
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
