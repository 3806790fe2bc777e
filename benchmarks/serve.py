"""Benchmark: `gpt2 serve` throughput and time to first token at 1, 4 and 16 concurrent clients.

The `gpt2` preset (124M) with random weights (seed 0), float32 on this machine. Each client streams one completion
of 128 tokens (greedy, `ignore_eos`) from its own 16-token prompt; all clients of a round start together. Reported
per round: generated tokens/s over all clients (tokens ÷ the round's wall time), time to first token p50/p95, and
for one client its decode rate (tokens after the first ÷ the time after the first). The reference is `gpt2 sample`'s
own decode rate for the same model, prompt length and token count (its stderr report; its own process).

Targets (#17): 16 clients ≥ 4× one client's generated tokens/s; one client ≥ 90% of `gpt2 sample`'s decode speed.

With `--prompt-lookup N` the same rounds run again against a second server started with `--prompt-lookup N`: its
tokens/s against the plain server's per round (ratio > 1: drafting pays), and whether every client's greedy text is
the same on both (it must be).

  python benchmarks/serve.py              # table
  python benchmarks/serve.py --json
  python benchmarks/serve.py --prompt-lookup 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

NEW_TOKENS = 128
PROMPT_TOKENS = 16
CONCURRENCY = (1, 4, 16)


def build_checkpoint(folder: Path) -> Path:
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    return save_model(GPT2(GPT2Config()), folder / "gpt2-random.safetensors")


def prompt(client: int) -> list[int]:
    return [1000 + 37 * client + i for i in range(PROMPT_TOKENS)]


def sample_decode_rate(checkpoint: Path) -> float:
    """`gpt2 sample`'s decode tokens/s, as it reports it, for the same prompt length and token count."""
    from gpt2cli import get_tokenizer

    text = get_tokenizer().decode(prompt(0))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2cli",
            "sample",
            str(checkpoint),
            "--prompt",
            text,
            "--temperature",
            "0",
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--ignore-eot",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"decode: (\d+) tokens in [\d.]+ s \(([\d,.]+) tok/s\)", result.stderr)
    assert match, result.stderr
    return float(match.group(2).replace(",", ""))


class Server:
    def __init__(self, checkpoint: Path, max_batch: int, *flags: str) -> None:
        command = [sys.executable, "-m", "gpt2cli", "serve", str(checkpoint), "--port", "0"]
        self.process = subprocess.Popen(
            [*command, "--max-batch", str(max_batch), *flags],
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                if " on http://" in line and not self.url:
                    self.url = line.split(" on ")[1].split()[0]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def stream_one(url: str, ids: list[int]) -> dict[str, Any]:
    """One streamed completion: seconds to the first token, total seconds, tokens received, its text."""
    body = {
        "prompt": ids,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, tokens, text = None, 0, ""
    with httpx.Client(timeout=600) as client, client.stream("POST", f"{url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):  # the last chunk: the count of generated tokens
                tokens = chunk["usage"]["completion_tokens"]
            else:
                text += chunk["choices"][0]["text"]
                if first is None:
                    first = time.perf_counter() - started
    return {"ttft": first or 0.0, "total": time.perf_counter() - started, "tokens": tokens, "text": text}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_round(url: str, clients: int) -> dict[str, Any]:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda c: stream_one(url, prompt(c)), range(clients)))
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    row = {
        "clients": clients,
        "generated_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "texts": [r["text"] for r in results],
    }
    if clients == 1:
        only = results[0]
        row["decode_tokens_per_s"] = round((only["tokens"] - 1) / (only["total"] - only["ttft"]), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--prompt-lookup", type=int, default=None, metavar="N", help="also time --prompt-lookup N")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_checkpoint(Path(folder))
        print("timing gpt2 sample ...", file=sys.stderr)
        reference = sample_decode_rate(checkpoint)
        server = Server(checkpoint, max_batch=max(CONCURRENCY))
        try:
            stream_one(server.url, prompt(99))  # warm-up
            rounds = []
            for clients in CONCURRENCY:
                print(f"{clients} client(s) ...", file=sys.stderr)
                rounds.append(run_round(server.url, clients))
        finally:
            server.stop()
        drafted = []
        if args.prompt_lookup is not None:
            server = Server(checkpoint, max(CONCURRENCY), "--prompt-lookup", str(args.prompt_lookup))
            try:
                stream_one(server.url, prompt(99))
                for clients in CONCURRENCY:
                    print(f"{clients} client(s), --prompt-lookup {args.prompt_lookup} ...", file=sys.stderr)
                    drafted.append(run_round(server.url, clients))
            finally:
                server.stop()
    one, many = rounds[0], rounds[-1]
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "gpt2_sample_decode_tokens_per_s": reference,
        "rounds": rounds,
        "scaling_16_vs_1": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        "one_client_vs_sample": round(one["decode_tokens_per_s"] / reference, 3),
    }
    if drafted:
        report["prompt_lookup"] = {
            "n": args.prompt_lookup,
            "rounds": drafted,
            "vs_plain": [round(d["tokens_per_s"] / r["tokens_per_s"], 2) for d, r in zip(drafted, rounds, strict=True)],
            "same_text": all(d["texts"] == r["texts"] for d, r in zip(drafted, rounds, strict=True)),
        }
    for row in [*rounds, *drafted]:
        del row["texts"]  # compared above; not part of the report
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"gpt2 sample decode: {reference:.1f} tokens/s")
    print("| clients | generated tokens/s | TTFT p50 | TTFT p95 | wall |")
    print("| --- | --- | --- | --- | --- |")
    for row in rounds:
        print(
            f"| {row['clients']} | {row['tokens_per_s']:.1f} | {row['ttft_p50_s']:.3f} s | {row['ttft_p95_s']:.3f} s "
            f"| {row['wall_s']:.1f} s |"
        )
    print(
        f"16 clients / 1 client: {report['scaling_16_vs_1']}x (target >= 4x); one client's decode "
        f"{one['decode_tokens_per_s']:.1f} tokens/s = {report['one_client_vs_sample']:.0%} of gpt2 sample "
        "(target >= 90%)"
    )
    if drafted:
        lookup = report["prompt_lookup"]
        ratios = ", ".join(
            f"{row['clients']} client(s) {row['tokens_per_s']:.1f} tokens/s ({ratio}x)"
            for row, ratio in zip(drafted, lookup["vs_plain"], strict=True)
        )
        print(f"--prompt-lookup {lookup['n']}: {ratios}; same greedy text as plain: {lookup['same_text']}")


if __name__ == "__main__":
    main()
