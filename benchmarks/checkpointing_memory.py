"""Benchmark: the activation memory of one training forward and backward pass of GPT-2 124M (batch 1 × 1024,
float32, CPU) with and without `--activation-checkpointing`, each in a fresh process.

The whole step's peak (benchmarks/memory_estimate.py) also holds the optimizer's update, whose temporaries can set
the peak after the activations are freed; this isolates the activations: the process's peak resident memory
(VmHWM) during forward + backward minus its resident memory just before (weights built, gradients allocated by a
first pass, so both runs start from the same state).

  python benchmarks/checkpointing_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.training.loss import TrainingModel

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
checkpointed = sys.argv[1] == "yes"
model = GPT2(GPT2Config()).train()
model.set_activation_checkpointing(checkpointed)
trained = TrainingModel(model)
idx = torch.randint(0, 50257, (1, 1024))
targets = torch.roll(idx, -1, dims=1)
trained(idx, targets).backward()  # the gradients exist from here on, as after a first step
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current resident memory
before = status("VmRSS:")
trained(idx, targets).backward()
print(json.dumps({"checkpointing": checkpointed, "activation_bytes": status("VmHWM:") - before}))
"""


def main() -> None:
    results = {}
    for checkpointing in ("no", "yes"):
        output = subprocess.run(
            [sys.executable, "-c", CHILD, checkpointing], capture_output=True, text=True, check=True
        )
        results[checkpointing] = json.loads(output.stdout)["activation_bytes"]
    cut = 1 - results["yes"] / results["no"]
    print(
        f"124M, batch 1 x 1024, float32: forward+backward peak over the resident memory before it: "
        f"{results['no'] / 2**20:,.0f} MiB plain, {results['yes'] / 2**20:,.0f} MiB with checkpointing ({cut:.0%} less)"
    )


if __name__ == "__main__":
    main()
