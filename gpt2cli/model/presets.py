"""The named GPT-2 shapes, torch-free so that settings validate and `--help` renders without importing torch."""

from __future__ import annotations

from typing import Literal, NamedTuple


class Shape(NamedTuple):
    n_layer: int
    n_head: int
    n_embd: int


# The released GPT-2 sizes (Radford et al. 2019); all share the 1024-token context and the 50257-token vocabulary.
PRESETS: dict[str, Shape] = {
    "gpt2": Shape(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": Shape(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": Shape(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": Shape(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# The names as a type, so settings validate them and the CLI offers them as choices (derived, not restated).
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
