"""Prompt-lookup decoding (transformers' `prompt_lookup_num_tokens`, llama.cpp's lookup decoding).

At batch 1 a decode step reads every weight to produce one token. When the text repeats what came before (quoting
the prompt, code, a list), the next tokens can be guessed for free: find the latest earlier occurrence of the last
few tokens and draft what followed it. One forward pass scores the pending token and the N drafted tokens together
(`GPT2.verify_logits`); the longest prefix of the draft the model agrees with is kept, plus the model's own token
after it, so each pass gains 1 to N + 1 tokens for about the cost of one. The per-row cache rolls back by its
position alone: entries past a row's position are masked out and overwritten later.

Greedy output is the plain decoder's: a draft token is kept only where it is the argmax. Sampling keeps the
distribution with the speculative-sampling rule for a deterministic draft: draft token x is accepted with
probability p(x); on rejection the token is drawn from p with x removed (renormalised). The draws differ from plain
sampling's, so a seed gives other (equally likely) text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from gpt2cli.generation.generator import Completion, SamplingOptions, TextTracker, Timing, accept_token
from gpt2cli.generation.logit_filters import choose_next, filtered_logits

if TYPE_CHECKING:
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.model.gpt2 import KVCache

MAX_NGRAM = 3  # the longest suffix matched; shorter ones are tried down to one token


class LookupHistory:
    """The tokens of one sequence (prompt and generated) and, for each n-gram, where it last continued."""

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM) -> None:
        self.tokens: list[int] = []
        self.max_ngram = max_ngram
        self.continuations: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams that end just before the new token now have a continuation
            for n in range(1, min(self.max_ngram, end) + 1):
                self.continuations[n - 1][tuple(self.tokens[end - n : end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest matching suffix.

        A continuation that runs into the end goes on with the draft itself (LZ77's overlapping copy): a sequence
        that repeats a period of p tokens gets full drafts, not p - 1 tokens.
        """
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            start = self.continuations[n - 1].get(tuple(self.tokens[-n:]))
            if start is not None:
                draft = self.tokens[start : start + limit]
                offset = len(self.tokens) - start  # the period of the copy
                while len(draft) < limit:
                    draft.append(draft[len(draft) - offset])
                return draft
        return []


def agreeing_prefix(choices: list[int], draft: list[int]) -> int:
    """How many draft tokens equal the model's choices at their positions before the first that does not."""
    for index, token in enumerate(draft):
        if choices[index] != token:
            return index
    return len(draft)


def choose_with_drafts(
    logits: torch.Tensor,
    histories: list[list[int]],
    drafts: list[list[int]],
    options: SamplingOptions,
    rng: torch.Generator | None,
) -> list[list[int]]:
    """The tokens each row gains from its verification logits `(B, N + 1, V)` (or `(B, 1, V)` when nothing was
    drafted): its accepted draft tokens and one of the model's own, under the options' penalty, temperature and
    filters (two host syncs for the whole batch)."""
    rows, width, _ = logits.shape
    device = logits.device
    history = torch.empty(0, dtype=torch.long, device=device)  # what the penalty sees (nothing: no penalty)
    if options.repetition_penalty != 1.0:
        # Position i scores the token after the history and draft[:i]: the penalty sees that prefix, padded to one
        # length with a token already in it (which changes nothing).
        longest = max(len(tokens) for tokens in histories) + width - 1
        prefixes = [tokens + draft[:i] for tokens, draft in zip(histories, drafts, strict=True) for i in range(width)]
        history = torch.tensor([prefix + prefix[-1:] * (longest - len(prefix)) for prefix in prefixes], device=device)
    adjusted = filtered_logits(logits.flatten(0, 1), history, options).view(rows, width, -1)  # (B, N + 1, V)
    if options.temperature == 0.0:
        choices = adjusted.argmax(dim=-1).tolist()
        kept = [agreeing_prefix(row_choices, draft) for row_choices, draft in zip(choices, drafts, strict=True)]
        return [[*draft[:k], row_choices[k]] for draft, row_choices, k in zip(drafts, choices, kept, strict=True)]

    probabilities = torch.softmax(adjusted, dim=-1)  # (B, N + 1, V)
    if width == 1:  # the one-token step: nothing drafted
        return [[token] for token in torch.multinomial(probabilities[:, 0], 1, generator=rng).squeeze(1).tolist()]
    drafted = torch.tensor([draft + [0] * (width - 1 - len(draft)) for draft in drafts], device=device)  # (B, N)
    drafted_probability = probabilities[:, :-1].gather(2, drafted[..., None]).squeeze(-1)  # (B, N)
    lengths = torch.tensor([len(draft) for draft in drafts], device=device)
    in_draft = torch.arange(width - 1, device=device) < lengths[:, None]  # (B, N)
    accepted = (torch.rand(rows, width - 1, generator=rng, device=device) < drafted_probability) & in_draft
    kept = accepted.int().cumprod(dim=1).sum(dim=1)  # (B,) draft tokens before the first rejection
    weights = probabilities[torch.arange(rows, device=device), kept]  # (B, V): p after the kept tokens
    # A rejected token is drawn from what is left of p once the rejected draft token is taken out.
    rejected = kept < lengths
    rejected_token = drafted.gather(1, kept.clamp(max=width - 2)[:, None])  # (B, 1)
    residual = weights.scatter(1, rejected_token, 0.0)
    usable = rejected[:, None] & (residual.sum(dim=1, keepdim=True) > 0)  # all of p on the draft: only rounding
    tokens = torch.multinomial(torch.where(usable, residual, weights), 1, generator=rng).squeeze(1)
    return [[*draft[:k], token] for draft, k, token in zip(drafts, kept.tolist(), tokens.tolist(), strict=True)]


