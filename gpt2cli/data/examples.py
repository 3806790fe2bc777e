"""Fine-tuning examples: TRL's prompt-completion and conversational records as tokens with a loss mask.

A record is one example. `{"prompt", "completion"}` becomes the tokens of the prompt, then of the completion, then
`<|endoftext|>` (trained, so that generation stops there). The prompt is encoded alone, exactly as `gpt2 sample`
encodes a prompt, and the completion alone after it: the model learns to continue the very tokens it will be given.
TRL encodes prompt + completion in one piece and masks by the prompt's token count; the two agree whenever the
prompt does not end in whitespace (GPT-2's pre-tokenizer then always splits at the boundary), so write completions
the way GPT-2 writes words, with the space at their start (`"A:"` + `" Paris"`, not `"A: "` + `"Paris"`).

`{"messages": [{"role", "content"}, ...]}` is rendered by the run's chat template (`formats/chat_template.py`); the
mask is the template's `{% generation %}` spans (the assistant turns and their end marker).

Each example's tokens come with flags, one per token: `LOSS` where the token is a target that counts, `START` on an
example's first token. They are cached beside the tokens, so a second run reads both without encoding.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt2cli.data.encoding import parse_json_line
from gpt2cli.data.parquet import is_parquet, parquet_records
from gpt2cli.data.token_cache import TokenCache, Warn
from gpt2cli.data.tokenizer import EOT_ID, get_tokenizer
from gpt2cli.errors import DataError, UsageError

if TYPE_CHECKING:
    from gpt2cli.formats.chat_template import ChatTemplate

EXAMPLES_CACHE_FORMAT = 1  # bump when the cached tokens or flags of examples change
LOSS, START = 1, 2  # the bits of a token's flags
TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt-completion", "messages"
EXAMPLE_FORMATS = (PROMPT_COMPLETION, MESSAGES)  # the formats read as examples with a loss mask


class ExampleError(UsageError):
    """A fine-tuning record that cannot be used: one line naming the file, the line and the field."""


def has_records(path: Path | str) -> bool:
    """Whether `path` holds records (a .jsonl, .jsonl.gz or .parquet file) whose format can be detected."""
    name = str(path)
    return name.removesuffix(".gz").endswith(".jsonl") or is_parquet(name)


def read_records(path: Path | str) -> Iterator[tuple[str, Any]]:
    """`(where, record)` for each record of a .jsonl (optionally gzipped) or .parquet file; `where` is
    `FILE:LINE` (Parquet: the row number, from 1). Blank lines are skipped."""
    name = str(path)
    if is_parquet(name):
        for number, record in enumerate(parquet_records(name), start=1):
            yield f"{name}:{number}", record
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(name, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        record = parse_json_line(line, name, number)
                    except DataError as error:  # bad input, said before training starts: exit 2
                        raise ExampleError(str(error)) from None
                    yield f"{name}:{number}", record
    except UnicodeDecodeError as error:
        raise ExampleError(f"{name}: invalid UTF-8 ({error.reason})") from None


def record_format(record: Any, where: str, text_field: str = "text") -> str:
    """The format a record's fields say: text, prompt-completion or messages."""
    if not isinstance(record, dict):
        raise ExampleError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    found = []
    if "messages" in record:
        found.append(MESSAGES)
    if "prompt" in record or "completion" in record:
        found.append(PROMPT_COMPLETION)
    if text_field in record:
        found.append(TEXT)
    if not found:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise ExampleError(
            f"{where}: no known fields (expected {text_field!r}, 'prompt' and 'completion', or 'messages'; "
            f"found {fields})"
        )
    if len(found) > 1:
        raise ExampleError(f"{where}: mixed formats in one record ({' and '.join(found)}): give one")
    return found[0]


def detect_format(path: Path | str, text_field: str = "text") -> str:
    """The format of a records file, from its first record (text for a file without records or without any)."""
    if not has_records(path):
        return TEXT
    for where, record in read_records(path):
        return record_format(record, where, text_field)
    return TEXT


