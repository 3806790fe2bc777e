"""Benchmark: `gpt2 eval` against a plain transformers perplexity loop, scored tokens per second.

The `gpt2` preset (124M) with random weights (built by transformers, seed 0), the first `--tokens` tokens of the
bundled Shakespeare, disjoint 1024-token windows (each token after the first scored once). The peer is the loop of
the transformers perplexity docs: one window at a time, `model(input_ids, labels=...)`, float32. Ours runs the real
command, `gpt2 eval CKPT text --json`, in float32 and in bfloat16; the loss difference to float32 is printed (the
target allows 1e-3).

  python benchmarks/eval.py                  # 200k tokens (several minutes on 2 cores)
  python benchmarks/eval.py --tokens 20000
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 1024


def prepare(folder: Path, tokens: int) -> tuple[Path, Path]:
    """The random-weight model and a text file of (about) `tokens` tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2cli import get_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder / "model")
    text = gzip.decompress((REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz").read_bytes()).decode()
    ids = get_tokenizer().encode(text[: tokens * 6])[:tokens]
    path = folder / "text.txt"
    path.write_text(get_tokenizer().decode(ids))
    return folder / "model", path


def peer(model_dir: Path, text: Path) -> dict[str, float]:
    """The transformers docs' perplexity loop with disjoint windows (scoring the same tokens as ours)."""
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2cli import get_tokenizer

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = torch.tensor([get_tokenizer().encode(text.read_text())])
    started = time.perf_counter()
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, ids.size(1) - 1, CONTEXT):
            inputs = ids[:, begin : begin + CONTEXT]
            targets = ids[:, begin + 1 : begin + CONTEXT + 1]
            inputs = inputs[:, : targets.size(1)]
            logits = model(inputs).logits
            total += torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum").item()
            count += targets.size(1)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": count / seconds, "loss": total / count, "tokens": count}


def ours(model_dir: Path, text: Path, dtype: str) -> dict[str, float]:
    command = [sys.executable, "-m", "gpt2cli", "eval", str(model_dir), str(text), "--dtype", dtype, "--json"]
    started = time.perf_counter()
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    seconds = time.perf_counter() - started  # the whole command: start-up, loading and tokenizing included
    return {"tokens_per_s": result["tokens"] / seconds, "loss": result["loss"], "tokens": result["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder = Path(args.folder)
        print(json.dumps(peer(folder / "model", folder / "text.txt")))
        return
    with tempfile.TemporaryDirectory(prefix="gpt2-eval-bench-") as temporary:
        folder = Path(temporary)
        model_dir, text = prepare(folder, args.tokens)
        results = {}
        for name in ("transformers-fp32", "ours-fp32", "ours-bf16"):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name.startswith("ours"):
                results[name] = ours(model_dir, text, "float32" if name.endswith("fp32") else "bfloat16")
            else:
                command = [sys.executable, __file__, "--worker", name, "--folder", str(folder)]
                results[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    base = results["transformers-fp32"]
    for name in ("ours-fp32", "ours-bf16"):
        results[name]["vs_transformers"] = results[name]["tokens_per_s"] / base["tokens_per_s"]
        results[name]["loss_difference"] = results[name]["loss"] - results["ours-fp32"]["loss"]
    assert all(math.isclose(r["tokens"], base["tokens"]) for r in results.values()), "different tokens scored"
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"eval benchmark {time.strftime('%Y-%m-%d')}: 124M random weights, {base['tokens']:,} tokens, windows of "
        f"{CONTEXT}"
    )
    print(f"{'contender':<18} {'tokens/s':>9} {'loss':>10} {'vs hf':>6} {'loss - fp32':>12}")
    for name, r in results.items():
        extra = f" {r['vs_transformers']:>5.2f}x {r['loss_difference']:>+12.2e}" if "vs_transformers" in r else ""
        print(f"{name:<18} {r['tokens_per_s']:>9.0f} {r['loss']:>10.5f}{extra}")


if __name__ == "__main__":
    main()
