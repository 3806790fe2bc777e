"""Benchmark: `gpt2 train` against a plain training loop over transformers' GPT2LMHeadModel.

Every contender trains the same shape (4 layers, 4 heads, width 256, block 256, batch 8, vocabulary 50257) on the
same Shakespeare tokens (the corpus shipped in the package), in the same window order, with the same recipe
(AdamW 0.9/0.95, weight decay 0.1 on 2-D weights, grad clip 1.0, warmup then cosine), for the same number of steps:

  ours            `gpt2 train tokens.bin ...` (the real command, its defaults: bf16 autocast where the CPU has it)
  ours-compile    the same with --compile
  hf-fp32         a plain loop: GPT2LMHeadModel(labels=...) + torch.optim.AdamW, float32
  hf-bf16         the same loop under torch.autocast(bfloat16)

Each runs in its own process. Tokens per second are measured over the steps after the first `--warmup` (compilation
and first-touch allocation excluded); the final loss is the mean training loss of the last 10 steps. Run it from the
repository root:

  python benchmarks/train.py                 # 60 steps each, a table
  python benchmarks/train.py --steps 100 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}
BATCH = 8
RECIPE = {
    "lr": 6e-4,
    "min_lr": 6e-5,
    "warmup": 10,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "clip": 1.0,
    "seed": 1337,
}
CONTENDERS = ("ours", "ours-compile", "hf-fp32", "hf-bf16")


def prepare_tokens(folder: Path) -> Path:
    """The bundled corpus as an llm.c shard (tokenized by `gpt2 tokenize`)."""
    text = folder / "shakespeare.txt"
    text.write_bytes(gzip.decompress((REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz").read_bytes()))
    shard = folder / "shakespeare.bin"
    subprocess.run([sys.executable, "-m", "gpt2cli", "tokenize", str(text), "-o", str(shard)], check=True)
    return shard


def run_ours(shard: Path, steps: int, warmup: int, compile: bool, folder: Path) -> dict[str, Any]:
    out = folder / ("run-compiled" if compile else "run")
    command = [
        sys.executable,
        "-m",
        "gpt2cli",
        "train",
        str(shard),
        *(f"--{key.replace('_', '-')}={value}" for key, value in SHAPE.items()),
        f"--batch-size={BATCH}",
        f"--max-steps={steps}",
        f"--lr={RECIPE['lr']}",
        f"--min-lr={RECIPE['min_lr']}",
        f"--warmup-steps={RECIPE['warmup']}",
        f"--seed={RECIPE['seed']}",
        "--val-fraction=0",
        "--log-interval=1",
        f"--save-interval={steps}",
        "--device=cpu",
        f"--out={out}",
        "--compile" if compile else "--no-compile",
    ]
    env = {**os.environ, "GPT2_DATA__CACHE_DIR": str(folder / "cache")}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    seconds = sum(BATCH * SHAPE["block_size"] / r["tok_per_s"] for r in timed)
    return {
        "tokens_per_s": len(timed) * BATCH * SHAPE["block_size"] / seconds,
        "final_loss": sum(r["loss"] for r in records[-10:]) / len(records[-10:]),
        "first_loss": records[0]["loss"],
    }


def run_transformers(shard: Path, steps: int, warmup: int, bf16: bool) -> dict[str, Any]:
    """The peer: the loop one writes with transformers and torch alone (batches drawn in the same order)."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2cli.data.shards import read_shard
    from gpt2cli.training.batches import Windows, WindowSampler

    torch.manual_seed(RECIPE["seed"])
    config = GPT2Config(
        n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], n_positions=SHAPE["block_size"]
    )
    model = GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": RECIPE["weight_decay"]}, {"params": other, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=RECIPE["lr"], betas=RECIPE["betas"])
    windows = Windows([np.asarray(read_shard(shard))], SHAPE["block_size"])
    sampler = WindowSampler(len(windows), RECIPE["seed"])
    losses, seconds = [], 0.0
    for step in range(steps):
        lr = lr_at(step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        inputs, targets = windows.batch(sampler.take(BATCH), torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= warmup:
            seconds += time.perf_counter() - started
    timed_steps = steps - warmup
    return {
        "tokens_per_s": timed_steps * BATCH * SHAPE["block_size"] / seconds,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "first_loss": losses[0],
    }


def lr_at(step: int, steps: int) -> float:
    if step < RECIPE["warmup"]:
        return RECIPE["lr"] * (step + 1) / RECIPE["warmup"]
    progress = min(1.0, (step - RECIPE["warmup"]) / max(1, steps - RECIPE["warmup"]))
    return RECIPE["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (RECIPE["lr"] - RECIPE["min_lr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma list of contenders")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # a transformers contender, in its own process
        result = run_transformers(Path(args.shard), args.steps, args.warmup, bf16=args.worker == "hf-bf16")
        print(json.dumps(result))
        return

    import torch

    from gpt2cli.runtime.devices import device_name

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpt2-train-bench-") as temporary:
        folder = Path(temporary)
        shard = prepare_tokens(folder)
        for name in args.only.split(","):
            print(f"running {name} ({args.steps} steps) ...", file=sys.stderr, flush=True)
            if name.startswith("ours"):
                results[name] = run_ours(shard, args.steps, args.warmup, name == "ours-compile", folder)
            else:
                command = [sys.executable, __file__, "--worker", name, "--shard", str(shard)]
                command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[name] = json.loads(output.strip().splitlines()[-1])

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": device_name(torch.device("cpu")),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "steps": args.steps,
        "results": results,
    }
    for peer in ("hf-fp32", "hf-bf16"):
        for ours in ("ours", "ours-compile"):
            if peer in results and ours in results:
                report[f"{ours}/{peer}"] = results[ours]["tokens_per_s"] / results[peer]["tokens_per_s"]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"train benchmark, {report['date']}: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"torch {report['torch']}, {args.steps} steps (first {args.warmup} untimed)"
    )
    print(f"{'contender':<14} {'tokens/s':>10} {'final loss':>11} {'first loss':>11}")
    for name, result in results.items():
        print(
            f"{name:<14} {result['tokens_per_s']:>10,.0f} {result['final_loss']:>11.4f} {result['first_loss']:>11.4f}"
        )
    for key, value in report.items():
        if "/" in key:
            print(f"{key}: {value:.2f}x")


if __name__ == "__main__":
    main()