@dataclass(frozen=True)
class ExampleRecipe:
    """How records become tokens and flags: everything the cache key must hold besides the file's bytes."""

    format: str  # prompt-completion or messages
    loss_on: str  # completion (the completion / the assistant turns) or all
    template: ChatTemplate | None = None  # messages only

    def key_fields(self) -> dict[str, Any]:
        return {
            "examples": EXAMPLES_CACHE_FORMAT,
            "format": self.format,
            "loss_on": self.loss_on,
            "template": self.template.digest if self.template is not None and self.format == MESSAGES else None,
        }

    def check(self) -> None:
        """Refuse, before any record is read, what cannot work: an assistant-only loss without generation markers."""
        if self.format == MESSAGES and self.template is None:
            raise UsageError("messages records need a chat template")
        if self.format == MESSAGES and self.loss_on == "completion" and not self.template.has_generation_markers:  # type: ignore[union-attr]
            raise ExampleError(
                "the chat template has no {% generation %} markers around the assistant turns, which the loss on "
                "assistant turns needs: add them, or train with --loss-on all"
            )


def encode_record(
    record: Any, where: str, recipe: ExampleRecipe, text_field: str = "text"
) -> tuple[list[int], list[int]]:
    """The tokens of one record and, for each, whether it is a target that counts (1) or not (0)."""
    found = record_format(record, where, text_field)
    if found != recipe.format:
        raise ExampleError(f"{where}: a {found} record in a {recipe.format} file: one format per file")
    if recipe.format == PROMPT_COMPLETION:
        return _encode_prompt_completion(record, where, recipe.loss_on)
    return _encode_messages(record, where, recipe)


def _encode_prompt_completion(record: dict[str, Any], where: str, loss_on: str) -> tuple[list[int], list[int]]:
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if isinstance(value, list):
            raise ExampleError(
                f"{where}: field {name!r}: conversational prompt/completion (lists of messages) is not supported; "
                "put the turns in one 'messages' list"
            )
        if not isinstance(value, str):
            kind = "missing" if value is None else f"a {type(value).__name__}, not text"
            raise ExampleError(f"{where}: field {name!r} is {kind}")
    if not completion:
        raise ExampleError(f"{where}: field 'completion' is empty")
    tokenizer = get_tokenizer()
    prompt_ids = tokenizer.encode(prompt)  # as `gpt2 sample` encodes a prompt
    completion_ids = [*tokenizer.encode(completion), EOT_ID]
    prompt_loss = 1 if loss_on == "all" else 0
    return prompt_ids + completion_ids, [prompt_loss] * len(prompt_ids) + [1] * len(completion_ids)


def _encode_messages(record: dict[str, Any], where: str, recipe: ExampleRecipe) -> tuple[list[int], list[int]]:
    from gpt2cli.formats.chat_template import validate_messages

    messages = validate_messages(record["messages"], where)
    rendered = recipe.template.encode(messages)  # type: ignore[union-attr]
    loss = [1] * len(rendered.ids) if recipe.loss_on == "all" else list(rendered.assistant_mask)
    return list(rendered.ids), loss


# ---------------------------------------------------------------- sets of examples