class _Batch:
    """The per-row state of one batch under prompt lookup."""

    def __init__(self, prompts: list[list[int]], options: SamplingOptions, generator: TextGenerator) -> None:
        self.options = options
        self.histories = [LookupHistory(prompt) for prompt in prompts]
        self.completions = [Completion(prompt_ids=list(prompt)) for prompt in prompts]
        self.trackers = [TextTracker(generator.tokenizer, options.stop) for _ in prompts]
        self.positions = [len(prompt) for prompt in prompts]  # of each row's pending token (its last one)
        self.generated = [0] * len(prompts)
        self.active = [True] * len(prompts)

    def accept(self, row: int, tokens: list[int], on_text: Callable[[int, str], None] | None) -> int:
        """Append a row's new tokens until it finishes; how many it took."""
        taken = 0
        for token in tokens:
            if not self.active[row]:
                break
            self.active[row] = accept_token(
                self.completions[row], self.trackers[row], token, self.generated[row], self.options, on_text, row
            )
            self.histories[row].extend([token])
            self.generated[row] += 1
            taken += 1
        return taken

    def finish(self) -> list[Completion]:
        for completion, tracker in zip(self.completions, self.trackers, strict=True):
            if completion.finish_reason is None:
                completion.finish_reason = "length"
                tracker.finish()
            completion.text = tracker.text
        return self.completions


def generate_with_lookup(
    generator: TextGenerator,
    prompts: list[list[int]],
    options: SamplingOptions,
    rng: torch.Generator | None,
    on_text: Callable[[int, str], None] | None,
    timing: Timing,
) -> list[Completion]:
    """`TextGenerator.generate` with prompt lookup (`generator.prompt_lookup` draft tokens at most per row)."""
    model, device, block_size = generator.model, generator.device, generator.block_size
    rows, batch = len(prompts), _Batch(prompts, options, generator)
    cache = generator.cache_for(rows)

    started = time.perf_counter()
    history = torch.tensor(prompts, dtype=torch.long, device=device)
    logits = model.next_token_logits(history, cache, 0, generator.attend_length(cache, history.size(1)))
    first = choose_next(logits, history, options, rng).tolist()
    timing.prefill_tokens += history.numel()
    timing.prefill_s += time.perf_counter() - started
    for row in range(rows):
        batch.accept(row, [first[row]], on_text)
    if any(batch.active):
        generator.warm_up_verify(*_pass_inputs(generator, batch, [[] for _ in range(rows)]))

    decode_started = time.perf_counter()
    while any(batch.active):
        full = [row for row in range(rows) if batch.active[row] and batch.positions[row] >= block_size]
        if full:
            for row in full:
                timing.decode_tokens += batch.accept(row, [_reencode(generator, batch, row, rng)], on_text)
                timing.row_passes += 1
            continue
        _verify_step(generator, batch, rng, on_text, timing)
    timing.decode_s += time.perf_counter() - decode_started
    return batch.finish()


