"""The jobs of `gpt2 tokenize`: text to shards, counts or id lines, and ids or shards back to text."""

from __future__ import annotations

import codecs
import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2cli.data.encoding import (
    STDIN,
    EncodedDocument,
    EncodeOptions,
    Source,
    encode_sources,
)
from gpt2cli.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC_BYTES,
    TOKEN_DTYPE,
    ShardWriter,
    check_token_ids,
    is_shard,
    parse_shard_header,
    read_shard,
)
from gpt2cli.data.tokenizer import EOT_ID, get_tokenizer
from gpt2cli.errors import DataError, UsageError
from gpt2cli.runtime.files import storage_errors

DECODE_BATCH = 1 << 20  # tokens per decode call when reading a shard
EOT_ARRAY = np.array([EOT_ID], dtype=np.uint32)
WRITE_BATCH = 1 << 20  # tokens gathered before a shard write


@dataclass
class TokenizeSummary:
    tokens: int = 0  # text tokens, without the document separators
    documents: int = 0
    bytes: int = 0
    null_rows: int = 0  # Parquet rows without text, skipped
    shards: list[Path] = field(default_factory=list)
    shard_tokens: int = 0  # tokens in the shards, separators included

    def count_nulls(self, rows: int) -> None:
        self.null_rows += rows


def _counted(documents: Iterable[EncodedDocument], summary: TokenizeSummary) -> Iterator[EncodedDocument]:
    for document in documents:
        summary.documents += document.starts_document
        summary.tokens += document.tokens.size
        yield document


def _require_tokens(summary: TokenizeSummary) -> None:
    if summary.tokens == 0:
        raise DataError("the input is empty: no tokens to write")


def tokenize_to_shards(
    sources: list[Source],
    output: Path,
    options: EncodeOptions,
    shard_size: int | None = None,
    workers: int = 0,
    on_bytes: Callable[[int], None] | None = None,
    max_tokens: int | None = None,
    val_tokens: int | None = None,
) -> TokenizeSummary:
    """Encode `sources` into llm.c shards at `output`; on any error no shard is left behind.

    `max_tokens` stops after that many tokens (separators included; the last document is cut). `val_tokens` sends
    the first tokens to `NAME_val_000000.bin` and the rest to `NAME_train_000001.bin`, ..., as llm.c's fineweb.py.
    """
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file name such as {output / 'tokens.bin'}")
    if not output.parent.is_dir():
        raise UsageError(f"{output.parent}: output folder does not exist")
    if val_tokens is not None and max_tokens is not None and val_tokens >= max_tokens:
        raise UsageError(f"--val-tokens {val_tokens} leaves nothing of --max-tokens {max_tokens} for training")
    summary = TokenizeSummary()
    writer = ShardWriter(output, shard_size) if val_tokens is None else SplitShardWriter(output, val_tokens, shard_size)
    documents = encode_sources(sources, options, workers, on_bytes, summary.count_nulls)
    with storage_errors(str(output), "nothing was written"), writer, contextlib.closing(documents) as docs:
        _write_documents(docs, writer, summary, max_tokens)
        _require_tokens(summary)
        if isinstance(writer, SplitShardWriter) and writer.train.total_tokens == 0:
            raise DataError(f"the input has {writer.total_tokens:,} tokens: none left for training after --val-tokens")
        summary.shards = writer.close()
        summary.shard_tokens = writer.total_tokens
    summary.bytes = _total_bytes(sources)
    return summary


def _write_documents(
    documents: Iterable[EncodedDocument],
    writer: ShardWriter | SplitShardWriter,
    summary: TokenizeSummary,
    max_tokens: int | None,
) -> None:
    """`<|endoftext|>` before each document, then its tokens; stops after `max_tokens` tokens (cutting a document)."""
    left = max_tokens
    pending: list[np.ndarray] = []  # written together: one write per ~1M tokens, not two per document
    size = 0
    for document in documents:
        tokens = document.tokens
        if document.starts_document:
            if left == 0:
                break
            pending.append(EOT_ARRAY)
            summary.documents += 1
            left = None if left is None else left - 1
        if left is not None:
            tokens = tokens[:left]
            left -= tokens.size
        pending.append(tokens)
        summary.tokens += tokens.size
        size += tokens.size + 1
        if size >= WRITE_BATCH:
            writer.write(np.concatenate(pending))
            pending, size = [], 0
        if left == 0:
            break
    if pending:
        writer.write(np.concatenate(pending))


