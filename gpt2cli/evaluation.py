"""Evaluation: perplexity and bits per byte over text, and multiple-choice accuracy (HellaSwag's format).

Language modelling follows the sliding-window recipe of the transformers docs: windows of `context` tokens start
every `stride` tokens, and each window scores only the tokens no earlier window scored, so every token after the
first is scored exactly once, with at least `context - stride` tokens of left context (except near the start).
Only the scored positions go through the 50,257-way output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from gpt2cli.data.encoding import EncodeOptions, Source, encode_sources, parse_json_line
from gpt2cli.data.examples import ExampleSet
from gpt2cli.data.shards import is_shard, read_shard
from gpt2cli.data.tokenizer import EOT_ID, Tokenizer
from gpt2cli.errors import DataError, UsageError
from gpt2cli.model.gpt2 import GPT2, IGNORE_INDEX
from gpt2cli.runtime.devices import Precision

if TYPE_CHECKING:
    from gpt2cli.settings.sections import DataSettings

LOSS_CHUNK_ROWS = 1024  # rows of logits computed at once


@dataclass(frozen=True)
class Window:
    begin: int  # first input position
    end: int  # one past the last input position; targets are tokens[begin + 1 : end + 1]
    scored: int  # how many of the last targets this window scores


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows that score every token but the first exactly once."""
    if n_tokens < 2:
        return []
    windows, scored_until, begin = [], 0, 0  # targets 1..scored_until are done
    last_target = n_tokens - 1
    while scored_until < last_target:
        end = min(begin + context, last_target)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows


