"""GPU acceptance check: is every CUDA path of gpt2cli right, and how fast is it, on this machine's GPU?

One command for anyone with an NVIDIA GPU, after `pip install -e .` with their CUDA build of torch:

  python benchmarks/gpu_check.py                   # about 6-8 minutes on an H100/H200
  python benchmarks/gpu_check.py --device cpu --smoke   # tiny shapes on the CPU (CI runs this so it never rots)

Parts (each reported pass/fail with its numbers; a failing part never stops the others):

  parity       float32 logits of a random model on the GPU against the CPU (TF32 off, max |diff| <= 1e-4);
               `gpt2 sample --temperature 0` gives the same 64 tokens on both; `gpt2 eval` perplexity within 1e-5
  train        `gpt2 train` 50 steps of the 124M preset, bf16, --compile, batch 16 x 1024: loss falls; tokens/s, MFU
  resume       float32 with deterministic algorithms: N steps + N resumed give the losses of 2N steps, exactly
  decode       tg128 at batch 1 and 8, eager and compiled: tokens/s, CUDA graphs recorded, recompilations
  bench        `gpt2 bench --device cuda --preset gpt2 --tests train,fwd,pp512,tg128 --batch-size 1,8 --json`,
               without and with --compile: every case runs, and compiled results say so only when compiled
  distributed  with 2+ GPUs: torchrun DDP and FSDP runs give the single-process losses

Targets (reported, not failures): training MFU >= 50%; compiled decode >= 1,000 tokens/s at batch 1 and >= 5,000 at
batch 8. One JSON (card, driver, torch, every number) goes to benchmarks/results/ (or --out); a summary to stdout.
Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The meaning of life is"
# The CLI with deterministic algorithms (and one CPU thread, as the resume tests use): `python -c PRELUDE ARGS`.
DETERMINISTIC_PRELUDE = (
    "import torch; torch.use_deterministic_algorithms(True); torch.set_num_threads(1); "
    "from gpt2cli.cli.app import main; main()"
)


@dataclass(frozen=True)
class Shapes:
    """The sizes of every part: the real check, or the smoke run's tiny ones."""

    model_flags: tuple[str, ...]
    config: dict[str, int]
    parity_tokens: int  # positions in the logits comparison
    greedy_tokens: int
    eval_tokens: int
    train_flags: tuple[str, ...]
    train_steps: int
    resume_flags: tuple[str, ...]
    resume_steps: int  # N: N + N resumed against 2N
    decode_tokens: int
    bench_flags: tuple[str, ...]
    text_chars: int | None  # how much of the bundled corpus to tokenize (None: all of it)


