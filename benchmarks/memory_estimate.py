"""How close is `gpt2cli.training.memory.training_memory` to a real CPU step? For each shape, a fresh process builds the
model, optimizer and data, then runs two training steps; the peak resident memory those add (VmHWM after
resetting it, less VmRSS before the model is built) is compared with the estimate.

    python benchmarks/memory_estimate.py            # a table on stdout; about a minute on two cores
"""

from __future__ import annotations

import json
import subprocess
import sys

SHAPES = [  # n_layer, n_head, n_embd, seq_len, batch_size, dtype
    (2, 2, 128, 128, 8, "float32"),
    (4, 4, 256, 256, 8, "float32"),  # the default run
    (4, 4, 256, 512, 16, "float32"),
    (6, 6, 384, 256, 16, "float32"),
    (12, 12, 768, 128, 4, "float32"),  # GPT-2 124M
    (4, 4, 256, 256, 8, "bfloat16"),
]

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from gpt2cli.runtime.devices import resolve_precision
from gpt2cli.training.memory import training_memory
from gpt2cli.settings.sections import load_settings
from gpt2cli.data.inputs import TokenData
from gpt2cli.training.setup import prepare_trainer

n_layer, n_head, n_embd, seq_len, batch, dtype, out = json.loads(sys.argv[1])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
tokens = np.random.default_rng(0).integers(0, 50257, 200_000).astype(np.uint16)
data = TokenData(train=[tokens], val=[], sources=["random"])
settings = load_settings(None, {
    "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": seq_len},
    "train": {"batch_size": batch, "seq_len": seq_len, "device": "cpu", "dtype": dtype, "val_fraction": 0.0,
              "memory_check": False, "out": out},
})
precision = resolve_precision(dtype, torch.device("cpu"))
torch.zeros(1).sum()  # torch's own start-up allocations before the baseline
baseline = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
trainer = prepare_trainer(settings, data, Path(out), precision)
for _ in range(2):
    trainer._train_step()
measured = status("VmHWM:") - baseline
config = trainer.model.config
estimate = training_memory(config, batch, seq_len, precision.compute_bytes)
print(json.dumps({"measured": measured, "estimate": estimate.total_bytes, "state": estimate.state_bytes,
                  "activations": estimate.activation_bytes}))
"""


def main() -> None:
    import tempfile

    print(f"{'shape':<32} {'measured MiB':>13} {'estimate MiB':>13} {'error':>7}")
    for shape in SHAPES:
        with tempfile.TemporaryDirectory() as folder:
            argument = json.dumps([*shape, f"{folder}/run"])
            result = subprocess.run([sys.executable, "-c", CHILD, argument], capture_output=True, text=True)
        if result.returncode:
            print(result.stderr, file=sys.stderr)
            continue
        row = json.loads(result.stdout.splitlines()[-1])
        label = "L{}/H{}/C{} T{} B{} {}".format(*shape)
        error = row["estimate"] / row["measured"] - 1
        print(
            f"{label:<32} {row['measured'] / 2**20:>13.0f} {row['estimate'] / 2**20:>13.0f} {error:>+7.0%}", flush=True
        )


if __name__ == "__main__":
    main()
