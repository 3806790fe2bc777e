"""The jobs of `gpt2 tokenize`: text to shards, counts or id lines, and ids or shards back to text."""

from __future__ import annotations

import codecs
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2cli.errors import DataError, UsageError
from gpt2cli.shards import (
    HEADER_BYTES,
    SHARD_MAGIC_BYTES,
    TOKEN_DTYPE,
    ShardWriter,
    check_token_ids,
    is_shard,
    parse_shard_header,
    read_shard,
)
from gpt2cli.text_encoding import (
    STDIN,
    EncodedDocument,
    EncodeOptions,
    Source,
    encode_sources,
    with_document_separators,
)
from gpt2cli.tokenizer import get_tokenizer

DECODE_BATCH = 1 << 20  # tokens per decode call when reading a shard


@dataclass
class TokenizeSummary:
    tokens: int = 0  # text tokens, without the document separators
    documents: int = 0
    bytes: int = 0
    shards: list[Path] = field(default_factory=list)


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
) -> TokenizeSummary:
    """Encode `sources` into llm.c shards at `output`; on any error no shard is left behind."""
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file name such as {output / 'tokens.bin'}")
    if not output.parent.is_dir():
        raise UsageError(f"{output.parent}: output folder does not exist")
    summary = TokenizeSummary()
    with ShardWriter(output, shard_size) as writer:
        for tokens in with_document_separators(_counted(encode_sources(sources, options, workers, on_bytes), summary)):
            writer.write(tokens)
        _require_tokens(summary)
        summary.shards = writer.close()
    summary.bytes = _total_bytes(sources)
    return summary


def count_tokens(
    sources: list[Source], options: EncodeOptions, workers: int = 0, on_bytes: Callable[[int], None] | None = None
) -> TokenizeSummary:
    summary = TokenizeSummary()
    for _ in _counted(encode_sources(sources, options, workers, on_bytes), summary):
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