FULL = Shapes(
    model_flags=("--preset", "gpt2"),
    config={"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    parity_tokens=1024,
    greedy_tokens=64,
    eval_tokens=16_385,
    train_flags=("--dtype", "bfloat16", "--compile", "--batch-size", "16", "--seq-len", "1024"),
    train_steps=50,
    resume_flags=("--dtype", "float32", "--batch-size", "4", "--seq-len", "256"),
    resume_steps=5,
    decode_tokens=128,
    bench_flags=("--preset", "gpt2", "--tests", "train,fwd,pp512,tg128", "--batch-size", "1,8"),
    text_chars=None,
)
SMOKE = Shapes(
    model_flags=("--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64"),
    config={"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    parity_tokens=64,
    greedy_tokens=16,
    eval_tokens=513,
    train_flags=("--dtype", "float32", "--batch-size", "2", "--seq-len", "32"),
    train_steps=6,
    resume_flags=("--dtype", "float32", "--batch-size", "2", "--seq-len", "32"),
    resume_steps=2,
    decode_tokens=16,
    bench_flags=(
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "64",
        "--block-size",
        "64",
        "--tests",
        "train,fwd,pp16,tg16",
        "--batch-size",
        "1,2",
        "--reps",
        "1",
    ),
    text_chars=60_000,
)


@dataclass
class Check:
    name: str
    passed: bool
    value: Any = None
    limit: str = ""
    target: bool = False  # a speed target: reported, but a miss does not fail the check run


@dataclass
class Part:
    name: str
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def check(self, name: str, passed: bool, value: Any = None, limit: str = "", target: bool = False) -> None:
        self.checks.append(Check(name, bool(passed), value, limit, target))

    @property
    def status(self) -> str:
        if self.skipped is not None:
            return "skipped"
        if self.error is not None or any(not c.passed and not c.target for c in self.checks):
            return "FAIL"
        return "pass"


@dataclass
class Context:
    device: str
    smoke: bool
    shapes: Shapes
    work: Path
    timeout_s: int
    shard: Path | None = None
    checkpoint: Path | None = None
    text: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# ---------------------------------------------------------------- helpers


def gpt2(*args: str, timeout: int, deterministic: bool = False, env: dict[str, str] | None = None) -> str:
    """Run the real command in its own process; returns stdout, raises with stderr's last line on failure."""
    if IN_PROCESS:
        return _gpt2_in_process(args, deterministic, env or {})
    head = [sys.executable, "-c", DETERMINISTIC_PRELUDE] if deterministic else [sys.executable, "-m", "gpt2cli"]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GPT2_")}
    environment.update(env or {})
    result = subprocess.run([*head, *args], capture_output=True, text=True, timeout=timeout, env=environment)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"gpt2 {args[0]} exited {result.returncode}: {lines[-1]}")
    return result.stdout


# --smoke calls the CLI in this process: the same code without a torch import per command (CI's time is short).
IN_PROCESS = False


def _gpt2_in_process(args: tuple[str, ...], deterministic: bool, env: dict[str, str]) -> str:
    import contextlib
    import io

    import torch

    from gpt2cli.cli.app import run

    saved_env = {key: os.environ.get(key) for key in env}
    saved_torch = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env)
        if deterministic:
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(1)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run(list(args))
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.use_deterministic_algorithms(saved_torch[0])
        torch.set_num_threads(saved_torch[1])
    if code != 0:
        lines = stderr.getvalue().strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"gpt2 {args[0]} exited {code}: {lines[-1]}")
    return stdout.getvalue()


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def median(values: list[float]) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def prepare(context: Context) -> None:
    """The bundled corpus as text and as an llm.c shard, and a random model's checkpoint."""
    import gzip

    import torch

    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    text = gzip.decompress((REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz").read_bytes()).decode("utf-8")
    if context.shapes.text_chars is not None:
        text = text[: context.shapes.text_chars]
    context.text = context.work / "shakespeare.txt"
    context.text.write_text(text, encoding="utf-8")
    context.shard = context.work / "shakespeare.bin"
    gpt2("tokenize", str(context.text), "-o", str(context.shard), timeout=context.timeout_s)
    torch.manual_seed(1234)
    model = GPT2(GPT2Config(**context.shapes.config))
    context.checkpoint = context.work / "random.safetensors"
    save_model(model, context.checkpoint)


# ---------------------------------------------------------------- the parts


def part_parity(context: Context, part: Part) -> None:
    import torch

    from gpt2cli import load_model

    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        generator = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 50257, (2, context.shapes.parity_tokens), generator=generator)
        logits = {}
        for device in ("cpu", context.device):
            model = load_model(str(context.checkpoint), device=device, dtype=torch.float32).eval()
            with torch.inference_mode():
                logits[device] = model(idx.to(device))[0].float().cpu()
            del model
        difference = (logits["cpu"] - logits[context.device]).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    part.numbers["logits_max_abs_diff"] = difference
    part.check("float32 logits equal the CPU's", difference <= 1e-4, difference, "<= 1e-4")

    def greedy(device: str) -> dict[str, Any]:
        out = gpt2(
            "sample",
            str(context.checkpoint),
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--ignore-eot",
            "--max-new-tokens",
            str(context.shapes.greedy_tokens),
            "--device",
            device,
            "--json",
            timeout=context.timeout_s,
        )
        return json.loads(out.splitlines()[0])

    on_cpu, on_device = greedy("cpu"), greedy(context.device)
    same = on_cpu["token_ids"] == on_device["token_ids"]
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(on_cpu["token_ids"], on_device["token_ids"], strict=False)) if a != b), None
    )
    part.numbers.update(
        greedy_tokens=len(on_device["token_ids"]),
        greedy_first_difference=first_difference,
        sample_tokens_per_s=on_device["tokens_per_s"],
    )
    part.check(
        f"greedy {context.shapes.greedy_tokens} tokens equal the CPU's",
        same and len(on_cpu["token_ids"]) == context.shapes.greedy_tokens,
        first_difference,
        "no difference",
    )

    def perplexity(device: str) -> float:
        out = gpt2(
            "eval",
            str(context.checkpoint),
            str(context.text),
            "--max-tokens",
            str(context.shapes.eval_tokens),
            "--device",
            device,
            "--json",
            timeout=context.timeout_s,
        )
        return float(json.loads(out)["perplexity"])

    cpu_ppl, device_ppl = perplexity("cpu"), perplexity(context.device)
    relative = abs(device_ppl - cpu_ppl) / cpu_ppl
    part.numbers.update(eval_perplexity_cpu=cpu_ppl, eval_perplexity_device=device_ppl, eval_relative_diff=relative)
    part.check("gpt2 eval perplexity equals the CPU's", relative <= 1e-5, relative, "<= 1e-5 relative")


