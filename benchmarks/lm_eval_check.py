"""Check: lm-evaluation-harness scores a checkpoint through `gpt2 serve` as it scores the exported transformers folder.

Three local tasks (`benchmarks/lm_eval_tasks/`: multiple choice, rolling perplexity over documents longer than the
context, greedy generation up to the end of the line) run twice with the same harness:

  1. `--model local-completions` against `gpt2 serve CHECKPOINT`, with no tokenizer argument: the harness finds the
     server's tokenizer itself (`/tokenizer_info`, `/tokenize`, `/detokenize`) and sends token ids;
  2. `--model hf` on the folder `gpt2 convert CHECKPOINT FOLDER/` exports (transformers, float32, CPU).

It prints each metric side by side, and how many per-document results (log-likelihoods, generated text) agree.
lm-eval is heavy, so it lives in a virtual environment of its own (created on first use; torch and transformers
come from this interpreter's environment through a `.pth` line, nothing of theirs is installed again). No
network is needed beyond the package index the first time.

  python benchmarks/lm_eval_check.py                      # a small random model (2 layers, 1024 positions)
  python benchmarks/lm_eval_check.py runs/shakespeare     # any checkpoint `gpt2 serve` takes
  python benchmarks/lm_eval_check.py --limit 4 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import site
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TASKS_FOLDER = HERE / "lm_eval_tasks"
TASKS = ("gpt2cli_choice", "gpt2cli_rolling", "gpt2cli_generation")
LM_EVAL = "lm-eval[api,hf]==0.4.13"  # the version whose remote-tokenizer contract tests/serving/test_chat.py follows
RELATIVE_TOLERANCE = 1e-4  # float32 on one machine: the two backends differ only by the order of sums


def ensure_lm_eval(venv: Path) -> Path:
    """The python of a virtual environment with lm-eval, made if missing; it sees this environment's packages."""
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import lm_eval, accelerate"], capture_output=True).returncode == 0
    ):
        return python
    print(f"lm_eval_check: installing {LM_EVAL} into {venv}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    packages = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # addsitedir (not a bare path) also runs this environment's .pth files (editable installs); the venv's own
    # packages stay first on sys.path.
    parents = [path for path in site.getsitepackages() if Path(path).is_dir()]
    line = "import site; " + "; ".join(f"site.addsitedir({path!r})" for path in parents) + "\n"
    (Path(packages) / "gpt2cli-parent-env.pth").write_text(line)
    subprocess.run([python, "-m", "pip", "install", "--quiet", LM_EVAL], check=True)
    return python


def build_checkpoint(folder: Path) -> Path:
    """A small random model with GPT-2's full context, so that 1024-token windows are real."""
    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    return save_model(GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=128)), folder / "random.safetensors")


def context_of(checkpoint: Path) -> int:
    from gpt2cli import load_model

    return load_model(str(checkpoint)).config.block_size


class Server:
    """`gpt2 serve CHECKPOINT --port 0` in its own process, until `stop`."""

    def __init__(self, checkpoint: Path, name: str) -> None:
        command = [sys.executable, "-m", "gpt2cli", "serve", str(checkpoint), "--port", "0", "--model-name", name]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                if " on http://" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.stop()
            raise RuntimeError("gpt2 serve did not start:\n" + "".join(self.lines))
        self.url = next(line for line in self.lines if " on http://" in line).split(" on ")[1].split()[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def run_harness(python: Path, model: str, model_args: str, output: Path, limit: int | None) -> dict[str, Any]:
    """One `lm_eval` run of the three tasks; its results and, per task, its per-document samples."""
    command = [
        python,
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        TASKS_FOLDER,
        "--output_path",
        output,
        "--log_samples",
        "--seed",
        "1234",
    ]
    if model == "hf":
        command += ["--device", "cpu", "--batch_size", "1"]
    if limit is not None:
        command += ["--limit", str(limit)]
    environment = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"lm_eval_check: lm_eval --model {model} --model_args {model_args}", file=sys.stderr, flush=True)
    # The data files are named relative to the tasks' folder.
    subprocess.run(command, cwd=TASKS_FOLDER, env=environment, check=True)
    results = json.loads(max(output.rglob("results_*.json")).read_text())
    samples = {}
    for task in TASKS:
        (path,) = sorted(output.rglob(f"samples_{task}_*.jsonl"))[-1:]
        samples[task] = {record["doc_id"]: record for record in map(json.loads, path.read_text().splitlines())}
    return {"results": results["results"], "samples": samples}


def number(value: Any) -> float | None:
    """A number, or the text of one (the harness logs a sample's log-likelihoods as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value) if isinstance(value, str) and value.strip() not in ("True", "False") else None
    except ValueError:
        return None


def same(a: Any, b: Any) -> bool:
    """Equal text, or numbers within the tolerance, through nested lists (a sample's `filtered_resps`)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    x, y = number(a), number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-6)
    return a == b


def compare(served: dict[str, Any], exported: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task in TASKS:
        ours, theirs = served["results"][task], exported["results"][task]
        documents = served["samples"][task]
        agreeing = sum(
            same(record["filtered_resps"], exported["samples"][task][doc]["filtered_resps"])
            for doc, record in documents.items()
        )
        for metric in sorted(ours):
            if metric in ("alias", "sample_len") or "stderr" in metric or not isinstance(ours[metric], int | float):
                continue
            rows.append(
                {
                    "task": task,
                    "metric": metric.removesuffix(",none"),
                    "gpt2_serve": ours[metric],
                    "transformers": theirs[metric],
                    "equal": same(ours[metric], theirs[metric]),
                    "documents_agreeing": f"{agreeing}/{len(documents)}",
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint gpt2 serve takes (default: a small random model)")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "gpt2cli-lm-eval-venv")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the export and the harness's outputs here")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()

    python = ensure_lm_eval(arguments.venv)
    with tempfile.TemporaryDirectory(prefix="lm-eval-check-") as scratch:
        work = arguments.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = Path(arguments.checkpoint) if arguments.checkpoint else build_checkpoint(work)
        exported = work / "exported"
        subprocess.run([sys.executable, "-m", "gpt2cli", "convert", checkpoint, exported], check=True)
        max_length = min(1024, context_of(checkpoint))  # the harness's default of 2048 is past GPT-2's context
        server = Server(checkpoint, "checked")
        try:
            served = run_harness(
                python,
                "local-completions",
                f"base_url={server.url}/v1/completions,model=checked,max_length={max_length},tokenized_requests=True",
                work / "served",
                arguments.limit,
            )
        finally:
            server.stop()
        transformers = run_harness(
            python,
            "hf",
            # The API backend keeps one position for the generated token and windows rolling text one shorter
            # still (`TemplateAPI`: max_length - 1, then max_seq_len=max_length - 1): the same windows here.
            f"pretrained={exported},dtype=float32,max_length={max_length - 2}",
            work / "transformers",
            arguments.limit,
        )
    rows = compare(served, transformers)
    if arguments.json:
        print(json.dumps({"max_length": max_length, "rows": rows}, indent=2))
    else:
        print(f"{'task':<20} {'metric':<16} {'gpt2 serve':>14} {'transformers':>14}  equal  documents agreeing")
        for row in rows:
            print(
                f"{row['task']:<20} {row['metric']:<16} {row['gpt2_serve']:>14.6g} {row['transformers']:>14.6g}  "
                f"{'yes' if row['equal'] else 'NO':<5}  {row['documents_agreeing']}"
            )
    return 0 if all(row["equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
