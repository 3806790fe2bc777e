"""Drafting: cheap guesses of the next tokens, verified by the model in one pass (speculative decoding).

At batch 1 a decode step reads every weight to produce one token. A drafter proposes up to N tokens after each
row's text; one forward pass scores the row's pending token and the N drafted tokens together
(`GPT2.verify_logits`); the longest prefix of the draft the model agrees with is kept, plus the model's own token
after it, so each pass gains 1 to N + 1 tokens for about the cost of one. The generator's cache rolls back by
position alone: entries past a row's position are masked out and overwritten later.

`TextGenerator` runs the verification loop; a `DraftingStrategy` only proposes. Prompt lookup (transformers'
`prompt_lookup_num_tokens`, llama.cpp's lookup decoding) is the strategy here: it drafts what followed the latest
earlier occurrence of the last few tokens. A draft *model* fits the same contract: its drafter keeps its own KV
cache (`accept` moves it on, `restart` re-encodes a cut window) and returns the probabilities `q` of its proposal,
which `choose_with_drafts` uses in the general speculative-sampling rule.

Greedy output is the plain decoder's: a draft token is kept only where it is the argmax. Sampling keeps the
model's distribution p: draft token x is accepted with probability min(1, p(x) / q(x)); on rejection the token is
drawn from max(0, p - q), renormalised. For a deterministic draft q is one-hot on x: accept with p(x), and on
rejection draw from p with x removed. The draws differ from plain sampling's, so a seed gives other (equally
likely) text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from gpt2cli.generation.logit_filters import filtered_logits
from gpt2cli.generation.records import SamplingOptions, Timing

MAX_NGRAM = 3  # prompt lookup's longest suffix matched; shorter ones are tried down to one token


@dataclass
class Draft:
    """Up to N proposed tokens of one row, and the drafter's probabilities for them: `(len(tokens), V)`, or None
    for a deterministic draft (q one-hot on each token)."""

    tokens: list[int]
    probabilities: torch.Tensor | None = None


class Drafter(Protocol):
    """One batch's drafter: proposes for each row and follows what each row accepted."""

    def propose(self, limits: list[int]) -> list[Draft]:
        """A draft for each row of at most `limits[row]` tokens (0: that row wants none)."""
        ...

    def accept(self, row: int, tokens: list[int]) -> None:
        """The row's text grew by `tokens` (accepted draft tokens and the model's own)."""
        ...

    def restart(self, row: int, window: list[int]) -> None:
        """The row's window was full: the generator encoded `window` again from position 0."""
        ...


class DraftingStrategy(Protocol):
    """How a generator drafts: the most tokens a row drafts per pass (the verification pass takes `width + 1`
    tokens a row, one shape), and a fresh drafter for each batch of prompts."""

    width: int

    def begin(self, prompts: list[list[int]]) -> Drafter: ...


# ---------------------------------------------------------------- prompt lookup


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


class _LookupDrafter:
    def __init__(self, prompts: list[list[int]]) -> None:
        self.histories = [LookupHistory(prompt) for prompt in prompts]

    def propose(self, limits: list[int]) -> list[Draft]:
        return [Draft(history.draft(limit)) for history, limit in zip(self.histories, limits, strict=True)]

    def accept(self, row: int, tokens: list[int]) -> None:
        self.histories[row].extend(tokens)

    def restart(self, row: int, window: list[int]) -> None:
        """Nothing to do: lookup searches the whole text, not the window."""


@dataclass(frozen=True)
class PromptLookup:
    """Prompt-lookup drafting (`gpt2 sample --prompt-lookup N`): up to `width` tokens a row per pass."""

    width: int

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError("prompt lookup needs a draft length of at least 1")

    def begin(self, prompts: list[list[int]]) -> Drafter:
        return _LookupDrafter(prompts)


# ---------------------------------------------------------------- verification


def agreeing_prefix(choices: list[int], draft: list[int]) -> int:
    """How many draft tokens equal the model's choices at their positions before the first that does not."""
    for index, token in enumerate(draft):
        if choices[index] != token:
            return index
    return len(draft)


