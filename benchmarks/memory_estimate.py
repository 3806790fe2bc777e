"""How close is `gpt2cli.training.memory.training_memory` to a real CPU step, and does the check refuse what cannot fit?

Every case is the real `gpt2 train` command, run in a fresh process (`gpt2cli.cli.app.run`, so the run can be watched
from inside): the process's resident memory is read when the trainer starts being prepared (data loaded, no model
yet), the peak (VmHWM) is reset just before the first step, and the peak the steps reach, less that baseline, is
compared with the estimate of the run's own step (`run_step_shape`: its optimizer, its trained and frozen parameters
as built, activation checkpointing). Tokens/s: the steps after the first.

  pretraining shapes   seven shapes from scratch (7M-124M parameters; float32, bf16; AdamW, one with Muon)
  fine-tuning          a random-initialised checkpoint written with `save_model` (124M and gpt2-xl's 1.5B),
                       batch 1 × 1024, the default dtype: full fine-tuning and `--lora-rank 16`, each with and without
                       `--activation-checkpointing`. gpt2-xl's full fine-tune with AdamW must be refused by the memory
                       check (its estimate is printed; the process's whole peak shows it refused before allocating).

    python benchmarks/memory_estimate.py                 # everything; ~20-30 min on two idle cores, ~30 GB of disk
    python benchmarks/memory_estimate.py --only pretrain  # the seven shapes, about a minute
    python benchmarks/memory_estimate.py --only 124m      # (or xl) the fine-tuning cases of one model
    python benchmarks/memory_estimate.py --smoke          # tiny shapes of every kind, to check the script
    ... --json, --keep-checkpoints DIR (reuse the written checkpoints between runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Case:
    label: str
    args: list[str]  # `gpt2 train` flags besides the data, the run folder and the step count
    checkpoint: str | None = None  # "124m" / "xl" / a smoke shape: --init-from the checkpoint written for it
    refused: bool = False  # the memory check must refuse it (run with the check on)
    steps: int = 3
    group: str = "pretrain"
    tags: dict[str, str] = field(default_factory=dict)


def shape_flags(n_layer: int, n_head: int, n_embd: int, seq_len: int, batch: int, dtype: str) -> list[str]:
    return [
        *("--n-layer", str(n_layer), "--n-head", str(n_head), "--n-embd", str(n_embd), "--block-size", str(seq_len)),
        *("--seq-len", str(seq_len), "--batch-size", str(batch), "--dtype", dtype),
    ]


PRETRAIN = [  # n_layer, n_head, n_embd, seq_len, batch_size, dtype, optimizer
    (2, 2, 128, 128, 8, "float32", "adamw"),
    (4, 4, 256, 256, 8, "float32", "adamw"),  # the default run's shape
    (4, 4, 256, 512, 16, "float32", "adamw"),
    (6, 6, 384, 256, 16, "float32", "adamw"),
    (12, 12, 768, 128, 4, "float32", "adamw"),  # GPT-2 124M
    (4, 4, 256, 256, 8, "bfloat16", "adamw"),
    (12, 12, 768, 128, 4, "float32", "muon"),
]
LORA = ["--lora-rank", "16"]
CHECKPOINTING = ["--activation-checkpointing"]


def pretrain_cases(smoke: bool) -> list[Case]:
    shapes = [(2, 2, 64, 64, 4, "float32", "adamw"), (2, 2, 64, 64, 4, "float32", "muon")] if smoke else PRETRAIN
    cases = []
    for n_layer, n_head, n_embd, seq_len, batch, dtype, optimizer in shapes:
        label = f"L{n_layer}/H{n_head}/C{n_embd} T{seq_len} B{batch} {dtype} {optimizer}"
        flags = [*shape_flags(n_layer, n_head, n_embd, seq_len, batch, dtype), "--optimizer", optimizer]
        cases.append(Case(label, flags, steps=2))
    return cases


def fine_tune_cases(model: str, seq_len: int, smoke: bool) -> list[Case]:
    batch = ["--batch-size", "1", "--seq-len", str(seq_len)]
    cases = []
    for lora in (False, True):
        for checkpointing in (False, True):
            method = "LoRA r16" if lora else "full AdamW"
            label = f"{model} {method}{' + checkpointing' if checkpointing else ''} B1 T{seq_len}"
            flags = [*batch, *(LORA if lora else []), *(CHECKPOINTING if checkpointing else [])]
            # 16+ bytes a parameter: ~26 GiB before activations. (--smoke: refused under a pretended 64 MiB limit.)
            refused = model == "xl" and not lora
            tags = {"model": model, "method": method, "checkpointing": "yes" if checkpointing else "no"}
            cases.append(Case(label, flags, model, refused, 2 if smoke else 3, model, tags))
    return cases


CHILD = r"""
import json, os, sys, time
args, result_path = json.loads(sys.argv[1]), sys.argv[2]
import torch
import gpt2cli.training.setup as setup
from gpt2cli.cli.app import run
from gpt2cli.training.memory import run_step_shape, training_memory
from gpt2cli.training.trainer import Trainer

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.zeros(1).sum()  # torch's own start-up allocations before any baseline
record = {"step_ends": []}
prepare = setup.prepare_trainer
def watched_prepare(*a, **k):
    record["baseline"] = status("VmRSS:")  # the data loaded, no model yet
    return prepare(*a, **k)