@dataclass(frozen=True)
class ExampleSet:
    """Examples as one token array and one flags array (`LOSS`, `START` bits), laid end to end."""

    tokens: np.ndarray  # (N,) token ids
    flags: np.ndarray  # (N,) LOSS | START bits per token
    offsets: np.ndarray = field(init=False, repr=False, compare=False)  # (examples + 1,) where each one starts

    def __post_init__(self) -> None:
        starts = np.flatnonzero(self.flags & START)
        object.__setattr__(self, "offsets", np.append(starts, self.tokens.size).astype(np.int64))

    @classmethod
    def empty(cls) -> ExampleSet:
        return cls(np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint16))

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of one example and its loss mask (1 where the token is a target that counts)."""
        begin, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[begin:end], (self.flags[begin:end] & LOSS).astype(np.uint8)

    def split_tail(self, fraction: float) -> tuple[ExampleSet, ExampleSet]:
        """The set without its last `fraction` of examples, and those (whole examples: the held-out split)."""
        count = len(self)
        held = min(count - 1, max(1, round(count * fraction))) if fraction > 0 and count > 1 else 0
        if held == 0:
            return self, ExampleSet.empty()
        cut = int(self.offsets[count - held])
        return (
            ExampleSet(self.tokens[:cut], self.flags[:cut]),
            ExampleSet(self.tokens[cut:], self.flags[cut:]),
        )

    @staticmethod
    def join(sets: list[ExampleSet]) -> ExampleSet:
        if not sets:
            return ExampleSet.empty()
        return ExampleSet(np.concatenate([s.tokens for s in sets]), np.concatenate([s.flags for s in sets]))


def encode_examples(path: Path | str, recipe: ExampleRecipe, text_field: str = "text") -> ExampleSet:
    """Every record of a file as tokens and flags (no cache)."""
    tokens: list[int] = []
    flags: list[int] = []
    for where, record in read_records(path):
        ids, loss = encode_record(record, where, recipe, text_field)
        if not ids:
            continue
        tokens.extend(ids)
        flags.extend(loss)
        flags[len(flags) - len(ids)] |= START
    return ExampleSet(np.asarray(tokens, dtype=np.uint16), np.asarray(flags, dtype=np.uint16))


def _examples_key(path: Path, recipe: ExampleRecipe, text_field: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    digest.update(json.dumps({**recipe.key_fields(), "text_field": text_field}, sort_keys=True).encode())
    return digest.hexdigest()


def load_examples(
    path: Path, recipe: ExampleRecipe, cache_dir: Path, text_field: str = "text", warn: Warn | None = None
) -> ExampleSet:
    """The examples of one file, encoded once and cached: the tokens and their flags as two cache entries whose key
    holds the file's content, the format, the template's digest and the loss setting."""
    key = _examples_key(path, recipe, text_field)
    encoded: list[ExampleSet] = []

    def encoding() -> ExampleSet:
        if not encoded:
            encoded.append(encode_examples(path, recipe, text_field))
        return encoded[0]

    cache = TokenCache(cache_dir, warn)
    tokens = cache.tokens(key, str(path), lambda: [encoding().tokens])
    flags = cache.tokens(f"{key}-flags", str(path), lambda: [encoding().flags])
    if tokens.size != flags.size:  # one entry rebuilt while the other was kept: trust neither
        return encoding()
    return ExampleSet(np.asarray(tokens), np.asarray(flags))


@dataclass
class ExampleData:
    """Training and validation examples, the counterpart of `inputs.TokenData` for prompt-completion and messages
    records (the trainer packs them into windows: `training/packing.py`)."""

    train: ExampleSet
    val: ExampleSet
    sources: list[str]
    recipe: ExampleRecipe

    @property
    def train_tokens(self) -> int:
        return int(self.train.tokens.size)

    @property
    def val_tokens(self) -> int:
        return int(self.val.tokens.size)

    def fingerprint(self) -> dict[str, object]:
        """What must be unchanged for a resumed run to see the same batches."""
        return {
            "sources": self.sources,
            "train_tokens": self.train_tokens,
            "val_tokens": self.val_tokens,
            "examples": [len(self.train), len(self.val)],
            **{name: value for name, value in self.recipe.key_fields().items() if name != "examples"},
        }


def load_example_data(
    train_paths: list[Path],
    val_paths: list[Path],
    val_fraction: float,
    recipe: ExampleRecipe,
    cache_dir: Path,
    text_field: str = "text",
    warn: Warn | None = None,
) -> ExampleData:
    """Examples for training and validation; without `val_paths`, the last `val_fraction` of the training examples
    (whole examples) are held out."""
    recipe.check()

    def load(paths: list[Path]) -> ExampleSet:
        return ExampleSet.join([load_examples(path, recipe, cache_dir, text_field, warn) for path in paths])

    train = load(train_paths)
    if len(train) == 0:
        raise ExampleError("the training data has no examples")
    if val_paths:
        val = load(val_paths)
    else:
        train, val = train.split_tail(val_fraction)
    sources = [str(path.resolve()) for path in train_paths] + [f"val:{path.resolve()}" for path in val_paths]
    return ExampleData(train=train, val=val, sources=sources, recipe=recipe)


def data_format(paths: list[Path], setting: str, text_field: str = "text") -> str:
    """The format of a run's inputs: the setting, or (auto) the one their records say; every file must agree."""
    if setting != "auto":
        return setting
    formats = {path: detect_format(path, text_field) for path in paths}
    distinct = sorted(set(formats.values()))
    if len(distinct) > 1:
        shown = ", ".join(f"{path.name}: {kind}" for path, kind in formats.items())
        raise ExampleError(f"the inputs mix formats ({shown}): give files of one format")
    return distinct[0] if distinct else TEXT