def token_losses(model: GPT2, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (float32) of hidden states `(N, C)` against `targets` `(N,)`, in chunks of rows."""
    losses = []
    for start in range(0, hidden.size(0), LOSS_CHUNK_ROWS):
        logits = model.lm_head(hidden[start : start + LOSS_CHUNK_ROWS])  # a Linear, or its int8/int4 version
        losses.append(F.cross_entropy(logits.float(), targets[start : start + LOSS_CHUNK_ROWS], reduction="none"))
    return torch.cat(losses)


@dataclass
class LMResult:
    loss: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    ci95: tuple[float, float] | None
    windows: int

    def as_dict(self) -> dict[str, object]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "ci95": list(self.ci95) if self.ci95 else None,
            "windows": self.windows,
        }


@torch.inference_mode()
def evaluate_lm(
    model: GPT2,
    streams: list[np.ndarray],
    precision: Precision,
    context: int,
    stride: int,
    batch_size: int,
    text_bytes: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LMResult:
    """Mean loss, perplexity and bits per byte over token streams (each scored on its own)."""
    device = precision.device
    plans = [(stream, sliding_windows(stream.size, context, stride)) for stream in streams]
    total_windows = sum(len(windows) for _, windows in plans)
    if total_windows == 0:
        raise DataError("nothing to score: the data has fewer than two tokens")
    window_losses: list[tuple[float, int]] = []  # (summed loss, tokens) per window
    done = 0
    for stream, windows in plans:
        for batch in _batches(windows, batch_size):
            inputs = torch.stack([torch.from_numpy(stream[w.begin : w.end].astype(np.int64)) for w in batch])
            targets = torch.stack([torch.from_numpy(stream[w.begin + 1 : w.end + 1].astype(np.int64)) for w in batch])
            scored = batch[0].scored
            inputs, targets = inputs.to(device), targets[:, -scored:].to(device)
            with precision.autocast():
                hidden = model.hidden_states(inputs)[:, -scored:, :]  # only the positions this window scores
                losses = token_losses(model, hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1))
            per_window = losses.view(len(batch), scored).sum(dim=1).tolist()
            window_losses.extend((value, scored) for value in per_window)
            done += len(batch)
            if on_progress is not None:
                on_progress(done, total_windows)
    total_loss = sum(value for value, _ in window_losses)
    tokens = sum(count for _, count in window_losses)
    mean = total_loss / tokens
    return LMResult(
        loss=mean,
        perplexity=math.exp(mean),
        bits_per_byte=total_loss / math.log(2) / text_bytes if text_bytes else None,
        tokens=tokens,
        ci95=_confidence_interval([value / count for value, count in window_losses]),
        windows=len(window_losses),
    )


@torch.inference_mode()
def evaluate_examples(
    model: GPT2,
    examples: ExampleSet,
    precision: Precision,
    context: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> LMResult:
    """Masked loss and perplexity of fine-tuning examples: the mean over the targets that count (completions or
    assistant turns), each example scored as alone (packed as training packs them: `training/packing.py`).

    `windows` counts the packed rows; the interval is over the examples' own mean losses."""
    from gpt2cli.training.packing import PackedRows

    device = precision.device
    rows = PackedRows(examples, context)
    if rows.target_count(np.arange(len(rows))) == 0:
        raise DataError("nothing to score: no example has a target that counts (a completion or an assistant turn)")
    example_sums = np.zeros(len(examples))
    example_counts = np.zeros(len(examples), dtype=np.int64)
    for first in range(0, len(rows), batch_size):
        indices = np.arange(first, min(len(rows), first + batch_size))
        batch = rows.training_batch(indices, device)
        counted = batch.targets != IGNORE_INDEX  # (B, T)
        with precision.autocast():
            hidden = model.hidden_states(batch.inputs, documents=batch.documents)[counted]  # (N, C)
            losses = token_losses(model, hidden, batch.targets[counted]).cpu().numpy()
        # Which example each scored target belongs to: the rows' members in order of their example numbers.
        numbers = batch.documents[counted].cpu().numpy()
        row_of = np.nonzero(counted.cpu().numpy())[0]
        owners = np.array([rows.rows[indices[row]][number] for row, number in zip(row_of, numbers, strict=True)])
        np.add.at(example_sums, owners, losses)
        np.add.at(example_counts, owners, 1)
        if on_progress is not None:
            on_progress(int(indices[-1]) + 1, len(rows))
    tokens = int(example_counts.sum())
    mean = float(example_sums.sum()) / tokens
    scored = example_counts > 0
    return LMResult(
        loss=mean,
        perplexity=math.exp(mean),
        bits_per_byte=None,
        tokens=tokens,
        ci95=_confidence_interval((example_sums[scored] / example_counts[scored]).tolist()),
        windows=len(rows),
    )


def load_eval_examples(checkpoint: str | Path, paths: list[Path], kind: str, data: DataSettings) -> ExampleSet:
    """The records of `paths` as examples to score, not cached (an evaluation set is read once). Messages are
    rendered by `data.chat_template` (--chat-template), else the checkpoint's own template, else the default one."""
    from gpt2cli.data.examples import MESSAGES, ExampleRecipe, encode_examples
    from gpt2cli.formats.chat_template import ChatTemplate, read_chat_template

    template = None
    if kind == MESSAGES:
        option = data.chat_template
        template = ChatTemplate.from_option(option) if option else read_chat_template(checkpoint)
        template = template or ChatTemplate.default()
    recipe = ExampleRecipe(kind, data.loss_on, template)
    recipe.check()
    return ExampleSet.join([encode_examples(path, recipe, data.text_field) for path in paths])


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of the same length and scored count, at most `batch_size` at a time."""
    batch: list[Window] = []
    for window in windows:
        if batch and (
            len(batch) == batch_size
            or window.end - window.begin != batch[0].end - batch[0].begin
            or window.scored != batch[0].scored
        ):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def _confidence_interval(values: list[float]) -> tuple[float, float] | None:
    """Normal-approximation 95% interval for the mean of per-window losses (None for a single window)."""
    if len(values) < 2:
        return None
    array = np.asarray(values)
    half = 1.96 * array.std(ddof=1) / math.sqrt(array.size)
    return float(array.mean() - half), float(array.mean() + half)


# ---------------------------------------------------------------- reading evaluation text


@dataclass
class EvalText:
    streams: list[np.ndarray]
    text_bytes: int | None  # UTF-8 bytes of the text scored (None for shards)


def load_eval_tokens(paths: list[str], options: EncodeOptions, max_tokens: int | None = None) -> EvalText:
    """Token streams, one per input: text as is, .jsonl documents joined by <|endoftext|>, shards as stored."""
    from gpt2cli.data.tokenizer import get_tokenizer

    streams, any_shard = [], False
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{name}: no such file" if not path.exists() else f"{name}: not a file")
        if is_shard(path):
            streams.append(np.asarray(read_shard(path)))
            any_shard = True
            continue
        source = Source(name)
        pieces: list[np.ndarray] = []
        read = sum(stream.size for stream in streams)
        for document in encode_sources([source], options, workers=1):
            if document.starts_document and pieces and source.has_documents:
                pieces.append(np.array([EOT_ID], dtype=np.uint32))
                read += 1
            pieces.append(document.tokens)
            read += document.tokens.size
            if max_tokens is not None and read >= max_tokens:
                break  # enough: a large Parquet file need not be tokenized to its end
        streams.append(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32))
    if max_tokens is not None:
        streams = _cap(streams, max_tokens)
    if sum(stream.size for stream in streams) == 0:
        raise DataError("the evaluation data is empty")
    text_bytes = None
    if not any_shard:  # the UTF-8 bytes of exactly the text these tokens spell (separators excluded)
        tokenizer = get_tokenizer()
        text_bytes = sum(len(tokenizer.decode_bytes(stream[stream != EOT_ID].tolist())) for stream in streams)
    return EvalText(streams, text_bytes)


def _cap(streams: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    capped, left = [], max_tokens
    for stream in streams:
        if left <= 0:
            break
        capped.append(stream[:left])
        left -= capped[-1].size
    return capped


# ---------------------------------------------------------------- multiple choice


@dataclass
class Example:
    context: str
    endings: list[str]
    label: int


def read_multiple_choice(path: str, limit: int | None = None) -> list[Example]:
    """HellaSwag's published jsonl: `ctx`, `endings` (a list), `label` (the right ending's index)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such file")
    examples = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = parse_json_line(line, path, number)
            endings, label = record.get("endings"), record.get("label")
            if not isinstance(record.get("ctx"), str) or not isinstance(endings, list) or not endings:
                raise DataError(f"{path}:{number}: expected 'ctx' (text), 'endings' (a list) and 'label'")
            if not all(isinstance(ending, str) and ending for ending in endings):
                raise DataError(f"{path}:{number}: every ending must be non-empty text")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if not isinstance(label, int) or not 0 <= label < len(endings):
                raise DataError(f"{path}:{number}: label {label!r} is out of range for {len(endings)} endings")
            examples.append(Example(record["ctx"], endings, label))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float
    n: int

    def as_dict(self) -> dict[str, object]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


