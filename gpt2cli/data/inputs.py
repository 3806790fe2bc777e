"""Training data: files, folders and globs resolved to token arrays, text tokenized once and cached by content."""

from __future__ import annotations

import glob
import hashlib
import importlib.resources
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2cli.data.encoding import EncodeOptions, Source, check_sources, encode_sources, with_document_separators
from gpt2cli.data.parquet import PARQUET_SUFFIX
from gpt2cli.data.shards import is_shard, read_shard
from gpt2cli.data.token_cache import TokenCache, Warn
from gpt2cli.errors import DataError, UsageError

BUNDLED_CORPUS = "shakespeare.txt.gz"
CACHE_FORMAT = 1  # bump when the cached token layout changes
SHARD_SUFFIX = ".bin"
VAL_SHARD_MARK = "_val_"  # llm.c's fineweb.py names its validation shard NAME_val_000000.bin


def bundled_corpus() -> Path:
    """The Shakespeare corpus shipped in the package (gzip)."""
    path = importlib.resources.files("gpt2cli.assets").joinpath(BUNDLED_CORPUS)
    return Path(str(path))


def resolve_inputs(
    patterns: list[str],
    folder_suffixes: tuple[str, ...] = (SHARD_SUFFIX, PARQUET_SUFFIX),
    skip_val_shards: bool = False,
) -> list[Path]:
    """Files for each pattern: a file, a folder, or a glob (quoted, so the shell leaves it).

    A folder gives its files of the first of `folder_suffixes` it holds (`.bin` token shards, else `.parquet`);
    training data leaves out validation shards (`*_val_*`, as llm.c names them), which go to --val-data.
    """
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            paths.extend(_folder_inputs(path, folder_suffixes, skip_val_shards))
        elif path.exists():
            check_sources([pattern])
            paths.append(path)
        elif glob.has_magic(pattern):
            matches = sorted(Path(match) for match in glob.glob(pattern) if Path(match).is_file())
            if not matches:
                raise UsageError(f"{pattern}: no files match")
            paths.extend(matches)
        else:
            raise UsageError(f"{pattern}: no such file or folder")
    return paths


def _folder_inputs(folder: Path, suffixes: tuple[str, ...], skip_val_shards: bool) -> list[Path]:
    for suffix in suffixes:
        files = sorted(path for path in folder.glob(f"*{suffix}") if path.is_file())
        if suffix == SHARD_SUFFIX and skip_val_shards:
            files = [path for path in files if VAL_SHARD_MARK not in path.name]
        if files:
            return files
    raise UsageError(
        f"{folder}: is a directory with no {' or '.join(suffixes)} files"
        + (" (validation shards, *_val_*, are not training data: give them with --val-data)" if skip_val_shards else "")
    )


def _content_key(path: Path, options: EncodeOptions, has_fields: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    recipe = {"format": CACHE_FORMAT, "errors": options.errors, "special": options.allow_special}
    if has_fields:
        recipe["text_field"] = options.text_field
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    return digest.hexdigest()


def tokens_of(
    path: Path,
    options: EncodeOptions,
    cache_dir: Path,
    workers: int = 0,
    on_bytes: Callable[[int], None] | None = None,
    warn: Warn | None = None,
) -> np.ndarray:
    """The tokens of one input: a shard is memory-mapped; text is tokenized once and cached by its content
    (a damaged cache entry is rebuilt, with a warning through `warn`)."""
    if is_shard(path):
        return read_shard(path)
    source = Source(str(path))

    def encode() -> Iterator[np.ndarray]:
        return with_document_separators(encode_sources([source], options, workers, on_bytes))

    key = _content_key(path, options, source.has_documents)
    return TokenCache(cache_dir, warn).tokens(key, str(path), encode)


@dataclass
class TokenData:
    """Training and validation tokens as lists of segments (windows never cross a segment's end)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    sources: list[str]

    @property
    def train_tokens(self) -> int:
        return sum(segment.size for segment in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(segment.size for segment in self.val)

    def fingerprint(self) -> dict[str, object]:
        """What must be unchanged for a resumed run to see the same batches."""
        return {"sources": self.sources, "train_tokens": self.train_tokens, "val_tokens": self.val_tokens}


def hold_out_tail(segments: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split off the last `fraction` of all tokens (taken from the end) as validation data."""
    total = sum(segment.size for segment in segments)
    remaining = round(total * fraction)
    train, val = list(segments), []
    while remaining > 0 and train:
        last = train.pop()
        if last.size <= remaining:
            val.insert(0, last)
            remaining -= last.size
        else:
            train.append(last[: last.size - remaining])
            val.insert(0, last[last.size - remaining :])
            remaining = 0
    return train, val


def load_token_data(
    train_patterns: list[str],
    val_patterns: list[str],
    val_fraction: float,
    options: EncodeOptions,
    cache_dir: Path,
    workers: int = 0,
    on_bytes: Callable[[int], None] | None = None,
    warn: Warn | None = None,
) -> TokenData:
    """Tokens for training and validation; without `val_patterns`, the tail of the training tokens."""
    train_paths = resolve_inputs(train_patterns, skip_val_shards=True)
    val_paths = resolve_inputs(val_patterns) if val_patterns else []
    train = [tokens_of(path, options, cache_dir, workers, on_bytes, warn) for path in train_paths]
    train = [segment for segment in train if segment.size]
    if not train:
        raise DataError("the training data is empty")
    if val_paths:
        val = [tokens_of(path, options, cache_dir, workers, on_bytes, warn) for path in val_paths]
        val = [segment for segment in val if segment.size]
    else:
        train, val = hold_out_tail(train, val_fraction)
    sources = [str(path.resolve()) for path in train_paths] + [f"val:{path.resolve()}" for path in val_paths]
    return TokenData(train=train, val=val, sources=sources)
