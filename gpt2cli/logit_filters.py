"""The usual logit filters of sampling, each on float32 `(B, V)` logits: repetition penalty, top-k, top-p, min-p."""

from __future__ import annotations

import torch


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