@torch.inference_mode()
def ending_losses(model: GPT2, tokenizer: Tokenizer, example: Example, precision: Precision) -> list[tuple[float, int]]:
    """(summed loss, token count) of each ending's tokens given the context, as build-nanogpt and llm.c score them."""
    context = tokenizer.encode(example.context)
    endings = [tokenizer.encode(" " + ending) for ending in example.endings]
    limit = model.config.block_size
    rows, masks = [], []
    for ending in endings:
        ending = ending[: limit - 1]
        sequence = (context + ending)[-limit:]
        rows.append(sequence)
        masks.append([0] * (len(sequence) - len(ending)) + [1] * len(ending))
    width = max(len(row) for row in rows)
    tokens = torch.tensor([row + [EOT_ID] * (width - len(row)) for row in rows], device=precision.device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=precision.device, dtype=torch.float32)
    with precision.autocast():
        logits, _ = model(tokens)
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(len(rows), width - 1)
    scored = mask[:, 1:]
    sums = (losses * scored).sum(dim=1)
    return [(float(total), int(count)) for total, count in zip(sums, scored.sum(dim=1), strict=True)]


def evaluate_multiple_choice(
    model: GPT2,
    tokenizer: Tokenizer,
    examples: list[Example],
    precision: Precision,
    on_progress: Callable[[int, int], None] | None = None,
) -> ChoiceResult:
    """`acc`: the ending with the lowest summed loss; `acc_norm`: the lowest mean loss per token."""
    right = right_norm = 0
    for index, example in enumerate(examples, start=1):
        scores = ending_losses(model, tokenizer, example, precision)
        right += min(range(len(scores)), key=lambda i: scores[i][0]) == example.label
        right_norm += min(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1]) == example.label
        if on_progress is not None:
            on_progress(index, len(examples))
    return ChoiceResult(acc=right / len(examples), acc_norm=right_norm / len(examples), n=len(examples))