class SplitShardWriter:
    """llm.c's split: the first `val_tokens` to `NAME_val_000000.bin`, the rest to `NAME_train_000001.bin`, ...

    (every `shard_size` tokens, or one file). Like `ShardWriter`, nothing appears before `close()`."""

    def __init__(self, output: Path, val_tokens: int, shard_size: int | None) -> None:
        suffix = output.suffix or ".bin"
        self.val = ShardWriter(output.with_name(f"{output.stem}_val{suffix}"), val_tokens, first_index=0)
        self.train = ShardWriter(output.with_name(f"{output.stem}_train{suffix}"), shard_size, first_index=1)
        self.val_tokens = val_tokens

    @property
    def total_tokens(self) -> int:
        return self.val.total_tokens + self.train.total_tokens

    def write(self, tokens: np.ndarray) -> None:
        room = self.val_tokens - self.val.total_tokens
        if room > 0:
            self.val.write(tokens[:room])
            tokens = tokens[room:]
        self.train.write(tokens)

    def close(self) -> list[Path]:
        return self.val.close() + self.train.close()

    def abort(self) -> None:
        self.val.abort()
        self.train.abort()

    def __enter__(self) -> SplitShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def count_tokens(
    sources: list[Source], options: EncodeOptions, workers: int = 0, on_bytes: Callable[[int], None] | None = None
) -> TokenizeSummary:
    summary = TokenizeSummary()
    for _ in _counted(encode_sources(sources, options, workers, on_bytes, summary.count_nulls), summary):
        pass
    _require_tokens(summary)
    summary.bytes = _total_bytes(sources)
    return summary


def ids_as_lines(
    sources: list[Source], options: EncodeOptions, workers: int = 0, on_bytes: Callable[[int], None] | None = None
) -> Iterator[str]:
    """Token ids as decimal text: one line per document, ids separated by spaces."""
    summary = TokenizeSummary()
    first = True
    for document in _counted(encode_sources(sources, options, workers, on_bytes), summary):
        if document.tokens.size == 0 and not document.starts_document:
            continue
        separator = ("" if first else "\n") if document.starts_document else " "
        yield separator + " ".join(map(str, document.tokens.tolist()))
        first = False
    _require_tokens(summary)
    yield "\n"


def _total_bytes(sources: list[Source]) -> int:
    return sum(size for source in sources if (size := source.size()) is not None)


# ---------------------------------------------------------------- decoding

_ID = re.compile(r"\d+")


def _decode_shard(tokens: np.ndarray, name: str) -> Iterator[str]:
    tokenizer = get_tokenizer()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two batches
    for start in range(0, tokens.size, DECODE_BATCH):
        batch = np.asarray(tokens[start : start + DECODE_BATCH])
        check_token_ids(batch, name)
        yield utf8.decode(tokenizer.decode_bytes(batch.tolist()))
    yield utf8.decode(b"", final=True)


def _decode_id_lines(lines: Iterable[str], name: str) -> Iterator[str]:
    tokenizer = get_tokenizer()
    for number, line in enumerate(lines, start=1):
        words = line.split()
        for word in words:
            if not _ID.fullmatch(word):
                raise DataError(f"{name}:{number}: {word!r} is not a token id")
        ids = np.array([int(word) for word in words], dtype=np.int64)
        check_token_ids(ids, f"{name}:{number}")
        yield ("\n" if number > 1 else "") + tokenizer.decode(ids.tolist())


def decode_sources(names: list[str]) -> Iterator[str]:
    """Text of token shards (`.bin`, recognised by their magic) or of id lines, in order."""
    for name in names:
        if name == STDIN:
            data = sys.stdin.buffer.read()
            if data[:4] == SHARD_MAGIC_BYTES:
                yield from _decode_shard(_shard_from_bytes(data, "<stdin>"), "<stdin>")
            else:
                yield from _decode_id_lines(data.decode("utf-8", errors="replace").splitlines(), "<stdin>")
            continue
        if is_shard(name):
            yield from _decode_shard(read_shard(name), name)
        else:
            with open(name, encoding="utf-8", errors="replace") as handle:
                yield from _decode_id_lines(handle, name)


def _shard_from_bytes(data: bytes, name: str) -> np.ndarray:
    count = parse_shard_header(data, len(data), name)
    return np.frombuffer(data, dtype=TOKEN_DTYPE, count=count, offset=HEADER_BYTES)
