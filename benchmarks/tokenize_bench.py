"""Benchmark: `gpt2 tokenize FILE -o out.bin` against a naive single-threaded tiktoken script.

What it measures: the wall-clock time of two whole processes (interpreter start-up, imports, building
the GPT-2 encoding, reading, encoding and writing included) that turn the same ~20 MB text file into
the same llm.c token shard (1024-byte header of 256 little-endian int32 - 20240520, 1, token count,
zeros - then `<|endoftext|>` and the text's ids as uint16):

  ours   `gpt2 tokenize BIG.txt -o ours.bin` (streams 1 MB chunks to tiktoken on every core)
  peer   a plain script: tiktoken `encode_ordinary` on one thread, ids written with numpy

The text is the Shakespeare corpus shipped in the package (`gpt2cli/assets/shakespeare.txt.gz`),
repeated and cut at a line break to `--size-mb` (10^6 bytes). Each side runs once to warm the page
cache, then `--reps` times, interleaved; the two outputs are checked to be byte-identical after every
run. GPT2_* environment variables are removed for both, so `gpt2` runs with its defaults.

Run it from the repository root with the project's interpreter:

  python benchmarks/tokenize_bench.py                  # ~20 MB, 3 timed runs each, a table
  python benchmarks/tokenize_bench.py --size-mb 50 --reps 5 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "gpt2cli" / "assets"
CORPUS = ASSETS / "shakespeare.txt.gz"
VOCAB = ASSETS / "gpt2.tiktoken"
MB = 10**6

# The peer: what one would write without gpt2cli. It gets the vocabulary path, the split pattern,
# the input and the output on its command line, and imports only tiktoken and numpy.
PEER_SOURCE = """\
import base64
import sys

import numpy as np
import tiktoken

vocab_path, pattern, text_path, out_path = sys.argv[1:5]
ranks = {}
with open(vocab_path, "rb") as handle:
    for line in handle:
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
encoding = tiktoken.Encoding(
    name="gpt2",
    pat_str=pattern,
    mergeable_ranks=ranks,
    special_tokens={"<|endoftext|>": 50256},
    explicit_n_vocab=50257,
)
with open(text_path, "rb") as handle:
    text = handle.read().decode("utf-8")
ids = encoding.encode_ordinary(text)
tokens = np.empty(len(ids) + 1, dtype="<u2")
tokens[0] = 50256
tokens[1:] = ids
header = np.zeros(256, dtype="<i4")
header[:3] = (20240520, 1, tokens.size)
with open(out_path, "wb") as handle:
    handle.write(header.tobytes())
    handle.write(tokens.tobytes())
"""


class Timing(NamedTuple):
    name: str
    command: list[str]
    shown: str  # the command as printed: temporary folder as $TMP, the split regex by name
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.mean(self.seconds)


def split_pattern() -> str:
    """GPT-2's pre-tokenizer regex, exactly as gpt2cli uses it."""
    from gpt2cli.data.tokenizer import SPLIT_PATTERN

    return SPLIT_PATTERN


def build_text(path: Path, size_bytes: int) -> int:
    """Write the shipped corpus, repeated and cut at a line break, to `path`; returns its size."""
    corpus = gzip.decompress(CORPUS.read_bytes())
    copies = -(-size_bytes // len(corpus))
    data = corpus * copies
    cut = data.rfind(b"\n", 0, size_bytes) + 1 or len(data)
    path.write_bytes(data[:cut])
    return cut


def gpt2_command() -> list[str]:
    """The installed `gpt2` next to this interpreter, or `python -m gpt2cli`."""
    script = Path(sys.executable).parent / "gpt2"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gpt2cli"]


def child_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("GPT2_")}


def shown(command: list[str], work: Path) -> str:
    """A command as a reader would type it: $TMP for the temporary folder, the regex by name, repo-relative paths."""
    pattern = split_pattern()
    words = ["SPLIT_PATTERN" if word == pattern else word for word in command]
    return " ".join(words).replace(str(work), "$TMP").replace(str(REPO) + os.sep, "")


