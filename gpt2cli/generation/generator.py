"""Text generation: a preallocated KV cache, the usual logit filters (`logit_filters.py`), stop conditions and
streaming.

The prompt is encoded once (prefill), then each step feeds one token per sequence. GPT-2's positions are learned
and absolute, so a cache cannot simply slide: when a sequence reaches the block size, the last half block is
encoded again as a new prompt and generation continues from there. With a drafting strategy (`drafting.py`:
prompt lookup) each step verifies a row's drafted tokens in one pass and gains one or more tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from gpt2cli.data.tokenizer import EOT_ID, Tokenizer
from gpt2cli.generation.drafting import Draft, Drafter, DraftingStrategy, choose_with_drafts, count_draft
from gpt2cli.generation.logit_filters import choose_next
from gpt2cli.generation.quantize import inductor_streams_rows, use_matvec_for_decode
from gpt2cli.generation.records import Completion, SamplingOptions, Timing
from gpt2cli.generation.sequences import TextTracker, accept_token
from gpt2cli.model.gpt2 import GPT2, KVCache
from gpt2cli.runtime.compile import decode_compile_arguments
from gpt2cli.runtime.devices import device_rules


def group_by_length(prompts: list[list[int]], copies: int = 1) -> list[list[int]]:
    """Indices of the prompts, each repeated `copies` times, grouped by token length in order of first appearance.

    GPT-2's positions are absolute, so only prompts of equal length can share one batch.
    """
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).extend([index] * copies)
    return list(groups.values())


DecodeStep = Callable[[torch.Tensor, KVCache, torch.Tensor, int], torch.Tensor]


def compile_decode_step(model: GPT2, compile: bool, step: DecodeStep | None = None) -> tuple[DecodeStep, bool]:
    """The decode step `(tokens (B, 1), cache, positions (B,), length) -> logits (B, V)` (or `step`, another
    method of the model with that signature), and whether it must attend to the whole cache.

    Where the device rules say CUDA graphs (CUDA), the compiled step is recorded as one, which needs one shape: it
    attends to the whole cache. Elsewhere it attends to a power-of-two bucket of it (`KVCache.attend_length`),
    compiled with a dynamic length so that the buckets share one compilation.
    """
    step = step or model.next_token_logits
    if not compile:
        return step, False
    rules = device_rules(next(model.parameters()).device)
    if rules.streaming_matvec and inductor_streams_rows():
        use_matvec_for_decode(model)  # one-row products as streaming reductions (`quantize.compiled_matvec`)
    return torch.compile(step, **decode_compile_arguments(rules)), rules.cuda_graphs


class TextGenerator:
    """Generates from one model; reuse it for many prompts (the decode step is compiled once, the cache reused).

    `drafting`: a strategy that drafts tokens each row's next pass verifies (`drafting.PromptLookup(N)`)."""

    def __init__(
        self,
        model: GPT2,
        tokenizer: Tokenizer,
        compile: bool = False,
        use_cache: bool = True,
        drafting: DraftingStrategy | None = None,
    ) -> None:
        if drafting is not None and not use_cache:
            raise ValueError("drafting needs the KV cache")
        self.model = model.eval()
        self.drafting = drafting
        self.use_cache = use_cache
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = model.config.block_size
        self.rules = device_rules(self.device)
        if self.rules.streaming_matvec and self.dtype == torch.bfloat16:  # eager bf16 products: `torch.mv`
            use_matvec_for_decode(model)
        self.step, self.full_length = compile_decode_step(model, compile)
        self.verify, _ = compile_decode_step(model, compile, model.verify_logits)  # compiled on first use only
        self._cache: KVCache | None = None
        self.compiled = compile  # eager: nothing to warm up
        self._warm_shapes: set[tuple[int, int]] = set()  # (rows, attended length) the decode step has run at
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

    def attend_lengths(self, cache: KVCache, first_end: int, steps: int) -> list[int]:
        """Every length `steps` decode steps attend to when the first ends at `first_end` (they end one further
        each, and start again after half a block once the window is full, as `generate` does)."""
        ends = range(first_end, min(first_end + steps, self.block_size + 1))
        if first_end + steps > self.block_size + 1:  # re-encoded at half a block, then on from there
            ends = range(min(first_end, self.block_size // 2 + 1), self.block_size + 1)
        return sorted({self.attend_length(cache, end) for end in ends})

    def _warm_up(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, end: int, steps: int) -> None:
        """Compile (and record the CUDA graph of) the decode step, and run it once at every attended length the
        `steps` steps to come will use, before timing starts: the first call at a new length is not the steady
        state (a compilation, a recording, buffers of a new size). Each call writes only the slot the first real step
        writes again before anything reads it, so it changes nothing."""
        if not self.compiled:
            return
        rows = tokens.size(0)
        for length in self.attend_lengths(cache, end, steps):
            if (rows, length) in self._warm_shapes:
                continue
            for _ in range(self.rules.decode_warmup_calls):  # CUDA graph trees: warm up, record, replay
                self.step(tokens, cache, positions, length)
            self._warm_shapes.add((rows, length))

    def _warm_up_verify(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, length: int) -> None:
        """The same for drafting: its verification pass `(B, N + 1)`, and the one-token step it takes when
        nothing was drafted (writes past the rows' positions are masked)."""
        if tokens.size(0) in self._warm_verify_sizes or not self.compiled:
            return
        for step, step_tokens in ((self.verify, tokens), (self.step, tokens[:, :1])):
            for _ in range(self.rules.decode_warmup_calls):
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
        if self.drafting is not None:
            return self._generate_drafted(self.drafting, prompts, options, rng, on_text, timing)
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
            warm_up_started = time.perf_counter()
            self._warm_up(next_tokens[:, None], cache, positions, position + 1, options.max_new_tokens - 1)
            timing.warmup_s += time.perf_counter() - warm_up_started
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

    # ------------------------------------------------------------ drafting

    def _generate_drafted(
        self,
        drafting: DraftingStrategy,
        prompts: list[list[int]],
        options: SamplingOptions,
        rng: torch.Generator | None,
        on_text: Callable[[int, str], None] | None,
        timing: Timing,
    ) -> list[Completion]:
        """`generate` with a drafting strategy: each pass verifies every row's draft (at most `drafting.width`
        tokens) and gains each row one or more tokens."""
        rows, batch = len(prompts), _DraftedBatch(prompts, options, self.tokenizer, drafting.begin(prompts))
        cache = self.cache_for(rows)

        started = time.perf_counter()
        history = torch.tensor(prompts, dtype=torch.long, device=self.device)
        logits = self.model.next_token_logits(history, cache, 0, self.attend_length(cache, history.size(1)))
        first = choose_next(logits, history, options, rng).tolist()
        timing.prefill_tokens += history.numel()
        timing.prefill_s += time.perf_counter() - started
        for row in range(rows):
            batch.accept(row, [first[row]], on_text)
        if any(batch.active):
            warm_up_started = time.perf_counter()
            self._warm_up_verify(*self._pass_inputs(batch, [Draft([]) for _ in range(rows)], drafting.width))
            timing.warmup_s += time.perf_counter() - warm_up_started

        decode_started = time.perf_counter()
        while any(batch.active):
            full = [row for row in range(rows) if batch.active[row] and batch.positions[row] >= self.block_size]
            if full:
                for row in full:
                    timing.decode_tokens += batch.accept(row, [self._reencode(batch, row, rng)], on_text)
                    timing.row_passes += 1
                continue
            self._verify_step(batch, drafting.width, rng, on_text, timing)
        timing.decode_s += time.perf_counter() - decode_started
        return batch.finish()

    def _reencode(self, batch: _DraftedBatch, row: int, rng: torch.Generator | None) -> int:
        """The window of a row is full: encode its second half again as a new prompt, as plain decoding does."""
        half = self.block_size // 2
        cache = self.cache_for(len(batch.positions))
        tokens = batch.tokens[row]
        window = torch.tensor([tokens[-half:]], device=self.device)
        logits = self.model.next_token_logits(window, cache, 0, self.attend_length(cache, half), first_row=row)
        batch.positions[row] = half
        batch.drafter.restart(row, tokens[-half:])
        return int(choose_next(logits, torch.tensor([tokens], device=self.device), batch.options, rng))

    def _pass_inputs(
        self, batch: _DraftedBatch, drafts: list[Draft], width: int
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor, int]:
        """The verification pass's tokens `(B, N + 1)` (pending token, draft, padding), cache, positions `(B,)` and
        attended length."""
        idx = [
            [tokens[-1], *draft.tokens] + [tokens[-1]] * (width - len(draft.tokens))
            for tokens, draft in zip(batch.tokens, drafts, strict=True)
        ]
        ends = [
            position + len(draft.tokens) + 1
            for position, draft, active in zip(batch.positions, drafts, batch.active, strict=True)
            if active
        ]
        end = max(ends, default=1)  # finished rows are computed too, but nobody reads them
        cache = self.cache_for(len(idx))
        tokens = torch.tensor(idx, device=self.device)
        # A finished row may stand at the block size, past the position embeddings: what it computes is never read.
        positions = torch.tensor(
            [min(position, self.block_size - 1) for position in batch.positions], device=self.device
        )
        return tokens, cache, positions, self.attend_length(cache, min(end, self.block_size))

    def _verify_step(
        self,
        batch: _DraftedBatch,
        width: int,
        rng: torch.Generator | None,
        on_text: Callable[[int, str], None] | None,
        timing: Timing,
    ) -> None:
        """One forward pass over every row's pending token and draft (always N + 1 tokens a row: one shape)."""
        options = batch.options
        limits = [
            min(width, self.block_size - 1 - position, options.max_new_tokens - generated - 1) if active else 0
            for position, generated, active in zip(batch.positions, batch.generated, batch.active, strict=True)
        ]
        drafts = batch.drafter.propose(limits)
        tokens, cache, positions, length = self._pass_inputs(batch, drafts, width)
        if any(draft.tokens for draft in drafts):
            logits = self.verify(tokens, cache, positions, length)  # (B, N + 1, V)
        else:  # nothing to verify: the plain one-token step is cheaper than a pass of N + 1
            logits = self.step(tokens[:, :1], cache, positions, length)[:, None]  # (B, 1, V)

        gains = choose_with_drafts(logits, batch.tokens, drafts, options, rng)
        for row, (draft, gained) in enumerate(zip(drafts, gains, strict=True)):
            if not batch.active[row]:
                continue
            batch.positions[row] += len(gained)
            taken = batch.accept(row, gained, on_text)
            timing.decode_tokens += taken
            timing.row_passes += 1
            count_draft(timing, len(draft.tokens), len(gained) - 1, taken)

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


class _DraftedBatch:
    """The per-row state of one batch generated with drafts."""

    def __init__(
        self, prompts: list[list[int]], options: SamplingOptions, tokenizer: Tokenizer, drafter: Drafter
    ) -> None:
        self.options = options
        self.drafter = drafter
        self.tokens = [list(prompt) for prompt in prompts]  # each row's whole text: prompt and generated
        self.completions = [Completion(prompt_ids=list(prompt)) for prompt in prompts]
        self.trackers = [TextTracker(tokenizer, options.stop) for _ in prompts]
        self.positions = [len(prompt) for prompt in prompts]  # of each row's pending token (its last one)
        self.generated = [0] * len(prompts)
        self.active = [True] * len(prompts)

    def accept(self, row: int, tokens: list[int], on_text: Callable[[int, str], None] | None) -> int:
        """Append a row's new tokens until it finishes; how many it took."""
        taken = 0
        for token in tokens:
            if not self.active[row]:
                break
            completion, tracker = self.completions[row], self.trackers[row]
            self.active[row] = accept_token(completion, tracker, token, self.generated[row], self.options, on_text, row)
            self.generated[row] += 1
            taken += 1
        self.tokens[row].extend(tokens[:taken])
        self.drafter.accept(row, tokens[:taken])
        return taken

    def finish(self) -> list[Completion]:
        for completion, tracker in zip(self.completions, self.trackers, strict=True):
            if completion.finish_reason is None:
                completion.finish_reason = "length"
                tracker.finish()
            completion.text = tracker.text
        return self.completions
