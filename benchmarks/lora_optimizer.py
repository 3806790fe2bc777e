"""Which optimizer for LoRA's adapters: AdamW, or Muon on the adapter matrices? Validation loss after the same steps.

A small base (2 layers, 4 heads, width 128, block 128) is pretrained on the first 60% of the bundled Shakespeare,
then fine-tuned with `--lora-rank 8` (every projection) on the rest, once per optimizer and learning rate, from the
same base, adapters and batches; the table lists each run's final validation loss (and the base's, before
fine-tuning) and its training time. Not a timing benchmark: losses are what it compares.

    python benchmarks/lora_optimizer.py                 # about 10 minutes on two idle cores
    python benchmarks/lora_optimizer.py --smoke         # a tiny version, to check that the script runs
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import platform
import sys
import tempfile
from pathlib import Path

from gpt2cli import train
from gpt2cli.training.trainer import TrainingSummary

SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128}
CANDIDATES = [  # name, the optimizer's [train] settings
    ("adamw lr 1e-3", {"optimizer": "adamw", "lr": 1e-3}),
    ("adamw lr 3e-3", {"optimizer": "adamw", "lr": 3e-3}),
    ("adamw lr 1e-2", {"optimizer": "adamw", "lr": 1e-2}),
    ("adamw lr 3e-2", {"optimizer": "adamw", "lr": 3e-2}),
    ("muon lr 0.01", {"optimizer": "muon", "muon_lr": 0.01}),
    ("muon lr 0.02", {"optimizer": "muon", "muon_lr": 0.02}),
    ("muon lr 0.05", {"optimizer": "muon", "muon_lr": 0.05}),
]


def run(data: Path, out: Path, **train_settings: object) -> TrainingSummary:
    common = {"device": "cpu", "dtype": "float32", "batch_size": 8, "val_fraction": 0.1, "compile": False}
    common |= {"eval_tokens": 16384, "eval_interval": 10**6}  # one evaluation, at the end
    return train(data, train={**common, **train_settings, "out": str(out)}, report=lambda event, payload: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--base", type=Path, help="a base run folder to reuse (pretrained by an earlier run)")
    parser.add_argument("--only", help="comma list of candidate names to run, e.g. 'adamw lr 3e-3,muon lr 0.02'")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each: checks the script, measures nothing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base_steps, steps = (4, 3) if args.smoke else (args.base_steps, args.steps)

    text = gzip.decompress(importlib.resources.files("gpt2cli.assets").joinpath("shakespeare.txt.gz").read_bytes())
    text = text.decode()
    cut = int(len(text) * 0.6)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "pretrain.txt").write_text(text[:cut])
        (root / "finetune.txt").write_text(text[cut:])
        base = args.base or root / "base"
        if args.base is None:
            print(f"pretraining the base: {base_steps} steps", file=sys.stderr)
            train(
                root / "pretrain.txt",
                model=SHAPE,
                train={
                    "device": "cpu",
                    "batch_size": 8,
                    "max_steps": base_steps,
                    "lr": 3e-3,
                    "out": str(base),
                    "val_fraction": 0.0,
                },
                report=lambda event, payload: None,
            )
        # The base's loss on the fine-tuning data: one step at a learning rate too small to change anything.
        before = run(root / "finetune.txt", root / "before", init_from=str(base), lora_rank=8, max_steps=1, lr=1e-12)
        rows = [{"optimizer": "(base, no fine-tuning)", "val_loss": before.val_loss, "train_s": 0.0}]
        chosen = set(args.only.split(",")) if args.only else {name for name, _ in CANDIDATES}
        for name, settings in (candidate for candidate in CANDIDATES if candidate[0] in chosen):
            print(f"fine-tuning: {name}", file=sys.stderr)
            summary = run(
                root / "finetune.txt",
                root / name.replace(" ", "-"),
                init_from=str(base),
                lora_rank=8,
                max_steps=steps,
                weight_decay=0.0,
                warmup_steps=max(1, steps // 10),
                **settings,
            )
            rows.append({"optimizer": name, "val_loss": summary.val_loss, "train_s": summary.train_s})
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    if args.json:
        print(json.dumps({"machine": machine, "base_steps": base_steps, "steps": steps, "rows": rows}))
        return
    base_text = f"the base {args.base}" if args.base else f"a {base_steps}-step base"
    print(f"LoRA rank 8, {steps} steps of 8 x 128 tokens after {base_text}; {machine}")
    print("| optimizer | val loss | train s |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['optimizer']} | {row['val_loss']:.4f} | {row['train_s']:.1f} |")


if __name__ == "__main__":
    main()