def part_train(context: Context, part: Part) -> None:
    shapes, run = context.shapes, context.work / "train"
    started = time.perf_counter()
    gpt2(
        "train",
        str(context.shard),
        *shapes.model_flags,
        *shapes.train_flags,
        "--device",
        context.device,
        "--max-steps",
        str(shapes.train_steps),
        "--log-interval",
        "1",
        "--eval-interval",
        "100000",
        "--save-interval",
        "100000",
        "--out",
        str(run),
        timeout=context.timeout_s,
    )
    records = [record for record in metrics(run) if "loss" in record]
    losses = [record["loss"] for record in records]
    steady = records[len(records) // 5 :]  # past compilation and the first allocations
    tokens_per_s, mfu = median([r["tok_per_s"] for r in steady]), median([r["mfu"] for r in steady])
    part.numbers.update(
        command_s=round(time.perf_counter() - started, 1),
        first_loss=losses[0],
        last_loss=losses[-1],
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        losses=losses,
    )
    fall = 1.0 if not context.smoke else 0.0
    part.check("loss falls", losses[-1] < losses[0] - fall, round(losses[0] - losses[-1], 4), f"> {fall}")
    part.check("every loss finite", all(math.isfinite(loss) for loss in losses), len(losses))
    if context.cuda:
        part.check("MFU >= 50%", mfu is not None and mfu >= 0.5, mfu, ">= 0.5", target=True)


def part_resume(context: Context, part: Part) -> None:
    shapes, n = context.shapes, context.shapes.resume_steps
    common = (
        str(context.shard),
        *shapes.model_flags,
        *shapes.resume_flags,
        "--device",
        context.device,
        "--log-interval",
        "1",
        "--eval-interval",
        "100000",
        "--schedule-steps",
        str(2 * n),
    )
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what cuBLAS needs for deterministic results
    run = {"whole": context.work / "resume-whole", "split": context.work / "resume-split"}
    kwargs: dict[str, Any] = {"timeout": context.timeout_s, "deterministic": True, "env": env}
    gpt2("train", *common, "--max-steps", str(2 * n), "--out", str(run["whole"]), **kwargs)
    gpt2("train", *common, "--max-steps", str(n), "--out", str(run["split"]), **kwargs)
    gpt2(
        "train", "--resume", "--out", str(run["split"]), "--max-steps", str(2 * n), "--device", context.device, **kwargs
    )
    whole = [r["loss"] for r in metrics(run["whole"]) if "loss" in r]
    split = [r["loss"] for r in metrics(run["split"]) if "loss" in r]
    part.numbers.update(whole=whole, split=split)
    worst = max((abs(a - b) for a, b in zip(whole, split, strict=False)), default=None)
    part.check(
        f"{n} + {n} resumed steps give the losses of {2 * n}",
        whole == split and len(whole) == 2 * n,
        worst,
        "exactly equal",
    )


def part_decode(context: Context, part: Part) -> None:
    import torch
    from torch._dynamo.utils import counters

    from gpt2cli.benchmark import Case, Runner
    from gpt2cli.model.gpt2 import GPT2, GPT2Config
    from gpt2cli.runtime.devices import resolve_device, resolve_precision

    device = resolve_device(context.device)
    dtype = "bfloat16" if context.cuda else "float32"
    part.numbers["dtype"] = dtype
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**context.shapes.config)).to(device)
    recorded = [0]
    graph_class = torch.cuda.graphs.CUDAGraph
    original_capture = graph_class.capture_begin

    def counting_capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorded[0] += 1
        return original_capture(self, *args, **kwargs)

    graph_class.capture_begin = counting_capture  # type: ignore[method-assign]
    try:
        for compiled in (False, True):
            if compiled and context.smoke:
                part.numbers["compiled"] = "skipped in --smoke (compiling on the CPU takes minutes)"
                continue
            runner = Runner(model, resolve_precision(dtype, device), compile=compiled)
            for batch in (1, 8):
                case = Case(f"tg{context.shapes.decode_tokens}", batch, context.shapes.decode_tokens)
                counters.clear()
                recorded[0] = 0
                result = runner.run(case, reps=3, warmup=1)
                name = f"b{batch}-{'compiled' if compiled else 'eager'}"
                numbers = {
                    "tokens_per_s": result.tokens_per_s,
                    "ms_per_token": result.ms_per_token,
                    "warmup_s": result.warmup_s,
                    "error": result.error,
                }
                part.check(f"{name} runs", result.error is None, result.error)
                if compiled:
                    frames = int(counters["frames"]["ok"])
                    skips = int(counters["inductor"]["cudagraph_skips"])
                    numbers.update(
                        compilations=frames,
                        unique_graphs=int(counters["stats"]["unique_graphs"]),
                        cuda_graphs_recorded=recorded[0],
                        cudagraph_skips=skips,
                    )
                    # One graph family: a compilation (and a CUDA graph) per batch shape, not one per position.
                    least = 1 if batch == 1 else 0  # batch 8 may reuse batch 1's compilation or add one
                    part.check(
                        f"{name}: compiled once, not per position",
                        least <= frames <= 2,
                        frames,
                        f"{least}-2 compilations for {case.seq_len} positions",
                    )
                    if context.cuda:
                        part.check(
                            f"{name}: CUDA graphs recorded, one family",
                            1 <= recorded[0] <= 2 and skips == 0,
                            {"recorded": recorded[0], "skips": skips},
                            "1-2 recorded, 0 skipped",
                        )
                        goal = 1000 if batch == 1 else 5000
                        part.check(
                            f"{name} >= {goal:,} tokens/s",
                            (result.tokens_per_s or 0) >= goal,
                            result.tokens_per_s,
                            f">= {goal}",
                            target=True,
                        )
                part.numbers[name] = numbers
    finally:
        graph_class.capture_begin = original_capture  # type: ignore[method-assign]


