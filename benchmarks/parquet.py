"""Benchmark: `gpt2 tokenize FILE.parquet -o out.bin` against a single-threaded pyarrow + tiktoken script.

What it measures, on a generated Parquet file of `--size-mb` (10^6 bytes) of uncompressed, non-repeating text
(documents of 1-60 Shakespeare lines drawn at random from the bundled corpus, a `text` column, snappy):

  ours   `gpt2 tokenize FILE.parquet -o ours.bin` (one encoder process per core)
  peer   a plain script: pyarrow `iter_batches` over the `text` column, tiktoken `encode_ordinary` on one thread,
         `<|endoftext|>` before each document, ids written with numpy batch by batch (llm.c's shard layout)

Both are whole processes (start-up and imports included), timed by wall clock, `--warmup` untimed rounds then
`--reps` interleaved runs; the two shards are checked byte-identical after every run. For each run the peak
resident memory of the whole process tree (the command and its worker processes, summed, sampled every 20 ms) is
recorded.
The file is written twice: with row groups of 10,000 rows, and with pyarrow's default row-group size; ours is timed
on both (the peer on the first).

  python benchmarks/parquet.py                      # 500 MB of text, 2 timed runs each, a table
  python benchmarks/parquet.py --size-mb 50 --reps 1 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz"
VOCAB = REPO / "gpt2cli" / "assets" / "gpt2.tiktoken"
MB = 10**6
ROWS_PER_GROUP = 10_000

PEER_SOURCE = """\
import base64
import sys

import numpy as np
import pyarrow.parquet as pq
import tiktoken

vocab_path, pattern, parquet_path, out_path = sys.argv[1:5]
ranks = {}
with open(vocab_path, "rb") as handle:
    for line in handle:
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
encoding = tiktoken.Encoding(
    name="gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257
)
total = 0
with open(out_path, "wb") as handle:
    handle.write(bytes(1024))
    for batch in pq.ParquetFile(parquet_path).iter_batches(columns=["text"]):
        ids = []
        for text in batch.column(0).to_pylist():
            ids.append(50256)
            ids.extend(encoding.encode_ordinary(text))
        handle.write(np.array(ids, dtype="<u2").tobytes())
        total += len(ids)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, total)
    handle.seek(0)
    handle.write(header.tobytes())
"""


def generate(path: Path, size_bytes: int, row_group_size: int | None, seed: int = 0) -> tuple[int, int]:
    """Documents of 1-60 random corpus lines until `size_bytes` of UTF-8 text; returns (rows, text bytes)."""
    lines = [line for line in gzip.decompress(CORPUS.read_bytes()).decode().splitlines() if line.strip()]
    rng = random.Random(seed)
    rows, written = 0, 0
    schema = pa.schema([("text", pa.string())])
    options = {} if row_group_size is None else {"row_group_size": row_group_size}
    with pq.ParquetWriter(path, schema) as writer:
        while written < size_bytes:
            documents = ["\n".join(rng.choices(lines, k=rng.randint(1, 60))) for _ in range(ROWS_PER_GROUP)]
            sizes = [len(doc.encode()) for doc in documents]
            written += sum(sizes)
            rows += len(documents)
            writer.write_table(pa.table({"text": documents}, schema=schema), **options)
    return rows, written


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once gone)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run(command: list[str], env: dict[str, str]) -> tuple[float, int, float]:
    """(wall seconds, peak resident bytes of the process tree, CPU seconds of the process and its workers)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = process.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)  # its rusage includes the worker processes it waited for
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()}")
    return seconds, peak, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=500.0, help="uncompressed text in the file (10^6 bytes)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the file is fresh in the cache)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from gpt2cli.data.tokenizer import SPLIT_PATTERN

    env = {key: value for key, value in os.environ.items() if not key.startswith("GPT2_")}
    with tempfile.TemporaryDirectory(prefix="gpt2-parquet-bench-") as tmp:
        folder = Path(tmp)
        grouped, default = folder / "grouped.parquet", folder / "default.parquet"
        print(f"writing {args.size_mb:g} MB of text as Parquet ...", file=sys.stderr)
        rows, text_bytes = generate(grouped, int(args.size_mb * MB), ROWS_PER_GROUP)
        pq.write_table(pq.read_table(grouped), default)  # the same rows with pyarrow's default row groups
        peer_script = folder / "peer.py"
        peer_script.write_text(PEER_SOURCE)
        ours = [sys.executable, "-m", "gpt2cli", "tokenize", str(grouped), "-o", str(folder / "ours.bin")]
        ours_default = [sys.executable, "-m", "gpt2cli", "tokenize", str(default), "-o", str(folder / "ours2.bin")]
        peer = [sys.executable, str(peer_script), str(VOCAB), SPLIT_PATTERN, str(grouped), str(folder / "peer.bin")]
        timings: dict[str, list[tuple[float, int, float]]] = {"ours": [], "ours_default_groups": [], "peer": []}
        commands = {"ours": ours, "ours_default_groups": ours_default, "peer": peer}
        for rep in range(args.warmup + args.reps):  # warm-up rounds are not kept
            for name, command in commands.items():
                print(f"round {rep + 1}/{args.warmup + args.reps}: {name}", file=sys.stderr)
                result = run(command, env)
                if rep >= args.warmup:
                    timings[name].append(result)
            for other in ("ours.bin", "ours2.bin"):
                if (folder / other).read_bytes() != (folder / "peer.bin").read_bytes():
                    raise SystemExit(f"{other} differs from the peer's shard")
        tokens = (folder / "peer.bin").stat().st_size // 2 - 512
        groups = {"grouped": pq.ParquetFile(grouped).num_row_groups, "default": pq.ParquetFile(default).num_row_groups}
        file_bytes = {"grouped": grouped.stat().st_size, "default": default.stat().st_size}

    seconds = {name: statistics.median(run[0] for run in runs) for name, runs in timings.items()}
    memory = {name: max(run[1] for run in runs) for name, runs in timings.items()}
    cpu = {name: statistics.median(run[2] for run in runs) for name, runs in timings.items()}
    result: dict[str, Any] = {
        "machine": {
            "cpu": _cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "load_average": os.getloadavg(),
        },
        "input": {
            "text_bytes": text_bytes,
            "rows": rows,
            "tokens": tokens,
            "file_bytes": file_bytes,
            "row_groups": groups,
        },
        "seconds": seconds,
        "peak_rss_bytes": memory,
        "cpu_seconds": cpu,
        "ratio_peer_over_ours": seconds["peer"] / seconds["ours"],
        "runs": timings,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"input: {text_bytes:,} bytes of text in {rows:,} rows, {tokens:,} tokens; row groups {groups}")
    for name in timings:
        speed = text_bytes / seconds[name] / MB
        print(
            f"{name:20s} {seconds[name]:8.2f} s  {speed:6.2f} MB/s  peak RSS {memory[name] / 2**20:,.0f} MiB  "
            f"CPU {cpu[name]:.1f} s"
        )
    print(f"ratio peer/ours: {result['ratio_peer_over_ours']:.2f}  (load average {os.getloadavg()[0]:.2f})")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
