"""Speedrun: time to a good model, the old default recipe against the new default run, side by side in one run.

  old   the default run before issue #15, reproduced with flags: AdamW (lr 1e-3 down to 1e-4, weight decay 0.1),
        25 warmup steps then cosine, 600 steps of 8 × 256 tokens, 4 layers, 4 heads, width 256, eager
  new   `gpt2 train` with no arguments: today's default run (see DEFAULT_RUN in gpt2cli/settings/sections.py)

Both train on the bundled Shakespeare corpus and evaluate every 25 steps on the same held-out tokens (the default
run's validation split and eval_tokens), one after the other in their own processes. The target is the old recipe's
final validation loss, measured in this run. For each recipe it prints the training tokens and `train_s` (training
time without evaluation or checkpoint writing, compilation included) at which the validation loss first reaches the
target, interpolated linearly between the two evaluations around it; the final validation loss; `train_s` and the
wall time of the whole process; the ratio of the new recipe's `train_s` to the target over the old one's; and the
new recipe's validation loss after as much training time as the whole old recipe took. Each run compiles into an
empty Inductor cache (what a first run on a new machine pays) unless `--warm-cache` is given.

  python benchmarks/speedrun.py                  # both recipes (~10 minutes on 2 idle CPU cores), a table
  python benchmarks/speedrun.py --json           # one JSON object; both write benchmarks/results/speedrun-*.json
  python benchmarks/speedrun.py --new-args "--max-steps 500"   # try a variation of the new default
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EVAL_INTERVAL = 25
# The bundled default run as it was before #15, every value that the new default changes given as a flag.
OLD_RECIPE = [
    "--optimizer",
    "adamw",
    "--no-compile",
    "--n-layer",
    "4",
    "--n-head",
    "4",
    "--n-embd",
    "256",
    "--block-size",
    "256",
    "--batch-size",
    "8",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--weight-decay",
    "0.1",
    "--warmup-steps",
    "25",
    "--schedule",
    "cosine",
    "--max-steps",
    "600",
    "--eval-tokens",
    "32768",
    "--log-interval",
    "10",
    "--save-interval",
    "100",
]
# --smoke: a few steps of a tiny model, to check the script itself.
SMOKE = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--max-steps",
    "8",
    "--eval-tokens",
    "512",
    "--eval-interval",
    "2",
    "--no-compile",
]


def train(name: str, args: list[str], folder: Path, warm_cache: bool) -> dict[str, Any]:
    """One `gpt2 train` process; its evaluations, summary and wall time."""
    out = folder / name
    command = [sys.executable, "-m", "gpt2cli", "train", *args, "--out", str(out), "--json"]
    print(f"[{name}] {shlex.join(command[3:])}", file=sys.stderr, flush=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPT2_")}
    if not warm_cache:  # an empty Inductor cache: the compile a first run on a new machine pays, in full
        env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / f"inductor-{name}")
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, env=env, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"speedrun: the {name} recipe failed (exit {result.returncode})")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [
        {"step": r["step"], "tokens": r["tokens"], "train_s": r["train_s"], "val_loss": r["val_loss"]}
        for r in records
        if "val_loss" in r
    ]
    summary = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return {"args": args, "wall_s": round(wall, 1), "summary": summary, "evals": evals}


def reach(evals: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Tokens and train_s at which the validation loss first reaches `target` (linear between evaluations)."""
    for index, point in enumerate(evals):
        if point["val_loss"] <= target:
            if index == 0:
                return {"tokens": point["tokens"], "train_s": point["train_s"], "step": point["step"]}
            before = evals[index - 1]
            share = (before["val_loss"] - target) / (before["val_loss"] - point["val_loss"])
            return {key: before[key] + share * (point[key] - before[key]) for key in ("tokens", "train_s", "step")}
    return None


