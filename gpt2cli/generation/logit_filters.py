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
