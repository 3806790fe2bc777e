"""GPT-2: the model of Radford et al. (2019), readable in one sitting.

Module and parameter names follow Hugging Face's `GPT2LMHeadModel` so that checkpoints map
one-to-one; the projections are `nn.Linear` (weight `[out, in]`), transposed to transformers'
Conv1D layout only when a checkpoint is written (see `formats/checkpoint.py`).

Shapes in comments: B batch, T time (positions), C channels (n_embd), nh heads, hs head size (C // nh),
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gpt2cli.errors import ConfigError, UsageError
from gpt2cli.model.attention import attention
from gpt2cli.model.flops import training_flops_per_token
from gpt2cli.model.presets import PRESETS

IGNORE_INDEX = -1  # a target that counts for nothing in the loss
MIN_ATTEND_LENGTH = 16  # the shortest cached length a decode step attends to (`KVCache.attend_length`)


@dataclass(frozen=True)
class GPT2Config:
    block_size: int = 1024  # longest sequence the learned positions cover
    vocab_size: int = 50257  # GPT-2's BPE (50,256 merges + <|endoftext|>)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining; ~0.1 helps when fine-tuning small data
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name]._asdict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPT2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """Each token's position within its example `(B, T)`, for example numbers `documents` `(B, T)` (runs of one
    value, increasing along a row)."""
    T = documents.size(1)
    index = torch.arange(T, device=documents.device).expand_as(documents)  # (B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]  # (B, T): True at an example's first token
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): where each token's example starts
    return index - first


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """`(B, 1, T, T)` True where a query may attend to a key: causal and within the same example (block-diagonal)."""
    T = documents.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()  # (T, T)
    same = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class KVCache:
    """Static, preallocated keys and values of every layer for `batch_size` rows (gpt-fast's design).

    Each row has its own position: a decode step writes each row's new key and value at that row's position
    (a scatter) and attends through a mask, so the step has one shape whatever the positions are and compiles once;
    rows can hold unrelated sequences (batched serving). The tensors never move or change shape, and are marked as
    static addresses, so a compiled step can be replayed as a CUDA graph.
    """

    def __init__(
        self, config: GPT2Config, batch_size: int, device: torch.device | str, dtype: torch.dtype, length: int = 0
    ) -> None:
        self.capacity = length or config.block_size  # positions a row can hold
        # One spare position, never attended: an attended length is then never the whole tensor, which a step
        # compiled with a dynamic length would otherwise specialise on (a contiguity guard) and compile twice.
        # A draft's verification writes its padding there (`GPT2.verify_logits`).
        shape = (batch_size, config.n_head, self.capacity + 1, config.head_dim)  # (B, nh, capacity + 1, hs)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)

    @property
    def batch_size(self) -> int:
        return self.keys[0].size(0)

    def attend_length(self, end: int) -> int:
        """Cached positions to attend to when the furthest row ends at `end`: the next power of two (at least 16),
        so eager decoding reads little more than the filled part and meets only a handful of shapes."""
        return min(self.capacity, max(MIN_ATTEND_LENGTH, 1 << (end - 1).bit_length()))


@dataclass
class CachedCall:
    """Where one cached call reads and writes, computed once and shared by every layer."""

    cache: KVCache
    positions: torch.Tensor  # (B, T) the cache slot of each new token (its absolute position)
    mask: torch.Tensor  # (B, 1, T, L) True where a new token may attend to a cached position
    rows: tuple[int, int] | None  # (first, B): the cache rows holding these B sequences; None: all of them
    length: int  # L: the cached positions attended to

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new `k`, `v` `(B, nh, T, hs)` at their positions; return the layer's first L keys and values."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # (B, nh, capacity + 1, hs)
        if self.rows is not None:  # narrowed, not sliced: a compiled step then keeps the number of rows symbolic
            first, count = self.rows
            keys, values = keys.narrow(0, first, count), values.narrow(0, first, count)
        rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1)
        keys[rows, :, self.positions] = k.transpose(1, 2)  # indexed (B, T, nh, hs)
        values[rows, :, self.positions] = v.transpose(1, 2)
        return keys.narrow(2, 0, self.length), values.narrow(2, 0, self.length)  # (B, nh, L, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cached: CachedCall | None = None, layer: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, time (sequence length), channels (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cached is None and mask is None:
            y = attention(q, k, v, dropout=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        elif cached is None:  # packed examples: causal within each example only (`document_mask`)
            y = attention(q, k, v, mask=mask, causal=False, dropout=self.dropout if self.training else 0.0)
        else:  # generation: the new tokens attend to the row's cached ones through the call's mask
            k, v = cached.update(layer, k, v)  # (B, nh, L, hs)
            y = attention(q, k, v, mask=cached.mask, causal=False)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        # Activation checkpointing (`GPT2.set_activation_checkpointing`): keep only the block's input for the
        # backward pass and recompute the rest there. Inside `forward`, so a compiled block traces the checkpoint
        # too, and FSDP2's unit around the block has gathered its weights when the recomputation runs.
        self.checkpointed = False

    def forward(
        self, x: torch.Tensor, cached: CachedCall | None = None, layer: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.checkpointed and cached is None and torch.is_grad_enabled():
            # Non-reentrant: it gives gradients to parameters even when the block's input needs none (LoRA's
            # frozen embeddings), and torch.compile traces it; dropout's masks are replayed (the RNG state is kept).
            return torch.utils.checkpoint.checkpoint(self._residual_branches, x, None, 0, mask, use_reentrant=False)
        return self._residual_branches(x, cached, layer, mask)

    def _residual_branches(
        self, x: torch.Tensor, cached: CachedCall | None = None, layer: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cached, layer, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, C)
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings (block_size, C)
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # weight (V, C)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the token embedding with the output projection, as GPT-2 does (and re-tie after loading)."""
        self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                # Each block adds two residual branches: keep the residual stream's variance from growing with depth.
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_positions: bool = False) -> int:
        """Parameters counted once (the tied embedding is one tensor); optionally without `wpe`."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_positions:
            total -= self.transformer.wpe.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, nanoGPT's estimate: 6·N + 12·L·H·Q·T.

        N counts the parameters without the position embeddings (the tied token embedding once, as the output
        projection's matmul); the second term is attention's score and value products.
        """
        config = self.config
        return training_flops_per_token(
            self.num_parameters(exclude_positions=True), config.n_layer, config.n_embd, seq_len
        )

    def set_dropout(self, probability: float) -> None:
        """Change dropout after construction (e.g. when fine-tuning a loaded checkpoint)."""
        self.config = dataclasses.replace(self.config, dropout=probability)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = probability
            elif isinstance(module, CausalSelfAttention):
                module.dropout = probability

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (training only): the
        activation memory of one block instead of all of them, for about one more forward pass of compute."""
        for block in self.transformer.h:
            block.checkpointed = enabled

    def hidden_states(
        self, idx: torch.Tensor, tok_emb: torch.Tensor | None = None, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final LayerNorm's output `(B, T, C)` for token ids `(B, T)`: everything before the output projection.

        `tok_emb` `(B, T, C)` replaces the token-embedding lookup (training passes its own: `training/loss.py`).
        `documents` `(B, T)` numbers the examples packed into each row (consecutive runs of one value): each token
        then attends only within its example and counts positions from its example's start, as it would alone.
        """
        if idx.dim() != 2:
            raise UsageError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        if idx.size(1) > self.config.block_size:
            raise UsageError(f"sequence of {idx.size(1)} tokens is longer than the block size {self.config.block_size}")
        mask = None
        if documents is None:
            pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        else:
            pos, mask = document_positions(documents), document_mask(documents)  # (B, T), (B, 1, T, T)
        if tok_emb is None:
            tok_emb = self.transformer.wte(idx)  # (B, T, C)
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, mask=mask)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, documents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits `(B, T, vocab)` for token ids `idx` `(B, T)`; with `targets` `(B, T)`, also the mean cross-entropy
        (targets equal to -1 are ignored). Training computes its loss without the logits: `training/loss.py`.
        `documents`: packed examples kept apart, as in `hidden_states`."""
        x = self.hidden_states(idx, documents=documents)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits, None
        flat_logits = logits.view(-1, logits.size(-1)).float()  # (B*T, vocab)
        loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    def next_token_logits(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | int,
        length: int | None = None,
        first_row: int = 0,
    ) -> torch.Tensor:
        """Logits `(B, V)` for the position after `idx` `(B, T)`, reading and extending `cache` (generation).

        Row b's tokens go at positions `positions[b]...` (a `(B,)` tensor on the model's device, or one int for all
        rows) of cache row `first_row + b`; they attend to that row's first `length` cached positions (default: the
        whole cache; at least the furthest row's end). Positions are not checked against the block size here: that
        would read them on the host every step.
        """
        B, T = idx.shape
        if isinstance(positions, int):
            if positions + T > self.config.block_size:
                raise UsageError(
                    f"sequence of {positions + T} tokens is longer than the block size {self.config.block_size}"
                )
            positions = torch.full((B,), positions, dtype=torch.long, device=idx.device)
        pos = positions[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        x = self._cached_blocks(idx, cache, pos, pos, pos, length, first_row)  # (B, T, C)
        x = self.transformer.ln_f(x[:, -1, :])  # (B, C): only the last position is needed
        return self.lm_head(x)  # (B, V)

    def verify_logits(
        self, idx: torch.Tensor, cache: KVCache, positions: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """Logits `(B, T, V)` after each of `idx` `(B, T)`, the tokens of row b at `positions[b]...`: a draft's
        verification pass (prompt lookup), with `next_token_logits`' cache conventions.

        A row near the end of the context pads its draft: tokens whose position falls past the cache (or the block
        size) are written to the cache's spare slot, never attended, and their logits are meaningless.
        """
        pos = positions[:, None] + torch.arange(idx.size(1), device=idx.device)  # (B, T)
        slots = pos.clamp(max=cache.capacity)  # the spare slot takes the padding past the end
        x = self._cached_blocks(idx, cache, pos, slots, pos.clamp(max=self.config.block_size - 1), length, 0)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

    def _cached_blocks(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        pos: torch.Tensor,
        slots: torch.Tensor,
        embedded_pos: torch.Tensor,
        length: int | None,
        first_row: int,
    ) -> torch.Tensor:
        """The last block's output `(B, T, C)` for tokens `idx` `(B, T)` at positions `pos` `(B, T)`: each token
        attends to its row's cached positions up to its own, its key and value stored at `slots` (= `pos` but for
        padding), its position embedding read at `embedded_pos`."""
        B = idx.size(0)
        length = cache.capacity if length is None else length
        mask = torch.arange(length, device=idx.device) <= pos[:, :, None]  # (B, T, L): causal, per row
        rows = None if first_row == 0 and cache.batch_size == B else (first_row, B)
        cached = CachedCall(cache, slots, mask[:, None], rows, length)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(embedded_pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cached, layer)
        return x
