"""Text generation: a preallocated KV cache, the usual logit filters (`logit_filters.py`), stop conditions and
streaming.

The prompt is encoded once (prefill), then each step feeds one token per sequence. GPT-2's positions are learned
and absolute, so a cache cannot simply slide: when a sequence reaches the block size, the last half block is
encoded again as a new prompt and generation continues from there. Prompt-lookup decoding (several tokens per
step) is in `prompt_lookup.py`.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gpt2cli.data.tokenizer import EOT_ID, Tokenizer
from gpt2cli.generation.logit_filters import apply_repetition_penalty as apply_repetition_penalty
from gpt2cli.generation.logit_filters import choose_next as choose_next
from gpt2cli.generation.logit_filters import filtered_logits as filtered_logits
from gpt2cli.generation.logit_filters import min_p_filter as min_p_filter
from gpt2cli.generation.logit_filters import top_k_filter as top_k_filter
from gpt2cli.generation.logit_filters import top_p_filter as top_p_filter
from gpt2cli.generation.quantize import use_matvec_for_decode
from gpt2cli.model.gpt2 import GPT2, KVCache
from gpt2cli.runtime.compile import decode_compile_arguments


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eot: bool = False


# ---------------------------------------------------------------- generation


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length", "eot" or "stop"


@dataclass
class Timing:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    # Prompt lookup: draft tokens proposed and accepted (not those past where a row finished:
    # `prompt_lookup.count_draft`), (row, forward pass) pairs of the decode, and how many drafts kept 0, 1, 2, ...
    # of their tokens.
    drafted: int = 0
    accepted: int = 0
    row_passes: int = 0
    accepted_lengths: dict[int, int] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each sequence gained per decode forward pass (1 without prompt lookup)."""
        return self.decode_tokens / self.row_passes if self.row_passes else 0.0

    def add(self, other: Timing) -> None:
        """Accumulate another run's counts and times (several batches make one report)."""
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.row_passes += other.row_passes
        for length, count in other.accepted_lengths.items():
            self.accepted_lengths[length] = self.accepted_lengths.get(length, 0) + count


def group_by_length(prompts: list[list[int]], copies: int = 1) -> list[list[int]]:
    """Indices of the prompts, each repeated `copies` times, grouped by token length in order of first appearance.

    GPT-2's positions are absolute, so only prompts of equal length can share one batch.
    """
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).extend([index] * copies)
    return list(groups.values())


class TextTracker:
    """Incremental text of one sequence: UTF-8 across token boundaries, stop strings, held-back streaming."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1  # chars that may start a stop string
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string appeared (the text is then cut just before it)."""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        for stop in self.stops:
            found = self.text.find(stop, max(0, self.emitted - len(stop)))
            if found >= 0:
                self.text = self.text[:found]
                return True
        return False

    def finish(self) -> None:
        self.text += self.decoder.decode(b"", final=True)

    def ready(self, final: bool) -> str:
        """Text that can be shown now: everything but a tail that could still become a stop string."""
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted : limit]
        self.emitted = limit
        return piece


def accept_token(
    completion: Completion,
    tracker: TextTracker,
    token: int,
    generated: int,
    options: SamplingOptions,
    on_text: Callable[[int, str], None] | None,
    row: int,
) -> bool:
    """Record one new token of a sequence (the `generated`-th, from 0); False once the sequence is finished."""
    if token == EOT_ID and not options.ignore_eot:
        completion.finish_reason = "eot"
    elif tracker.add(token):
        completion.token_ids.append(token)
        completion.finish_reason = "stop"
    else:
        completion.token_ids.append(token)
        if generated + 1 == options.max_new_tokens:
            completion.finish_reason = "length"
    finished = completion.finish_reason is not None
    if finished:
        tracker.finish()
    if on_text is not None:
        piece = tracker.ready(final=finished)
        if piece:
            on_text(row, piece)
    return not finished


DecodeStep = Callable[[torch.Tensor, KVCache, torch.Tensor, int], torch.Tensor]