def _reencode(generator: TextGenerator, batch: _Batch, row: int, rng: torch.Generator | None) -> int:
    """The window of a row is full: encode its second half again as a new prompt, as plain decoding does."""
    half = generator.block_size // 2
    cache = generator.cache_for(len(batch.positions))
    tokens = batch.histories[row].tokens
    window = torch.tensor([tokens[-half:]], device=generator.device)
    logits = generator.model.next_token_logits(window, cache, 0, generator.attend_length(cache, half), first_row=row)
    batch.positions[row] = half
    return int(choose_next(logits, torch.tensor([tokens], device=generator.device), batch.options, rng))


def _pass_inputs(
    generator: TextGenerator, batch: _Batch, drafts: list[list[int]]
) -> tuple[torch.Tensor, KVCache, torch.Tensor, int]:
    """The verification pass's tokens `(B, N + 1)` (pending token, draft, padding), cache, positions `(B,)` and
    attended length."""
    width = generator.prompt_lookup or 1
    idx = [
        [history.tokens[-1], *draft] + [history.tokens[-1]] * (width - len(draft))
        for history, draft in zip(batch.histories, drafts, strict=True)
    ]
    ends = [
        position + len(draft) + 1
        for position, draft, active in zip(batch.positions, drafts, batch.active, strict=True)
        if active
    ]
    end = max(ends, default=1)  # finished rows are computed too, but nobody reads them
    cache = generator.cache_for(len(idx))
    tokens = torch.tensor(idx, device=generator.device)
    # A finished row may stand at the block size, past the position embeddings: what it computes is never read.
    positions = torch.tensor(
        [min(position, generator.block_size - 1) for position in batch.positions], device=generator.device
    )
    return tokens, cache, positions, generator.attend_length(cache, min(end, generator.block_size))


def _verify_step(
    generator: TextGenerator,
    batch: _Batch,
    rng: torch.Generator | None,
    on_text: Callable[[int, str], None] | None,
    timing: Timing,
) -> None:
    """One forward pass over every row's pending token and draft (always N + 1 tokens a row: one compiled shape)."""
    width, options = generator.prompt_lookup or 1, batch.options
    drafts = []
    for row, history in enumerate(batch.histories):
        room = min(generator.block_size - 1 - batch.positions[row], options.max_new_tokens - batch.generated[row] - 1)
        drafts.append(history.draft(min(width, room)) if batch.active[row] else [])
    tokens, cache, positions, length = _pass_inputs(generator, batch, drafts)
    if any(drafts):
        logits = generator.verify(tokens, cache, positions, length)  # (B, N + 1, V)
    else:  # nothing to verify: the plain one-token step is cheaper than a pass of N + 1
        logits = generator.step(tokens[:, :1], cache, positions, length)[:, None]  # (B, 1, V)

    gains = choose_with_drafts(logits, [history.tokens for history in batch.histories], drafts, options, rng)
    for row, (draft, gained) in enumerate(zip(drafts, gains, strict=True)):
        if not batch.active[row]:
            continue
        batch.positions[row] += len(gained)
        taken = batch.accept(row, gained, on_text)
        timing.decode_tokens += taken
        timing.row_passes += 1
        count_draft(timing, len(draft), len(gained) - 1, taken)


def count_draft(timing: Timing, drafted: int, kept: int, taken: int) -> None:
    """Add one row's draft to the acceptance statistics: `kept` of its `drafted` tokens agreed with the model, and
    the row took `taken` of the `kept + 1` tokens gained (fewer when one of them finished it).

    A row that finishes on a draft token (end of text, a stop string) never reaches the draft tokens after it: they
    were neither accepted nor rejected, so they count as neither (counting them as accepted inflated the rate). The
    draft tokens after the first rejected one are counted as drafted, as speculative decoding's rate usually is.
    """
    if not drafted:
        return
    accepted = min(kept, taken)  # the draft tokens the row took, the one that finished it included
    timing.drafted += drafted if taken > kept else taken  # taken <= kept: it finished inside the agreeing run
    timing.accepted += accepted
    timing.accepted_lengths[accepted] = timing.accepted_lengths.get(accepted, 0) + 1