def run_once(command: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one whole process; a failure stops the benchmark."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return seconds


def check_identical(ours: Path, peer: Path) -> int:
    """Raise unless the two shards are byte-identical; returns the token count in the header."""
    data = ours.read_bytes()
    if data != peer.read_bytes():
        raise AssertionError(f"{ours} and {peer} differ: the comparison would not be fair")
    return int.from_bytes(data[8:12], "little")


def measure(commands: dict[str, list[str]], outputs: dict[str, Path], reps: int) -> tuple[list[Timing], int]:
    """One warm-up each, then `reps` interleaved timed runs; fresh outputs are compared after each round."""
    env = child_environment()
    work = outputs["ours"].parent
    timings = [Timing(name, command, shown(command, work), []) for name, command in commands.items()]
    for round_index in range(reps + 1):
        label = "warm-up" if round_index == 0 else f"run {round_index}/{reps}"
        for path in outputs.values():
            path.unlink(missing_ok=True)  # a stale file from the last round must not pass the check
        for timing in timings:
            seconds = run_once(timing.command, env)
            if round_index:
                timing.seconds.append(seconds)
            print(f"  {label:>9}  {timing.name:<4} {seconds:7.2f} s", file=sys.stderr, flush=True)
        tokens = check_identical(outputs["ours"], outputs["peer"])
    return timings, tokens


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tiktoken": version("tiktoken"),
        "gpt2cli": version("gpt2cli"),
    }


def report(timings: list[Timing], size: int, tokens: int, reps: int) -> dict[str, Any]:
    ours, peer = timings
    sides = {
        timing.name: {
            "command": timing.shown,
            "seconds": [round(s, 3) for s in timing.seconds],
            "median_s": round(timing.median, 3),
            "mean_s": round(timing.mean, 3),
            "mb_per_s": round(size / MB / timing.median, 2),
        }
        for timing in timings
    }
    return {
        "benchmark": "tokenize",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "input": {"source": str(CORPUS.relative_to(REPO)), "bytes": size, "tokens": tokens},
        "reps": reps,
        **sides,
        "ratio_peer_over_ours": round(peer.median / ours.median, 2),
        "ratio_of_means": round(peer.mean / ours.mean, 2),
        "outputs_identical": True,  # measure() raises otherwise
    }


def print_table(result: dict[str, Any]) -> None:
    facts = result["machine"]
    size = result["input"]["bytes"]
    print(f"tokenize benchmark, {result['date']}")
    print(f"machine:  {facts['cpu']}, {facts['cores']} cores ({facts['usable_cores']} usable), {facts['platform']}")
    print(f"software: python {facts['python']}, tiktoken {facts['tiktoken']}, gpt2cli {facts['gpt2cli']}")
    source, tokens = result["input"]["source"], result["input"]["tokens"]
    print(f"input:    {size / MB:.1f} MB ({size:,} bytes) of {source}; {tokens:,} tokens with <|endoftext|>")
    print(f"runs:     1 warm-up + {result['reps']} timed each, whole processes, wall clock")
    print()
    print(f"{'':<5} {'median s':>9} {'mean s':>8} {'MB/s':>7}  runs (s)")
    for name in ("ours", "peer"):
        side = result[name]
        runs = " ".join(f"{s:.2f}" for s in side["seconds"])
        print(f"{name:<5} {side['median_s']:>9.2f} {side['mean_s']:>8.2f} {side['mb_per_s']:>7.1f}  {runs}")
    print()
    print(f"ours: {result['ours']['command']}")
    print(f"peer: {result['peer']['command']}")
    print(f"ratio peer/ours: {result['ratio_peer_over_ours']:.2f}x (medians), {result['ratio_of_means']:.2f}x (means)")
    print("outputs: byte-identical after every run (checked)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=20, help="input size in MB (10^6 bytes; default 20)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each side after one warm-up (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.reps < 1:
        parser.error("--size-mb must be positive and --reps at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pattern = split_pattern()
    with tempfile.TemporaryDirectory(prefix="gpt2-tokenize-bench-") as folder:
        work = Path(folder)
        text = work / "BIG.txt"
        size = build_text(text, int(args.size_mb * MB))
        peer_script = work / "peer.py"
        peer_script.write_text(PEER_SOURCE)
        outputs = {"ours": work / "ours.bin", "peer": work / "peer.bin"}
        commands = {
            "ours": [*gpt2_command(), "tokenize", str(text), "-o", str(outputs["ours"])],
            "peer": [sys.executable, str(peer_script), str(VOCAB), pattern, str(text), str(outputs["peer"])],
        }
        print(f"input: {size / MB:.1f} MB in {text}", file=sys.stderr, flush=True)
        timings, tokens = measure(commands, outputs, args.reps)
    result = report(timings, size, tokens, args.reps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