def part_bench(context: Context, part: Part) -> None:
    for compiled in (False, True):
        label = "compiled" if compiled else "eager"
        if compiled and context.smoke:
            part.numbers[label] = "skipped in --smoke (compiling on the CPU takes minutes)"
            continue
        flags = ["--compile"] if compiled else []
        out = gpt2(
            "bench",
            "--device",
            context.device,
            *context.shapes.bench_flags,
            *flags,
            "--json",
            timeout=context.timeout_s,
        )
        rows = json.loads(out)["results"]
        part.numbers[label] = rows
        failed = [f"{r['test']} b{r['batch_size']}: {r['error']}" for r in rows if r["error"] or not r["tokens_per_s"]]
        part.check(f"{label}: every case runs", not failed, failed or len(rows), "no errors")
        # Prefill is never compiled (its shape changes with every prompt): a compiled run says so for the others only.
        expected = [compiled and not r["test"].startswith("pp") for r in rows]
        part.check(
            f"{label}: results say compiled only where compiled",
            [r["compile"] for r in rows] == expected,
            [r["compile"] for r in rows],
        )


def part_distributed(context: Context, part: Part) -> None:
    import torch

    if not context.cuda or torch.cuda.device_count() < 2:
        part.skipped = f"needs 2+ GPUs ({torch.cuda.device_count() if context.cuda else 0} visible)"
        return
    common = (
        str(context.shard),
        *context.shapes.model_flags,
        "--dtype",
        "float32",
        "--seq-len",
        "256",
        "--max-steps",
        "5",
        "--log-interval",
        "1",
        "--eval-interval",
        "100000",
        "--device",
        "cuda",
    )
    single = context.work / "single"
    gpt2("train", *common, "--batch-size", "8", "--out", str(single), timeout=context.timeout_s)
    reference = [r["loss"] for r in metrics(single) if "loss" in r]
    part.numbers["single"] = reference
    for parallel in ("ddp", "fsdp"):
        out = context.work / parallel
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "gpt2cli",
            "train",
            *common,
            "--batch-size",
            "4",
            "--parallel",
            parallel,
            "--out",
            str(out),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=context.timeout_s)
        if result.returncode != 0:
            part.check(f"{parallel} runs", False, (result.stderr.strip().splitlines() or ["?"])[-1])
            continue
        losses = [r["loss"] for r in metrics(out) if "loss" in r]
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        part.numbers[parallel] = losses
        # Training runs float32 matmuls as TF32 (10-bit mantissa): batches of 4 and of 8 round differently.
        part.check(f"{parallel}: 2 processes give the single-process losses", worst <= 1e-4, worst, "<= 1e-4 rel")


