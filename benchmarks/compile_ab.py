"""Interleaved A/B of compiled training steps, in one process: robust to a machine whose load changes.

`benchmarks/train.py` runs each contender in its own process one after another, so on a shared machine a change of
load between them changes the ratio. Here every variant is built (and compiled) first, then the variants take turns,
a few steps each, for several rounds (the order reversed every other round), and each round's ratio to the first
contender (the transformers float32 loop unless --no-hf) is reported: the median and the range.

Variants (the 4-layer, width-256 shape of benchmarks/train.py, batch 8 x 256, random tokens, bf16 autocast):
  blocks        what `gpt2 train --compile` runs: each block compiled, the compiled loss kernel
  whole         the whole TrainingModel compiled instead
  whole-full    the same with fullgraph=True
  copt          (suffix) the optimizer step compiled too
  fp32          (suffix) no autocast

  python benchmarks/compile_ab.py blocks whole --rounds 10 --steps 3 [--no-hf] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.compile import block_compile_arguments, compile_blocks, default_compile_arguments
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.optim import build_optimizer, clip_gradients

B, T = 8, 256
SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256)

Step = Callable[[torch.Tensor, torch.Tensor], float]  # one training step on (inputs, targets): the loss


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (B, T + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def hf_step_factory() -> Step:
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(HFConfig(n_layer=4, n_head=4, n_embd=256, n_positions=256)).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95)
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def ours_step_factory(variant: str) -> tuple[Step, dict[str, float]]:
    """The variant's step and its seconds per phase (summed over the steps it runs)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**SHAPE)).train()
    whole = "whole" in variant
    if not whole:
        compile_blocks(model.transformer.h)
    trained = TrainingModel(model, compiled_loss=not whole)
    if whole:
        trained.compile(**block_compile_arguments(fullgraph="full" in variant))
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), torch.device("cpu"))
    params = list(model.parameters())
    opt_step = torch.compile(opt.step, **default_compile_arguments()) if "copt" in variant else opt.step
    phases = {"fwd": 0.0, "bwd": 0.0, "clip": 0.0, "opt": 0.0}

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="fp32" not in variant):
            loss = trained(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        clip_gradients(params, 1.0)
        value = loss.item()
        t3 = time.perf_counter()
        opt_step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[k] += v
        return value

    return step, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true", help="ratios to the first variant instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    steps: dict[str, Step] = {}
    phases_of: dict[str, dict[str, float] | None] = {}  # None: transformers' step is not split into phases
    for v in ([] if args.no_hf else ["hf"]) + args.variants:
        t = time.perf_counter()
        if v == "hf":
            steps[v], phases_of[v] = hf_step_factory(), None
        else:
            steps[v], phases_of[v] = ours_step_factory(v)
        for i in range(3):  # compile + warm
            steps[v](*data(i))
        print(f"{v}: ready in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        phases = phases_of[v]
        if phases is not None:  # the warm-up steps are not counted
            for k in phases:
                phases[k] = 0.0
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for v in order:
            t = time.perf_counter()
            for i in range(args.steps):
                steps[v](*data(100 + i))
            times[v].append((time.perf_counter() - t) / args.steps)
    reference = times[next(iter(times))]
    report: dict[str, Any] = {
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "variants": {},
    }
    for v, ts in times.items():
        ratios = [r / t for r, t in zip(reference, ts, strict=True)]
        phases = phases_of[v]
        total = sum(phases.values()) if phases else 0.0
        report["variants"][v] = {
            "ms_per_step": statistics.median(ts) * 1e3,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "phases": {k: p / total for k, p in phases.items()} if phases else None,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'variant':<16} {'ms/step':>9} {'ratio to ' + next(iter(times)) + ' (median [range])':>36}")
    for v, row in report["variants"].items():
        print(
            f"{v:<16} {row['ms_per_step']:9.1f} {row['ratio_median']:8.2f} "
            f"[{row['ratio_min']:.2f}..{row['ratio_max']:.2f}]"
        )
        if row["phases"]:
            print("   " + "  ".join(f"{k} {100 * p:.0f}%" for k, p in row["phases"].items()))


if __name__ == "__main__":
    main()
