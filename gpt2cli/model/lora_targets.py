"""Which of a block's projections LoRA adapts, and what the adapters weigh, without torch or a model.

The settings validate `--lora-targets` with `resolve_targets` (imported by `gpt2 --help`'s path, so no torch here);
the memory estimate sizes a LoRA run with `adapter_parameter_count` and `frozen_base_bytes` before anything is built.
"""

from __future__ import annotations

from typing import Protocol

# A block's projections by their path inside the block, with their (in, out) widths in units of n_embd.
TARGET_WIDTHS: dict[str, tuple[int, int]] = {
    "attn.c_attn": (1, 3),  # q, k and v in one matrix
    "attn.c_proj": (1, 1),
    "mlp.c_fc": (1, 4),
    "mlp.c_proj": (4, 1),
}
TARGETS = tuple(TARGET_WIDTHS)
DEFAULT_TARGETS = TARGETS  # every projection: the usual best quality for its small cost (QLoRA's finding)


class Shape(Protocol):
    """What these sizes read of a model config (`GPT2Config` has it)."""

    n_layer: int
    n_embd: int
    vocab_size: int
    block_size: int
    bias: bool


def resolve_targets(names: list[str]) -> tuple[str, ...]:
    """Full target paths for `names`, in block order: a full path, or a last part that names one projection
    (`c_attn`, `c_fc`); `c_proj` alone is ambiguous. Raises ValueError naming the problem."""
    resolved = set()
    for name in names:
        if name in TARGET_WIDTHS:
            resolved.add(name)
            continue
        matches = [target for target in TARGETS if target.rsplit(".", 1)[-1] == name]
        if len(matches) > 1:
            raise ValueError(f"{name!r} is ambiguous: name {' or '.join(matches)}")
        if not matches:
            raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
        resolved.add(matches[0])
    if not resolved:
        raise ValueError(f"name at least one target of {', '.join(TARGETS)}")
    return tuple(target for target in TARGETS if target in resolved)


def adapter_parameter_count(shape: Shape, rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """The trainable parameters of a LoRA run: A (rank × in) and B (out × rank) per target and block."""
    per_block = sum(rank * (ins + outs) * shape.n_embd for ins, outs in (TARGET_WIDTHS[t] for t in targets))
    return shape.n_layer * per_block


def frozen_base_bytes(shape: Shape, matrix_bytes: int) -> int:
    """The frozen base's bytes when the blocks' four matrices are held in `matrix_bytes` per value (2 in bf16, 4 in
    float32) and everything else (embeddings, LayerNorms, biases: 5% of gpt2-xl) stays float32."""
    c = shape.n_embd
    matrices = shape.n_layer * 12 * c * c
    per_layer_rest = 13 * c if shape.bias else 2 * c  # LayerNorms (4C) and biases (9C)
    rest = shape.vocab_size * c + shape.block_size * c + shape.n_layer * per_layer_rest + (2 if shape.bias else 1) * c
    return matrices * matrix_bytes + rest * 4