def choose_with_drafts(
    logits: torch.Tensor,
    histories: list[list[int]],
    drafts: list[Draft],
    options: SamplingOptions,
    rng: torch.Generator | None,
) -> list[list[int]]:
    """The tokens each row gains from its verification logits `(B, N + 1, V)` (or `(B, 1, V)` when nothing was
    drafted): its accepted draft tokens and one of the model's own, under the options' penalty, temperature and
    filters (two host syncs for the whole batch)."""
    rows, width, vocab = logits.shape
    device = logits.device
    tokens_of = [draft.tokens for draft in drafts]
    history = torch.empty(0, dtype=torch.long, device=device)  # what the penalty sees (nothing: no penalty)
    if options.repetition_penalty != 1.0:
        # Position i scores the token after the history and draft[:i]: the penalty sees that prefix, padded to one
        # length with a token already in it (which changes nothing).
        longest = max(len(tokens) for tokens in histories) + width - 1
        prefixes = [
            tokens + draft[:i] for tokens, draft in zip(histories, tokens_of, strict=True) for i in range(width)
        ]
        history = torch.tensor([prefix + prefix[-1:] * (longest - len(prefix)) for prefix in prefixes], device=device)
    adjusted = filtered_logits(logits.flatten(0, 1), history, options).view(rows, width, -1)  # (B, N + 1, V)
    if options.temperature == 0.0:
        choices = adjusted.argmax(dim=-1).tolist()
        kept = [agreeing_prefix(row_choices, draft) for row_choices, draft in zip(choices, tokens_of, strict=True)]
        return [[*draft[:k], row_choices[k]] for draft, row_choices, k in zip(tokens_of, choices, kept, strict=True)]

    probabilities = torch.softmax(adjusted, dim=-1)  # (B, N + 1, V)
    if width == 1:  # the one-token step: nothing drafted
        return [[token] for token in torch.multinomial(probabilities[:, 0], 1, generator=rng).squeeze(1).tolist()]
    drafted = torch.tensor([draft + [0] * (width - 1 - len(draft)) for draft in tokens_of], device=device)  # (B, N)
    drafted_p = probabilities[:, :-1].gather(2, drafted[..., None]).squeeze(-1)  # (B, N)
    draft_q = _draft_probabilities(drafts, width - 1, vocab, device)  # (B, N, V), or None: every draft one-hot
    threshold = drafted_p if draft_q is None else drafted_p / draft_q.gather(2, drafted[..., None]).squeeze(-1)
    lengths = torch.tensor([len(draft) for draft in tokens_of], device=device)
    in_draft = torch.arange(width - 1, device=device) < lengths[:, None]  # (B, N)
    accepted = (torch.rand(rows, width - 1, generator=rng, device=device) < threshold) & in_draft
    kept = accepted.int().cumprod(dim=1).sum(dim=1)  # (B,) draft tokens before the first rejection
    weights = probabilities[torch.arange(rows, device=device), kept]  # (B, V): p after the kept tokens
    # A rejected token is drawn from what is left of p once the draft's share is taken out.
    rejected = kept < lengths
    at_rejection = kept.clamp(max=width - 2)
    if draft_q is None:
        residual = weights.scatter(1, drafted.gather(1, at_rejection[:, None]), 0.0)
    else:
        residual = (weights - draft_q[torch.arange(rows, device=device), at_rejection]).clamp(min=0.0)
    usable = rejected[:, None] & (residual.sum(dim=1, keepdim=True) > 0)  # all of p on the draft: only rounding
    tokens = torch.multinomial(torch.where(usable, residual, weights), 1, generator=rng).squeeze(1)
    return [[*draft[:k], token] for draft, k, token in zip(tokens_of, kept.tolist(), tokens.tolist(), strict=True)]


def _draft_probabilities(drafts: list[Draft], width: int, vocab: int, device: torch.device) -> torch.Tensor | None:
    """The drafters' q as `(B, N, V)` (one-hot rows for deterministic drafts and padding), or None when every draft
    is deterministic (the cheaper rule needs no q)."""
    if all(draft.probabilities is None for draft in drafts):
        return None
    q = torch.zeros(len(drafts), width, vocab, device=device)
    for row, draft in enumerate(drafts):
        if draft.probabilities is not None:
            q[row, : len(draft.tokens)] = draft.probabilities.to(device=device, dtype=q.dtype)
        elif draft.tokens:
            q[row, torch.arange(len(draft.tokens)), torch.tensor(draft.tokens)] = 1.0
    q[:, :, 0] += (q.sum(dim=-1) == 0).float()  # padding past a draft: any q > 0 (never read, keeps p/q finite)
    return q


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
