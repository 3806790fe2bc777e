"""Benchmark: batch-1 greedy decoding with `gpt2cli`'s sampler against transformers' `generate` (KV cache on both).

The `gpt2` preset (124M) with random weights (seed 0, built by transformers and converted, so both hold the same
weights), a 16-token prompt, 128 new tokens, greedy. Each contender runs in its own process, once to warm up and
then `--reps` times; decode tokens/s excludes the prompt. Also printed: the machine's copy bandwidth and the limit it
implies (weight bytes per token ÷ copy bandwidth, the issue's definition), its read bandwidth (summing a 1 GiB
buffer) and the tighter limit that one implies for every contender, transformers included, and the perplexity change
that bf16 and int8 weights cost on the first 8,192 tokens of the bundled Shakespeare (random weights: a measure of
numerical error only).

  python benchmarks/sample.py                # table
  python benchmarks/sample.py --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPT = list(range(1000, 1016))
NEW_TOKENS = 128
CONTENDERS = ("hf-fp32", "ours-fp32", "ours-bf16", "ours-int8")


def build_checkpoint(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder / "hf")
    return folder / "hf"


def time_hf(folder: Path, reps: int) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = torch.tensor([PROMPT])

    def run(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=50256)  # fmt: skip
        assert out.shape[1] == len(PROMPT) + new_tokens
        return time.perf_counter() - started

    run(8)
    rates = []
    for _ in range(reps):  # decode rate: the time of 128 tokens minus the time of the prompt and first token
        total, first = run(NEW_TOKENS), run(1)
        rates.append((NEW_TOKENS - 1) / (total - first))
    return {"decode_tokens_per_s": statistics.median(rates), "runs": rates}


def time_ours(folder: Path, reps: int, variant: str) -> dict[str, Any]:
    import torch

    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.devices import keep_freed_memory
    from gpt2cli.quantize import quantize_int8
    from gpt2cli.sampling import SamplingOptions, TextGenerator, Timing

    keep_freed_memory(torch.device("cpu"))
    model = load_model(folder, dtype=torch.bfloat16 if variant == "bf16" else torch.float32)
    if variant == "int8":
        quantize_int8(model)
    text_generator = TextGenerator(model, get_tokenizer())
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eot=True)
    text_generator.generate([PROMPT], SamplingOptions(max_new_tokens=8, temperature=0.0, ignore_eot=True))
    rates, completion = [], None
    for _ in range(reps):
        timing = Timing()
        completion = text_generator.generate([PROMPT], options, timing=timing)[0]
        rates.append(timing.decode_tokens_per_s)
    assert completion is not None and len(completion.token_ids) == NEW_TOKENS
    return {"decode_tokens_per_s": statistics.median(rates), "runs": rates, "perplexity": perplexity(model)}


def perplexity(model: Any) -> float:
    import math

    import torch

    from gpt2cli import get_tokenizer

    text = gzip.decompress((REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz").read_bytes()).decode()
    tokens = torch.tensor(get_tokenizer().encode(text[:60_000])[: 8 * 1024 + 1])
    windows = tokens[:-1].view(8, 1024), tokens[1:].view(8, 1024)
    with torch.inference_mode():
        logits, _ = model(windows[0])
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), windows[1].reshape(-1))
    return math.exp(loss.item())


def read_bandwidth() -> float:
    """Bytes read per second from a 1 GiB buffer (a sum: every byte read once, nothing written)."""
    import torch

    source = torch.ones(1 << 28)
    source.sum()
    started = time.perf_counter()
    for _ in range(5):
        source.sum()
    return 5 * source.numel() * 4 / (time.perf_counter() - started)


def copy_bandwidth() -> float:
    """Bytes copied per second for a 1 GiB buffer (read once, written once)."""
    import torch

    source = torch.ones(1 << 28)
    target = torch.empty_like(source)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    return 5 * source.numel() * 4 / (time.perf_counter() - started)


# ---------------------------------------------------------------- prompt lookup (`gpt2 sample --prompt-lookup N`)

LOOKUP_DRAFTS = (4, 10)  # draft lengths measured (transformers' default is 10)
LOOKUP_RUN = REPO / "runs" / "sample-bench-default"  # the default run, trained here when no --checkpoint is given


def lookup_prompt(tokenizer: Any) -> tuple[list[int], list[int]]:
    """An input-grounded prompt: a 100-token passage of the bundled Shakespeare, a blank line, and the passage's
    first 8 tokens again, so that the continuation that repeats the passage is the likely one. Also the rest of the
    passage (the tokens a perfect copy would produce)."""
    text = gzip.decompress((REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz").read_bytes()).decode()
    start = text.index("\n\n", 500_000) + 2
    passage = tokenizer.encode(text[start : start + 2_000])[:100]
    return passage + tokenizer.encode("\n\n") + passage[:8], passage[8:]


def trained_checkpoint(path: str | None) -> Path:
    """The checkpoint given, or the default run (`gpt2 train` with no settings), trained into runs/ if missing."""
    if path is not None:
        return Path(path)
    if not (LOOKUP_RUN / "model.safetensors").is_file():
        print(f"training the default run into {LOOKUP_RUN} (5-7 minutes) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "gpt2cli", "train", "--out", str(LOOKUP_RUN)], check=True)
    return LOOKUP_RUN


def prompt_lookup_section(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Plain greedy against `--prompt-lookup N` greedy on the trained checkpoint, float32, batch 1, NEW_TOKENS new
    tokens, the runs interleaved (plain, N=4, N=10, plain, ...) so that a loaded machine slows all alike."""
    import torch

    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.sampling import SamplingOptions, TextGenerator, Timing

    checkpoint = trained_checkpoint(getattr(args, "checkpoint", None))
    print(f"running prompt lookup on {checkpoint} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(checkpoint, dtype=torch.float32), get_tokenizer()
    prompt, passage = lookup_prompt(tokenizer)
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eot=True)
    generators = {0: TextGenerator(model, tokenizer)}
    generators.update({draft: TextGenerator(model, tokenizer, prompt_lookup=draft) for draft in LOOKUP_DRAFTS})
    for generator in generators.values():  # warm-up
        generator.generate([prompt], SamplingOptions(max_new_tokens=8, temperature=0.0, ignore_eot=True))
    rates: dict[int, list[float]] = {draft: [] for draft in generators}
    outputs, timings = {}, {}
    for _ in range(args.reps):
        for draft, generator in generators.items():
            timings[draft] = Timing()
            outputs[draft] = generator.generate([prompt], options, timing=timings[draft])[0].token_ids
            rates[draft].append(timings[draft].decode_tokens_per_s)
    same = [a == b for a, b in zip(outputs[0], passage, strict=False)]
    copied = same.index(False) if False in same else len(same)
    plain = statistics.median(rates[0])
    report["prompt_lookup"] = {
        "checkpoint": str(checkpoint),
        "prompt_tokens": len(prompt),
        "copied_tokens": copied,  # how much of the passage plain greedy reproduces before it departs
        "plain_tokens_per_s": plain,
        "plain_runs": rates[0],
        "drafts": {
            str(draft): {
                "tokens_per_s": statistics.median(rates[draft]),
                "runs": rates[draft],
                "speedup": statistics.median(rates[draft]) / plain,
                "speedup_per_pair": statistics.median(r / p for r, p in zip(rates[draft], rates[0], strict=True)),
                "acceptance_rate": timings[draft].acceptance_rate,
                "tokens_per_pass": timings[draft].tokens_per_pass,
                "identical": outputs[draft] == outputs[0],
            }
            for draft in LOOKUP_DRAFTS
        },
    }


