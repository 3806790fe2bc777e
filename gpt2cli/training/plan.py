"""The plan of a run: the numbers derived from the settings, the model's shape and the data's size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpt2cli.errors import DataError, UsageError
from gpt2cli.model.gpt2 import GPT2Config
from gpt2cli.settings.sections import TrainSettings
from gpt2cli.training.optim import Schedule


@dataclass(frozen=True)
class RunPlan:
    seq_len: int
    batch_size: int  # sequences per micro-batch per process
    world_size: int
    grad_accum: int
    tokens_per_step: int
    total_steps: int
    schedule: Schedule

    @property
    def windows_per_step(self) -> int:
        return self.tokens_per_step // self.seq_len


def plan_run(train: TrainSettings, config: GPT2Config, train_windows: int, world_size: int = 1) -> RunPlan:
    """The run's numbers: a step is `tokens_per_step` tokens, split into `grad_accum` micro-batches per process."""
    seq_len = train.seq_len or config.block_size
    if seq_len > config.block_size:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's block size {config.block_size}")
    micro_tokens = train.batch_size * seq_len * world_size
    tokens_per_step = train.total_batch_tokens or micro_tokens
    if tokens_per_step % micro_tokens:
        raise UsageError(
            f"--total-batch-tokens {tokens_per_step} is not a multiple of batch_size × seq_len × processes "
            f"({train.batch_size} × {seq_len} × {world_size} = {micro_tokens})"
        )
    windows_per_step = tokens_per_step // seq_len
    if train_windows < train.batch_size:
        raise DataError(
            f"the training data has {train_windows} window(s) of {seq_len + 1} tokens, fewer than one batch of "
            f"{train.batch_size}; give more text or lower --batch-size / --seq-len"
        )
    if train.max_steps is not None:
        total_steps = train.max_steps
    elif train.max_tokens is not None:
        total_steps = math.ceil(train.max_tokens / tokens_per_step)
    else:
        total_steps = math.ceil((train.epochs or 1.0) * train_windows / windows_per_step)
    schedule_steps = train.schedule_steps or total_steps
    warmup = train.warmup_steps if train.warmup_steps is not None else min(700, schedule_steps // 20)
    schedule = Schedule(
        kind=train.schedule,
        lr=train.lr,
        min_lr=train.min_lr if train.min_lr is not None else train.lr / 10,
        warmup_steps=warmup,
        total_steps=schedule_steps,
        decay_fraction=train.decay_fraction,
    )
    return RunPlan(
        seq_len=seq_len,
        batch_size=train.batch_size,
        world_size=world_size,
        grad_accum=tokens_per_step // micro_tokens,
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        schedule=schedule,
    )