PARTS: dict[str, Callable[[Context, Part], None]] = {
    "parity": part_parity,
    "train": part_train,
    "resume": part_resume,
    "decode": part_decode,
    "bench": part_bench,
    "distributed": part_distributed,
}


# ---------------------------------------------------------------- the environment and the report


def environment(device: str) -> dict[str, Any]:
    import torch

    import gpt2cli

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpt2cli": gpt2cli.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "commit": _git("rev-parse", "HEAD"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        info.update(
            card=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            memory_gib=round(properties.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
            driver=_driver_version(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        from gpt2cli.runtime.devices import device_name

        info.update(card=None, cpu=device_name(torch.device("cpu")), cores=os.cpu_count())
    return info


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def summary_line(part: Part) -> str:
    head = f"{part.name:<12} {part.status:<8} {part.seconds:6.1f} s"
    if part.skipped:
        return f"{head}  {part.skipped}"
    if part.error:
        return f"{head}  error: {part.error}"
    shown = []
    for check in part.checks:
        mark = "ok" if check.passed else ("target missed" if check.target else "FAILED")
        value = f"{check.value:.4g}" if isinstance(check.value, float) else check.value
        shown.append(f"{check.name}: {mark} ({value}{', want ' + check.limit if check.limit else ''})")
    return head + "".join(f"\n    {line}" for line in shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and no compilation (for CI on the CPU)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts (default: {','.join(PARTS)})")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the JSON")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed to any one command")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}")

    import torch

    global IN_PROCESS
    IN_PROCESS = args.smoke
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: CUDA is not available to torch {torch.__version__}; install a CUDA build of torch, "
            "or run --device cpu --smoke",
            file=sys.stderr,
        )
        return 2
    env = environment(args.device)
    print(
        f"gpu_check: {env.get('card') or env.get('cpu')} · torch {env['torch']} · "
        f"{'smoke' if args.smoke else 'full'} run of {', '.join(only)}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    parts: list[Part] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        context = Context(args.device, args.smoke, SMOKE if args.smoke else FULL, Path(folder), args.timeout)
        prepare(context)
        for name in only:
            part = Part(name)
            part_started = time.perf_counter()
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            try:
                PARTS[name](context, part)
            except Exception as error:  # one part's failure is reported, and the next part runs
                part.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
                part.numbers["traceback"] = traceback.format_exc(limit=-3)
            part.seconds = round(time.perf_counter() - part_started, 1)
            print(summary_line(part), file=sys.stderr, flush=True)
            parts.append(part)
    total = round(time.perf_counter() - started, 1)
    report = {
        "environment": env,
        "smoke": args.smoke,
        "total_s": total,
        "passed": all(part.status != "FAIL" for part in parts),
        "parts": [asdict(part) | {"status": part.status} for part in parts],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "-", env.get("card") or "cpu").strip("-").lower()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = args.out / f"gpu-check-{stamp}-{card}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(summary_line(part) for part in parts))
    print(f"{'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'} in {total:.0f} s; report: {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