def print_prompt_lookup(report: dict[str, Any]) -> None:
    lookup = report["prompt_lookup"]
    print(f"\nprompt lookup: {lookup['checkpoint']}, float32, batch 1, {lookup['prompt_tokens']}-token prompt "
          f"(a passage, then its start again), {NEW_TOKENS} new tokens, greedy; plain greedy copies "
          f"{lookup['copied_tokens']} tokens of the passage")  # fmt: skip
    print(f"{'decoder':<16} {'tok/s':>8} {'speedup':>8} {'accepted':>8} {'tok/pass':>8} {'identical':>9}")
    print(f"{'plain greedy':<16} {lookup['plain_tokens_per_s']:>8.1f}")
    for draft, r in lookup["drafts"].items():
        print(f"{'--prompt-lookup ' + draft:<16} {r['tokens_per_s']:>8.1f} {r['speedup_per_pair']:>7.2f}x "
              f"{r['acceptance_rate']:>8.0%} {r['tokens_per_pass']:>8.2f} "
              f"{'yes' if r['identical'] else 'NO':>9}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--checkpoint", help="Trained checkpoint for prompt lookup (default: train the default run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder = Path(args.folder)
        if args.worker == "hf-fp32":
            print(json.dumps(time_hf(folder, args.reps)))
        elif args.worker == "bandwidth":
            print(json.dumps({"copy_bytes_per_s": copy_bandwidth(), "read_bytes_per_s": read_bandwidth()}))
        else:
            print(json.dumps(time_ours(folder, args.reps, args.worker.removeprefix("ours-"))))
        return

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpt2-sample-bench-") as temporary:
        folder = build_checkpoint(Path(temporary))
        for name in (*CONTENDERS, "bandwidth"):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--worker", name, "--folder", str(folder), "--reps", str(args.reps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(output.strip().splitlines()[-1])
    measured = results.pop("bandwidth")
    bandwidth, read = measured["copy_bytes_per_s"], measured["read_bytes_per_s"]
    weight_bytes = {"fp32": 124_439_808 * 4, "bf16": 124_439_808 * 2, "int8": 124_439_808 * 1}
    hf = results["hf-fp32"]["decode_tokens_per_s"]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "copy_GB_per_s": round(bandwidth / 1e9, 2),
        "read_GB_per_s": round(read / 1e9, 2),
        "results": results,
    }
    prompt_lookup_section(args, report)
    results["hf-fp32"]["fraction_of_read_limit"] = hf / (read / weight_bytes["fp32"])
    for name in CONTENDERS[1:]:
        variant = name.removeprefix("ours-")
        limit = bandwidth / weight_bytes[variant]
        rate = results[name]["decode_tokens_per_s"]
        results[name].update(
            vs_transformers=rate / hf,
            bandwidth_limit_tokens_per_s=limit,
            fraction_of_limit=rate / limit,
            read_limit_tokens_per_s=read / weight_bytes[variant],
            fraction_of_read_limit=rate / (read / weight_bytes[variant]),
            perplexity_change=results[name]["perplexity"] / results["ours-fp32"]["perplexity"] - 1,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"sample benchmark {report['date']}: 124M random weights, batch 1, 16-token prompt, {NEW_TOKENS} new tokens, "
          f"greedy; copy bandwidth {bandwidth / 1e9:.1f} GB/s, read bandwidth {read / 1e9:.1f} GB/s")  # fmt: skip
    print(f"{'contender':<10} {'decode tok/s':>12} {'vs hf':>6} {'limit tok/s':>11} {'of limit':>8} "
          f"{'read limit':>10} {'of read':>7} {'ppl change':>10}")  # fmt: skip
    hf_read = results["hf-fp32"]["fraction_of_read_limit"]
    print(f"{'hf-fp32':<10} {hf:>12.1f} {'':>6} {'':>11} {'':>8} {read / weight_bytes['fp32']:>10.1f} {hf_read:>7.0%}")
    for name in CONTENDERS[1:]:
        r = results[name]
        print(f"{name:<10} {r['decode_tokens_per_s']:>12.1f} {r['vs_transformers']:>5.2f}x "
              f"{r['bandwidth_limit_tokens_per_s']:>11.1f} {r['fraction_of_limit']:>8.0%} "
              f"{r['read_limit_tokens_per_s']:>10.1f} {r['fraction_of_read_limit']:>7.0%} "
              f"{r['perplexity_change']:>+10.4%}")  # fmt: skip
    print_prompt_lookup(report)


if __name__ == "__main__":
    main()