def report(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    target = runs["old"]["evals"][-1]["val_loss"]
    rows = {}
    for name, run in runs.items():
        reached = reach(run["evals"], target)
        rows[name] = {
            "tokens_to_target": None if reached is None else round(reached["tokens"]),
            "train_s_to_target": None if reached is None else round(reached["train_s"], 1),
            "final_val_loss": run["evals"][-1]["val_loss"],
            "steps": run["summary"]["steps"],
            "tokens": run["summary"]["tokens"],
            "train_s": run["summary"]["train_s"],
            "wall_s": run["wall_s"],
        }
    old, new = rows["old"]["train_s_to_target"], rows["new"]["train_s_to_target"]
    return {
        "target_val_loss": target,
        "recipes": rows,
        "train_s_ratio_new_over_old": None if not (old and new) else round(new / old, 3),
        "new_final_within_old_wall_time": rows["new"]["wall_s"] <= rows["old"]["wall_s"],
        "new_val_loss_at_old_train_s": loss_at(runs["new"]["evals"], rows["old"]["train_s"]),
        "runs": runs,
    }


def loss_at(evals: list[dict[str, Any]], train_s: float) -> float:
    """The validation loss a run had after `train_s` seconds of training (linear between evaluations; its final
    loss when it finished sooner)."""
    for before, after in itertools.pairwise(evals):
        if after["train_s"] >= train_s:
            share = (train_s - before["train_s"]) / max(after["train_s"] - before["train_s"], 1e-9)
            return round(before["val_loss"] + max(share, 0.0) * (after["val_loss"] - before["val_loss"]), 4)
    return evals[-1]["val_loss"]


def machine() -> dict[str, Any]:
    import torch

    from gpt2cli.runtime.devices import device_name

    return {
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_table(result: dict[str, Any]) -> None:
    def show(value: Any, unit: str = "") -> str:
        return "not reached" if value is None else f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"

    print(f"target: the old recipe's final validation loss, {result['target_val_loss']:.4f}")
    print(
        f"{'recipe':<6} {'tokens to target':>17} {'train_s to target':>18} {'final val':>10} {'train_s':>9} "
        f"{'wall s':>8}"
    )
    for name, row in result["recipes"].items():
        print(
            f"{name:<6} {show(row['tokens_to_target']):>17} {show(row['train_s_to_target'], ' s'):>18} "
            f"{row['final_val_loss']:>10.4f} {row['train_s']:>9.1f} {row['wall_s']:>8.1f}"
        )
    ratio = result["train_s_ratio_new_over_old"]
    print(
        f"train_s to target, new / old: {'n/a' if ratio is None else f'{ratio:.3f}'} (target ≤ 0.5); new final "
        f"val loss {result['recipes']['new']['final_val_loss']:.4f} in {result['recipes']['new']['wall_s']:.0f} s "
        f"wall against the old recipe's {result['recipes']['old']['wall_s']:.0f} s (target ≤ 4.5 within it); "
        f"new val loss after the old recipe's train_s: {result['new_val_loss_at_old_train_s']:.4f}; "
        f"Inductor cache: {result['compile_cache']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--new-args", default="", help="extra flags for the new default run")
    parser.add_argument("--old-args", default="", help="extra flags for the old recipe")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: checks the script only")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/speedrun-*.json")
    parser.add_argument(
        "--warm-cache", action="store_true", help="use your Inductor cache (default: an empty one: a cold compile)"
    )
    args = parser.parse_args()

    common = ["--eval-interval", str(EVAL_INTERVAL)]
    recipes = {
        "old": [*OLD_RECIPE, *common, *shlex.split(args.old_args)],
        "new": [*common, *shlex.split(args.new_args)],
    }
    if args.smoke:
        recipes = {name: [*flags, *SMOKE] for name, flags in recipes.items()}
    with tempfile.TemporaryDirectory(prefix="gpt2-speedrun-") as folder:
        runs = {name: train(name, flags, Path(folder), args.warm_cache) for name, flags in recipes.items()}
    result = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "compile_cache": "warm" if args.warm_cache else "cold",
        **report(runs),
    }
    if not (args.no_save or args.smoke):
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"speedrun-{datetime.now():%Y-%m-%d-%H%M}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