setup.prepare_trainer = watched_prepare
first_step = Trainer._first_step
def watched_first_step(self):
    estimate = training_memory(run_step_shape(self.train_settings, self.model, self.plan, self.precision, self.world))
    record.update(estimate=estimate.total_bytes, state=estimate.state_bytes, activations=estimate.activation_bytes,
                  tokens_per_step=self.plan.tokens_per_step, before_step=status("VmRSS:"))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    record["step_ends"].append(time.perf_counter())
    return first_step(self)
Trainer._first_step = watched_first_step
train_step = Trainer._train_step
def watched_train_step(self):
    result = train_step(self)
    record["step_ends"].append(time.perf_counter())
    record["peak"] = status("VmHWM:")  # after the steps, before the final checkpoint is written
    return result
Trainer._train_step = watched_train_step
if os.environ.get("MEMORY_ESTIMATE_LIMIT"):  # --smoke: a pretended limit, to check the refusal path
    import gpt2cli.training.memory as memory
    memory.memory_available = lambda: (int(os.environ["MEMORY_ESTIMATE_LIMIT"]), "the pretended limit of --smoke")
record["exit_code"] = run(args)
record["process_peak"] = status("VmHWM:")
json.dump(record, open(result_path, "w"))
"""


def run_case(case: Case, data: Path, checkpoint: Path | None, folder: Path, smoke: bool) -> dict[str, Any]:
    args = ["train", str(data), *case.args, "--max-steps", str(case.steps), "--val-fraction", "0", "--no-compile"]
    args += ["--log-interval", "1", "--save-interval", "1000000", "--out", str(folder / "run"), "--device", "cpu"]
    if checkpoint is not None:
        args += ["--init-from", str(checkpoint)]
    if not case.refused:
        args.append("--no-memory-check")  # measure the steps; the refusal cases keep the check on
    result_path = folder / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if smoke and case.refused:
        env["MEMORY_ESTIMATE_LIMIT"] = str(64 * MIB)
    process = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args), str(result_path)], capture_output=True, text=True, env=env
    )
    if process.returncode or not result_path.exists():
        return {"case": case.label, "error": process.stderr.strip().splitlines()[-1:] or ["no result"]}
    record = json.loads(result_path.read_text())
    row: dict[str, Any] = {"case": case.label, **case.tags, "steps": case.steps}
    if case.refused:
        refusal = [line for line in process.stderr.splitlines() if "gpt2: error:" in line]
        row.update(
            refused=record["exit_code"] != 0 and bool(refusal) and "needs about" in refusal[-1],
            message=refusal[-1] if refusal else None,
            process_peak_bytes=record["process_peak"],
        )
        return row
    if record["exit_code"] != 0:
        return {"case": case.label, "error": process.stderr.strip().splitlines()[-1:]}
    ends = record["step_ends"]
    timed = ends[2:] and (len(ends) - 2) * record["tokens_per_step"] / (ends[-1] - ends[1])  # steps after the first
    measured = record["peak"] - record["baseline"]
    row.update(
        measured_bytes=measured,
        estimate_bytes=record["estimate"],
        state_bytes=record["state"],
        activation_bytes=record["activations"],
        estimate_error=record["estimate"] / measured - 1,
        tokens_per_s=round(timed, 1) if timed else None,
    )
    return row


def write_tokens(path: Path, count: int) -> Path:
    import numpy as np

    from gpt2cli.data.shards import ShardWriter

    with ShardWriter(path) as writer:
        writer.write(np.random.default_rng(0).integers(0, 50257, count).astype(np.uint16))
        writer.close()
    return path


def write_checkpoint(name: str, folder: Path, smoke: bool) -> Path:
    """A random-initialised model saved with `save_model` (no weights can be downloaded here)."""
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    path = folder / f"{name}.safetensors"
    if path.exists():
        return path
    preset = {"124m": "gpt2", "xl": "gpt2-xl"}[name]
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=128) if smoke else GPT2Config.from_preset(preset)
    torch.manual_seed(0)
    print(f"writing a random {preset if not smoke else 'tiny'} checkpoint to {path}", file=sys.stderr, flush=True)
    save_model(GPT2(config), path)
    return path


def machine() -> dict[str, Any]:
    import torch

    from gpt2cli.runtime.devices import device_name

    return {
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_row(row: dict[str, Any]) -> None:
    label = f"{row['case']:<46}"
    if "error" in row:
        print(f"{label} failed: {' '.join(row['error'])}", flush=True)
    elif "refused" in row:
        outcome = "refused" if row["refused"] else "NOT REFUSED"
        print(
            f"{label} {outcome}; process peak {row['process_peak_bytes'] / GIB:.1f} GiB: {row['message']}", flush=True
        )
    else:
        speed = f"{row['tokens_per_s']:>9,.0f}" if row["tokens_per_s"] else f"{'-':>9}"
        print(
            f"{label} {row['measured_bytes'] / MIB:>12,.0f} {row['estimate_bytes'] / MIB:>12,.0f} "
            f"{row['estimate_error']:>+7.0%} {speed}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["pretrain", "124m", "xl"], action="append", help="run only these groups")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes of every kind: checks the script")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--keep-checkpoints", type=Path, help="write (or reuse) the random checkpoints here")
    options = parser.parse_args()
    groups = options.only or ["pretrain", "124m", "xl"]
    seq_len = 64 if options.smoke else 1024
    cases = [case for case in pretrain_cases(options.smoke) if "pretrain" in groups]
    cases += [
        case for name in ("124m", "xl") if name in groups for case in fine_tune_cases(name, seq_len, options.smoke)
    ]

    if not options.json:
        print(f"{'case':<46} {'measured MiB':>12} {'estimate MiB':>12} {'error':>7} {'tokens/s':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        checkpoints = options.keep_checkpoints or root
        checkpoints.mkdir(parents=True, exist_ok=True)
        data = write_tokens(root / "tokens.bin", 200_000)
        for number, case in enumerate(cases):
            checkpoint = write_checkpoint(case.checkpoint, checkpoints, options.smoke) if case.checkpoint else None
            (root / f"case-{number}").mkdir()
            row = run_case(case, data, checkpoint, root / f"case-{number}", options.smoke)
            rows.append(row)
            if not options.json:
                print_row(row)
    if options.json:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    else:
        print(json.dumps(machine()), file=sys.stderr)


if __name__ == "__main__":
    main()
