"""The usual logit filters of sampling, each on float32 `(B, V)` logits (repetition penalty, top-k, top-p, min-p),
and the choice of the next token through them."""

from __future__ import annotations

import torch

from gpt2cli.generation.records import SamplingOptions


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens already present are divided by `penalty` (multiplied when negative)."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    logits = logits.clone()
    logits.scatter_(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits of each row."""
    if k >= logits.size(-1):
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least `p` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probabilities = torch.softmax(sorted_logits, dim=-1)
    before = probabilities.cumsum(dim=-1) - probabilities  # mass of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(before >= p, float("-inf"))  # the most likely always stays
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely one."""
    if min_p <= 0.0:
        return logits
    probabilities = torch.softmax(logits, dim=-1)
    threshold = probabilities.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probabilities < threshold, float("-inf"))


def filtered_logits(logits: torch.Tensor, history: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Float32 logits `(B, V)` after the penalty, and when sampling the temperature and filters: the distribution
    the next token is drawn from (greedy: its argmax)."""
    logits = apply_repetition_penalty(logits.float(), history, options.repetition_penalty)
    if options.temperature == 0.0:
        return logits
    logits = logits / options.temperature
    if options.top_k is not None:
        logits = top_k_filter(logits, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    return min_p_filter(logits, options.min_p)


def choose_next(
    logits: torch.Tensor, history: torch.Tensor, options: SamplingOptions, rng: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row `(B,)` from logits `(B, V)`, on the logits' device (no host sync)."""
    logits = filtered_logits(logits, history, options)
    if options.temperature == 0.0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=rng).squeeze(-1)


# ---------------------------------------------------------------- rows with options of their own (the server's batch)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]  # (B, 1)


def filtered_logits_per_row(
    logits: torch.Tensor, history: torch.Tensor, options: list[SamplingOptions]
) -> torch.Tensor:
    """`filtered_logits` where row b of `logits` `(B, V)` follows `options[b]`: each filter in one batched pass
    when any row uses it (a row that does not is left as it is).

    `history` `(B, H)`: each row's tokens so far, padded with any token of the same row (a token seen twice is
    penalised once, so the padding changes nothing)."""
    logits = logits.float()
    penalties = [o.repetition_penalty for o in options]
    if history.numel() and any(penalty != 1.0 for penalty in penalties):
        penalty = _column(penalties, logits)
        seen = logits.gather(1, history)
        logits = logits.clone()
        logits.scatter_(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    sampling = [o.temperature != 0.0 for o in options]
    if not any(sampling):
        return logits
    penalised = logits
    logits = logits / _column([o.temperature or 1.0 for o in options], logits)
    vocabulary = logits.size(-1)
    ks = [o.top_k if o.top_k is not None and o.top_k < vocabulary else vocabulary for o in options]
    if min(ks) < vocabulary:
        largest = max(k for k in ks if k < vocabulary)
        values = torch.topk(logits, largest, dim=-1).values  # (B, largest), descending
        index = torch.tensor([min(k, largest) - 1 for k in ks], device=logits.device)[:, None]
        threshold = torch.where(_column(ks, logits) < vocabulary, values.gather(1, index), float("-inf"))
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if any(o.top_p < 1.0 for o in options):
        p = _column([o.top_p if o.top_p < 1.0 else float("inf") for o in options], logits)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probabilities = torch.softmax(sorted_logits, dim=-1)
        before = probabilities.cumsum(dim=-1) - probabilities  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= p, float("-inf"))  # the most likely always stays
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    if any(o.min_p > 0.0 for o in options):
        probabilities = torch.softmax(logits, dim=-1)
        threshold = probabilities.amax(dim=-1, keepdim=True) * _column([max(o.min_p, 0.0) for o in options], logits)
        logits = logits.masked_fill(probabilities < threshold, float("-inf"))
    greedy = torch.tensor([not s for s in sampling], device=logits.device)[:, None]
    return torch.where(greedy, penalised, logits)


def pick_by_inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row `(B,)` from probabilities `(B, V)`: the first whose cumulative probability passes
    `uniforms[b]` (in [0, 1)) times the row's total. Sampling with the random draw made by the caller, one per row,
    so each row can draw from its own generator. A token of probability 0 is never picked, whatever the rounding
    of the cumulative sums: the pick moves back to the last token before it that has some."""
    cdf = probabilities.cumsum(dim=-1)  # (B, V)
    target = (uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]).contiguous()  # (B, 1)
    index = torch.searchsorted(cdf, target, right=True).clamp(max=probabilities.size(-1) - 1)  # (B, 1)
    positions = torch.arange(probabilities.size(-1), device=probabilities.device).expand_as(probabilities)
    last_possible = torch.where(probabilities > 0, positions, -1).cummax(dim=-1).values  # (B, V)
    return last_possible.gather(1, index).squeeze(-1)


def choose_next_per_row(
    logits: torch.Tensor, history: torch.Tensor, options: list[SamplingOptions], uniforms: torch.Tensor | None
) -> torch.Tensor:
    """`choose_next` where row b follows `options[b]` and, when it samples, takes its draw `uniforms[b]` from its
    own generator (`uniforms`: None when every row is greedy): a row's token depends on its own logits, history,
    options and draw only, and the batch is chosen in one pass on the device (no host sync)."""
    logits = filtered_logits_per_row(logits, history, options)
    greedy = logits.argmax(dim=-1)
    if uniforms is None:
        return greedy
    sampled = pick_by_inverse_cdf(torch.softmax(logits, dim=-1), uniforms)
    sampling = torch.tensor([o.temperature != 0.0 for o in options], device=logits.device)
    return torch.where(sampling, sampled, greedy)
