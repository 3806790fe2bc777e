"""HellaSwag while training: the examples shared out across torchrun ranks, scored by `gpt2 eval`'s own code.

At an evaluation step the result equals `gpt2 eval CKPT FILE --task hellaswag --dtype D` on the checkpoint saved at
that step (D the training's compute dtype): the same `evaluate_multiple_choice`, on the same weights, in the same
precision. Only the counting is shared: each rank scores every world_size-th example and the counts are summed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from gpt2cli.data.tokenizer import get_tokenizer
from gpt2cli.evaluation import ChoiceResult, Example, ending_losses, evaluate_multiple_choice
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.runtime.devices import Precision
from gpt2cli.runtime.distributed import World, sum_across


@contextlib.contextmanager
def _whole_weights(root: nn.Module) -> Iterator[None]:
    """Under FSDP2, gather the root's own weights (embeddings, final LayerNorm) for forward passes that call the GPT2
    inside it directly; the blocks gather theirs in their own forward hooks."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


@torch.no_grad()
def score_hellaswag(
    model: GPT2, root: nn.Module, examples: list[Example], precision: Precision, world: World
) -> ChoiceResult:
    """`acc` and `acc_norm` over all `examples`, each rank scoring its share with `model` (in eval mode).

    `root` is the module DDP or FSDP wraps (for FSDP's root weights). Under FSDP every rank must run the same number
    of forward passes, so a rank whose share is one short scores an example again without counting it."""
    share = examples[world.rank :: world.world_size]
    extra = math.ceil(len(examples) / world.world_size) - len(share)
    tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    try:
        with _whole_weights(root):
            result = evaluate_multiple_choice(model, tokenizer, share, precision) if share else None
            for _ in range(extra):
                ending_losses(model, tokenizer, examples[0], precision)
    finally:
        model.train(was_training)
    counts = [0.0, 0.0, 0.0] if result is None else [result.acc * result.n, result.acc_norm * result.n, result.n]
    right, right_norm, total = sum_across(torch.tensor(counts, dtype=torch.float64, device=precision.device), world)
    n = round(total.item())
    return ChoiceResult(acc=round(right.item()) / n, acc_norm=round(right_norm.item()) / n, n=n)


class HellaSwag:
    """HellaSwag at a run's evaluation steps (`--hellaswag`): the examples, what scores them, the last result."""

    def __init__(
        self, examples: list[Example], model: GPT2, root: nn.Module, precision: Precision, world: World
    ) -> None:
        self.examples = examples
        self.model, self.root, self.precision, self.world = model, root, precision, world
        self.last: ChoiceResult | None = None

    def score(self) -> None:
        """Every rank must call this at the same step."""
        self.last = score_hellaswag(self.model, self.root, self.examples, self.precision, self.world)

    def metrics(self) -> dict[str, float]:
        """The last result as `metrics.jsonl` names it (empty before the first evaluation)."""
        return {} if self.last is None else {"hellaswag_acc": self.last.acc, "hellaswag_acc_norm": self.last.acc_norm}
