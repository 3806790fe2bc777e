"""Parquet input (FineWeb's format): one document per row, the text from one string column.

Files are read a few rows at a time (`iter_batches` over a buffered stream), so memory stays bounded whatever the
file's row-group size, and the documents go in order to the same parallel encoding pipeline as text and .jsonl.
pyarrow is the optional extra `parquet`, imported only when a Parquet file is read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.errors import DataError
from gpt2cli.runtime.extras import import_extra

PARQUET_SUFFIX = ".parquet"
ROWS_PER_READ = 1024  # rows decoded at a time: a few MB of FineWeb text
READ_BUFFER_BYTES = 1 << 20  # pages are read through a buffer this size instead of whole column chunks


def is_parquet(name: str) -> bool:
    return name.endswith(PARQUET_SUFFIX)


def _pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, from the optional extra (exit 2 with the `pip install` when missing)."""
    parquet = import_extra("pyarrow.parquet", "parquet", "reading Parquet")
    return import_extra("pyarrow", "parquet", "reading Parquet"), parquet


def _open(path: str) -> Any:
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_text_column(parquet: Any, path: str, text_field: str) -> None:
    pa, _ = _pyarrow()
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); choose --text-field")
    kind = schema.field(text_field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text (a string column)")


@dataclass(frozen=True)
class DocumentBatch:
    """Consecutive documents as one UTF-8 buffer and offsets: cheap to hand to a worker process (no str objects)."""

    source: str
    data: bytes
    offsets: np.ndarray  # document i is data[offsets[i]:offsets[i + 1]]

    def texts(self, errors: str = "strict") -> Iterator[str]:
        bounds = self.offsets.tolist()
        for begin, end in itertools.pairwise(bounds):
            try:
                yield self.data[begin:end].decode("utf-8", errors=errors)
            except UnicodeDecodeError:
                raise DataError(
                    f"{self.source}: a row holds invalid UTF-8; use --errors replace to substitute"
                ) from None


def document_batches(
    path: str, text_field: str, batch_bytes: int, on_nulls: Callable[[int], None] | None = None
) -> Iterator[tuple[DocumentBatch, int]]:
    """(documents, file bytes they stand for) in order, about `batch_bytes` of text per batch.

    Null rows are skipped and reported to `on_nulls`. The byte counts add up to the file's size (for progress).
    """
    pa, _ = _pyarrow()
    parquet = _open(path)
    _check_text_column(parquet, path, text_field)
    file_bytes, total_rows = Path(path).stat().st_size, parquet.metadata.num_rows
    rows_done = bytes_done = 0
    try:
        for record_batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=[text_field], use_threads=False):
            column = record_batch.column(0)
            rows_done += len(column)
            if column.null_count:
                if on_nulls is not None:
                    on_nulls(column.null_count)
                column = column.drop_null()
            batches = list(_split(column, path, batch_bytes, pa))
            for index, batch in enumerate(batches):
                # The file's bytes are credited as its rows are read.
                credit = file_bytes * rows_done // max(total_rows, 1) - bytes_done if index == len(batches) - 1 else 0
                bytes_done += credit
                yield batch, credit
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read Parquet data ({_first_line(error)})") from None
    if bytes_done < file_bytes:
        yield DocumentBatch(path, b"", np.zeros(1, dtype=np.int64)), file_bytes - bytes_done


def _split(column: Any, path: str, batch_bytes: int, pa: Any) -> Iterator[DocumentBatch]:
    """A string column's rows as batches of about `batch_bytes` (whole documents), straight from Arrow's buffers."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.large_string())  # string views, dictionaries
    _, offsets_buffer, data_buffer = column.buffers()
    offset_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[column.offset : column.offset + len(column) + 1]
    first = 0
    while first < len(column):
        # The first document ending at or past `batch_bytes` from here closes the batch.
        last = int(np.searchsorted(offsets, offsets[first] + batch_bytes, side="left"))
        last = min(max(last, first + 1), len(column))
        begin, end = int(offsets[first]), int(offsets[last])
        yield DocumentBatch(
            path, data_buffer[begin:end].to_pybytes(), offsets[first : last + 1].astype(np.int64) - begin
        )
        first = last


def parquet_records(path: str) -> Iterator[dict[str, Any]]:
    """Every row of a Parquet file as a dict of Python values (lists of structs become lists of dicts): fine-tuning
    records, which are few and small next to pretraining text."""
    parquet = _open(path)
    for record_batch in parquet.iter_batches(batch_size=ROWS_PER_READ, use_threads=False):
        yield from record_batch.to_pylist()
