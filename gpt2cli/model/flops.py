"""FLOPs per token and model FLOPs utilisation (MFU), as pure functions of the model's shape and the measurements.

nanoGPT's estimate: a training step costs 6·N + 12·L·C·T FLOPs per token, with N the parameters without the position
embeddings (the tied token embedding counted once, as the output projection's matmul), L layers, C the width and T
the sequence length (attention's score and value products); a forward pass is a third of that.
"""

from __future__ import annotations


def training_flops_per_token(parameters: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Forward and backward, per token: 6·N + 12·L·C·T (`parameters` = N, without the position embeddings)."""
    return 6 * parameters + 12 * n_layer * n_embd * seq_len


def forward_flops_per_token(parameters: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """A forward pass that projects every position onto the vocabulary (`model(idx)`): 2·N + 4·L·C·T."""
    return training_flops_per_token(parameters, n_layer, n_embd, seq_len) / 3


def prefill_flops_per_token(parameters: int, n_layer: int, n_embd: int, vocab_size: int, seq_len: int) -> float:
    """Prefill of a `seq_len`-token prompt, per prompt token: only the last position goes through the output head.

    The head is a (V, C) matmul, 2·V·C FLOPs per row it computes, done once per prompt instead of once per token.
    """
    head = vocab_size * n_embd
    return 2 * (parameters - head) + 4 * n_layer * n_embd * seq_len + 2 * head / seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None, world_size: int = 1) -> float | None:
    """Achieved FLOP/s over the peak of every device that did the work; None where the peak is unknown.

    `tokens_per_s` counts the tokens of all `world_size` devices (e.g. every torchrun rank's share of the batch).
    """
    if peak_tflops is None:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * world_size)