def compile_decode_step(model: GPT2, compile: bool, step: DecodeStep | None = None) -> tuple[DecodeStep, bool]:
    """The decode step `(tokens (B, 1), cache, positions (B,), length) -> logits (B, V)` (or `step`, another
    method of the model with that signature), and whether it must attend to the whole cache.

    On CUDA the compiled step is recorded as a CUDA graph, which needs one shape: it attends to the whole cache.
    Elsewhere it attends to a power-of-two bucket of it (`KVCache.attend_length`), compiled with a dynamic length so
    that the buckets share one compilation.
    """
    step = step or model.next_token_logits
    if not compile:
        return step, False
    device_type = next(model.parameters()).device.type
    if device_type != "cuda":
        use_matvec_for_decode(model)  # one-row products as streaming reductions (`quantize.compiled_matvec`)
    return torch.compile(step, **decode_compile_arguments(device_type)), device_type == "cuda"


class TextGenerator:
    """Generates from one model; reuse it for many prompts (the decode step is compiled once, the cache reused).

    `prompt_lookup` N: draft up to N tokens per step from earlier text and verify them in one pass
    (`prompt_lookup.py`)."""

    def __init__(
        self,
        model: GPT2,
        tokenizer: Tokenizer,
        compile: bool = False,
        use_cache: bool = True,
        prompt_lookup: int | None = None,
    ) -> None:
        if prompt_lookup is not None and (prompt_lookup < 1 or not use_cache):
            raise ValueError("prompt lookup needs a draft length of at least 1 and the KV cache")
        self.model = model.eval()
        self.prompt_lookup = prompt_lookup
        self.use_cache = use_cache
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = model.config.block_size
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            use_matvec_for_decode(model)
        self.step, self.full_length = compile_decode_step(model, compile)
        self.verify, _ = compile_decode_step(model, compile, model.verify_logits)  # compiled on first use only
        self._cache: KVCache | None = None
        self._warm_batch_sizes: set[int] = set() if compile else {0}  # {0}: eager, nothing to warm up
        self._warm_verify_sizes: set[int] = set()

    def prepare_prompt(self, prompt: str) -> tuple[list[int], bool]:
        """Token ids of a prompt (an empty prompt starts from <|endoftext|>); True if it was cut to fit."""
        ids = self.tokenizer.encode(prompt) or [EOT_ID]
        limit = self.block_size - 1  # leave room for at least one new token
        if len(ids) > limit:
            return ids[-limit:], True
        return ids, False

    def _forward_full(self, history: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the whole (cropped) sequence: the reference path without a cache."""
        logits, _ = self.model(history[:, -self.block_size :])
        return logits[:, -1, :]

    def cache_for(self, rows: int) -> KVCache:
        """The generator's cache, reallocated only when the batch size changes (a compiled step keeps its graph)."""
        if self._cache is None or self._cache.batch_size != rows:
            self._cache = KVCache(self.model.config, rows, self.device, self.dtype)
        return self._cache

    def attend_length(self, cache: KVCache, end: int) -> int:
        """The whole cache where CUDA graphs need one shape, else a power-of-two bucket (less to read)."""
        return cache.capacity if self.full_length else cache.attend_length(end)

    def _warm_up(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, end: int) -> None:
        """Compile (and record the CUDA graph of) the decode step before timing starts. It writes the slot the
        first real step writes next with the same values, so it changes nothing."""
        if tokens.size(0) in self._warm_batch_sizes or 0 in self._warm_batch_sizes:
            return
        for _ in range(3 if self.device.type == "cuda" else 1):  # CUDA graph trees: warm up, record, replay
            self.step(tokens, cache, positions, self.attend_length(cache, end))
        self._warm_batch_sizes.add(tokens.size(0))

    def warm_up_verify(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, length: int) -> None:
        """The same for prompt lookup: its verification pass `(B, N + 1)`, and the one-token step it takes when
        nothing was drafted (writes past the rows' positions are masked)."""
        if tokens.size(0) in self._warm_verify_sizes or 0 in self._warm_batch_sizes:
            return
        for step, step_tokens in ((self.verify, tokens), (self.step, tokens[:, :1])):
            for _ in range(3 if self.device.type == "cuda" else 1):
                step(step_tokens, cache, positions, length)
        self._warm_verify_sizes.add(tokens.size(0))

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        options: SamplingOptions,
        rng: torch.Generator | None = None,
        on_text: Callable[[int, str], None] | None = None,
        timing: Timing | None = None,
    ) -> list[Completion]:
        """Continuations of prompts of equal length, generated as one batch; `on_text(row, text)` streams."""
        if len({len(prompt) for prompt in prompts}) != 1:
            raise ValueError("prompts generated together must have the same number of tokens")
        timing = timing if timing is not None else Timing()
        if self.prompt_lookup is not None:
            from gpt2cli.generation.drafting import generate_with_lookup

            return generate_with_lookup(self, prompts, options, rng, on_text, timing)
        rows = len(prompts)
        completions = [Completion(prompt_ids=list(prompt)) for prompt in prompts]
        trackers = [TextTracker(self.tokenizer, options.stop) for _ in range(rows)]
        history = torch.tensor(prompts, dtype=torch.long, device=self.device)
        cache = self.cache_for(rows) if self.use_cache else None
        active = [True] * rows

        started = time.perf_counter()
        position = history.size(1)  # of the next token, the same in every row
        if cache is None:
            logits = self._forward_full(history)
        else:
            logits = self.model.next_token_logits(history, cache, 0, self.attend_length(cache, position))
        positions = torch.full((rows,), position, dtype=torch.long, device=self.device)  # (B,) on the device
        next_tokens = choose_next(logits, history, options, rng)
        tokens_host = next_tokens.tolist()  # the one sync that ends the prefill
        timing.prefill_tokens += history.numel()
        timing.prefill_s += time.perf_counter() - started

        if cache is not None and options.max_new_tokens > 1 and position < self.block_size:
            self._warm_up(next_tokens[:, None], cache, positions, position + 1)
        decode_started = time.perf_counter()
        for generated in range(options.max_new_tokens):
            for row, token in enumerate(tokens_host):
                if active[row]:
                    active[row] = accept_token(completions[row], trackers[row], token, generated, options, on_text, row)
            if not any(active) or generated + 1 == options.max_new_tokens:
                break
            history = torch.cat([history, next_tokens[:, None]], dim=1)
            if cache is None:
                logits = self._forward_full(history)
            elif position >= self.block_size:  # the window is full: re-encode its second half and go on
                position = self.block_size // 2
                logits = self.model.next_token_logits(
                    history[:, -position:], cache, 0, self.attend_length(cache, position)
                )
                positions.fill_(position)
            else:
                logits = self.step(next_tokens[:, None], cache, positions, self.attend_length(cache, position + 1))
                position += 1
                positions.add_(1)
            next_tokens = choose_next(logits, history, options, rng)
            tokens_host = next_tokens.tolist()
            timing.decode_tokens += sum(active)
        timing.decode_s += time.perf_counter() - decode_started
        for completion, tracker in zip(completions, trackers, strict=True):
            if completion.finish_reason is None:
                completion.finish_reason = "length"
                tracker.finish()
            completion.text = tracker.text
        return completions

    def generate_grouped(
        self,
        prompts: list[list[int]],
        options: SamplingOptions,
        num_samples: int = 1,
        rng: torch.Generator | None = None,
        on_text: Callable[[int, str], None] | None = None,
        timing: Timing | None = None,
    ) -> Iterator[tuple[int, Completion, Timing]]:
        """`num_samples` continuations of prompts of any lengths, batched by length: yields (prompt index,
        completion, its batch's timing) batch by batch; `timing` accumulates every batch."""
        for group in group_by_length(prompts, num_samples):
            group_timing = Timing()
            completions = self.generate([prompts[i] for i in group], options, rng, on_text, group_timing)
            if timing is not None:
                timing.add(group_timing)
            for index, completion in zip(group, completions, strict=True):
                yield index, completion, group_timing
