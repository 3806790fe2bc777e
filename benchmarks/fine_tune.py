"""Benchmark: fine-tuning on prompt-completion records (#27). Two measurements in one run.

1. Packing: the cost of keeping packed examples apart. The same examples trained as packed rows (best fit, each
   example's positions from 0 and block-diagonal attention: `training/packing.py`) against one example per row padded
   to the window (plain causal attention, no mask), and the same packed rows without the mask (examples seeing each
   other: what the mask itself costs). Reported: examples per row, fill, time per step of 8 rows, and counted
   (completion) targets trained per second; `ratio_targets_per_s` (packed / padded) is the number to compare.

2. Masking matters: a task where the prompt is mostly noise. A prompt is 24 random filler words with one key word
   (one of 8 fruits) at a random place; the completion is that fruit's colour (" apple" -> " red"). Predicting the
   filler is impossible beyond word frequencies, so a loss on all tokens spends most of its gradient there. Two runs
   of `gpt2 train` from the same random model, the same data and the same steps, `--loss-on completion` and
   `--loss-on all`; then held-out prompts (arrangements never trained on) are answered greedily and an answer counts
   when it is exactly the colour followed by <|endoftext|>.

  python benchmarks/fine_tune.py                    # 200 steps each (about 5 minutes a run on 2 idle cores)
  python benchmarks/fine_tune.py --steps 20 --examples 200 --held-out 20   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRUITS = {
    "apple": "red",
    "banana": "yellow",
    "lime": "green",
    "plum": "purple",
    "orange": "orange",
    "coconut": "brown",
    "blueberry": "blue",
    "cherry": "pink",
}
# Filler: common words, one GPT-2 token each with their leading space.
FILLER = re.findall(
    r"\w+",
    "the a of and to in is was he for it with as his on be at by had not are but from or have an they which one you "
    "were her all she there would their we him been has when who will more no if out so said what up its",
)
MODEL = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "128"]  # three examples a window


def record(rng: random.Random) -> dict[str, str]:
    words = [rng.choice(FILLER) for _ in range(24)]
    fruit = rng.choice(sorted(FRUITS))
    words.insert(rng.randrange(len(words) + 1), fruit)
    return {"prompt": "Colour of the fruit in: " + " ".join(words) + ". Answer:", "completion": " " + FRUITS[fruit]}


def write(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train(data: Path, out: Path, loss_on: str, steps: int, cache: Path) -> None:
    command = [sys.executable, "-m", "gpt2cli", "train", str(data), *MODEL, "--batch-size", "8", "--max-steps",
               str(steps), "--lr", "3e-3", "--warmup-steps", "20", "--weight-decay", "0", "--val-fraction", "0",
               "--device", "cpu", "--dtype", "float32", "--no-compile", "--loss-on", loss_on, "--out", str(out),
               "--seed", "7", "--log-interval", "50"]  # fmt: skip
    env = {"GPT2_DATA__CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def exact_answers(weights: Path, held_out: list[dict[str, str]]) -> float:
    """The share of held-out prompts answered exactly (greedy: the colour's tokens, then <|endoftext|>)."""
    import torch

    from gpt2cli import get_tokenizer, load_model

    tokenizer = get_tokenizer()
    model = load_model(weights, device="cpu").eval()
    right = 0
    with torch.no_grad():
        for example in held_out:
            ids = tokenizer.encode(example["prompt"])
            wanted = [*tokenizer.encode(example["completion"]), tokenizer.eot_id]
            for _ in wanted:
                logits, _ = model(torch.tensor([ids]))
                ids.append(int(logits[0, -1].argmax()))
            right += ids[-len(wanted) :] == wanted
    return right / len(held_out)


def packing_cost(records: list[dict[str, str]], steps: int, seq_len: int) -> dict[str, float]:
    """Time per step and counted targets per second, packed (block-diagonal) against padded (one per row)."""
    import numpy as np
    import torch

    from gpt2cli.data.examples import PROMPT_COMPLETION, ExampleRecipe, encode_examples
    from gpt2cli.model.gpt2 import GPT2, GPT2Config
    from gpt2cli.training.batches import Batch
    from gpt2cli.training.loss import TrainingModel
    from gpt2cli.training.packing import PackedRows

    with tempfile.TemporaryDirectory() as folder:
        examples = encode_examples(
            write(Path(folder) / "d.jsonl", records), ExampleRecipe(PROMPT_COMPLETION, "completion")
        )
    packed = PackedRows(examples, seq_len)
    batch_rows = 8
    torch.manual_seed(0)
    model = TrainingModel(GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=seq_len)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def padded_batch(first: int) -> tuple[Batch, int]:
        rows = [examples.example(i) for i in range(first, first + batch_rows)]
        tokens = np.full((batch_rows, seq_len + 1), 50256, dtype=np.int64)
        targets = np.full((batch_rows, seq_len), -1, dtype=np.int64)
        for row, (ids, mask) in enumerate(rows):
            ids, mask = ids[: seq_len + 1].astype(np.int64), mask[: seq_len + 1]
            tokens[row, : len(ids)] = ids
            targets[row, : len(ids) - 1] = np.where(mask[1:] == 1, ids[1:], -1)
        return Batch(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets)), int((targets >= 0).sum())

    def timed(make_batch) -> tuple[float, float]:
        seconds, counted = 0.0, 0
        for step in range(steps + 2):
            batch, count = make_batch(step)
            started = time.perf_counter()
            loss = model(batch.inputs, batch.targets, batch.documents)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:  # two warm-up steps
                seconds += time.perf_counter() - started
                counted += count
        return seconds / steps, counted / seconds

    def packed_batch(step: int) -> tuple[Batch, int]:
        indices = np.arange(step * batch_rows, (step + 1) * batch_rows) % len(packed)
        return packed.training_batch(indices, torch.device("cpu")), packed.target_count(indices)

    def packed_unmasked(step: int) -> tuple[Batch, int]:  # the same rows, examples seeing each other: the mask's cost
        batch, count = packed_batch(step)
        return Batch(batch.inputs, batch.targets), count

    unmasked_step, _ = timed(packed_unmasked)
    packed_step, packed_rate = timed(packed_batch)
    padded_step, padded_rate = timed(lambda step: padded_batch((step * batch_rows) % (len(examples) - batch_rows)))
    return {
        "examples_per_packed_row": len(examples) / len(packed),
        "fill_packed": packed.fill,
        "fill_padded": float(examples.lengths.clip(max=seq_len + 1).mean()) / (seq_len + 1),
        "step_s_packed": packed_step,
        "step_s_packed_without_mask": unmasked_step,
        "step_s_padded": padded_step,
        "targets_per_s_packed": packed_rate,
        "targets_per_s_padded": padded_rate,
        "ratio_targets_per_s": packed_rate / padded_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run")
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--packing-steps", type=int, default=10)
    parser.add_argument("--packing-seq-len", type=int, default=256, help="the window of the packing measurement")
    options = parser.parse_args()
    rng = random.Random(0)
    records = [record(rng) for _ in range(options.examples)]
    held_out = [record(rng) for _ in range(options.held_out)]
    results: dict[str, object] = {
        "packing": packing_cost(records, options.packing_steps, options.packing_seq_len),
    }
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write(root / "train.jsonl", records)
        for loss_on in ("completion", "all"):
            started = time.perf_counter()
            train(data, root / loss_on, loss_on, options.steps, root / "cache")
            results[f"loss_on_{loss_on}"] = {
                "exact": exact_answers(root / loss_on / "model.safetensors", held_out),
                "train_s": round(time.perf_counter() - started, 1),
            }
    results["steps"] = options.steps
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
