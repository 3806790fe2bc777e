"""GPU acceptance check: is every CUDA path of gpt2cli right, and how fast is it, on this machine's GPU?

One command for anyone with an NVIDIA GPU, after `pip install -e .` with their CUDA build of torch:

  python benchmarks/gpu_check.py                   # every part: about 14 minutes on an H100 (estimated)
  python benchmarks/gpu_check.py --plan            # the parts split into calls of <= 10 minutes, 15 in all
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
  int4         the int4 kernel (tinygemm on CUDA) against its dequantized weights for group sizes 32, 64, 128;
               tg128 at batch 1 with int4 weights, eager and compiled: tokens/s, GB/s, CUDA graphs
  int8         the int8 candidates timed side by side (tg128, batch 1, bf16): the shipped Int8Linear (compiled:
               Inductor's fused conversion) and torch's _weight_int8pack_mm, eager and compiled, coordinate-descent
               tuning off and on: tokens/s and GB/s each, and the fastest
  lookup       prompt lookup (4 drafted tokens) gives plain greedy's 128 tokens, eager and compiled (the verify pass
               as its own CUDA graph); tokens/s of both, drafts accepted
  serve        the serve engine, compiled, 4 rows: every (rows, length) bucket compiled and recorded at start-up
               (its time), none after; greedy tokens of 4 concurrent sequences equal the generator's; decode
               tokens/s of 1 and 4 clients, and of 1 client stepped over the whole batch and cache (as before buckets)

Targets (reported, not failures): training MFU >= 50%; compiled decode >= 1,000 tokens/s at batch 1 and >= 5,000 at
batch 8; one served client faster with buckets than over the whole batch. One JSON (card, driver, torch, every
number) goes to benchmarks/results/ (or --out), rewritten after each part so that a run cut short keeps what it
measured; a summary to stdout. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def counting_cuda_graphs() -> Iterator[list[int]]:
    """`[n]`: the CUDA graphs recorded inside the block so far (the caller may reset it)."""
    import torch

    recorded = [0]
    graph_class = torch.cuda.graphs.CUDAGraph
    original_capture = graph_class.capture_begin

    def counting_capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorded[0] += 1
        return original_capture(self, *args, **kwargs)

    graph_class.capture_begin = counting_capture  # type: ignore[method-assign]
    try:
        yield recorded
    finally:
        graph_class.capture_begin = original_capture  # type: ignore[method-assign]


def fresh_compilations() -> None:
    """Forget what earlier parts compiled: the decode steps of every part compile the same function, whose
    compilations Dynamo caps (8 by default; past that it runs eagerly, which would time the wrong thing)."""
    import torch

    torch._dynamo.reset()


def skipped_in_smoke(context: Context, part: Part, name: str, compiled: bool) -> bool:
    """A compiled case under --smoke is skipped (compiling on the CPU takes minutes), and the part's numbers say so."""
    if compiled and context.smoke:
        part.numbers[name] = "skipped in --smoke (compiling on the CPU takes minutes)"
        return True
    return False


def fresh_counts(recorded: list[int]) -> None:
    """A compiled case's counts from zero: Dynamo's compilations and counters, and the CUDA graphs recorded."""
    from torch._dynamo.utils import counters

    fresh_compilations()
    counters.clear()
    recorded[0] = 0


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls without TF32, for token-for-token comparisons."""
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def decode_numbers(result: Any) -> dict[str, Any]:
    """A `gpt2 bench` decode result's speed: tokens/s and the bytes it read per second."""
    return {
        "tokens_per_s": result.tokens_per_s,
        "ms_per_token": result.ms_per_token,
        "bandwidth_gbps": result.bandwidth_gbps,
        "measured_read_gbps": result.measured_read_gbps,
        "measured_read_fraction": result.measured_read_fraction,
        "weight_bytes_per_token": result.weight_bytes_per_token,
        "warmup_s": result.warmup_s,
        "error": result.error,
    }


def run_decode_case(runner: Any, case: Any, part: Part, name: str) -> dict[str, Any]:
    """Time one decode case (3 runs after a warm-up); a failure (a kernel that does not compile, say) fails this
    case's check and the part's other cases still run."""
    try:
        result = runner.run(case, reps=3, warmup=1)
    except Exception as error:
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        part.check(f"{name} runs", False, message[:300])
        return {"error": message, "traceback": traceback.format_exc(limit=-3)}
    part.check(f"{name} runs", result.error is None, result.error)
    return decode_numbers(result)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Where two token lists first differ (the shorter one's length if one extends the other); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def relative_error(got: Any, reference: Any) -> float:
    """max |got - reference| / max |reference|, in float32."""
    reference = reference.float()
    return ((got.float() - reference).abs().max() / reference.abs().max()).item()


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
    fresh_compilations()
    with counting_cuda_graphs() as recorded:
        for compiled in (False, True):
            if skipped_in_smoke(context, part, "compiled", compiled):
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


def part_bench(context: Context, part: Part) -> None:
    for compiled in (False, True):
        label = "compiled" if compiled else "eager"
        if skipped_in_smoke(context, part, label, compiled):
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


def part_int4(context: Context, part: Part) -> None:
    """int4 weights (torch's tinygemm on CUDA): each group size's kernel against the weights it stands for, then
    tg at batch 1, eager and compiled."""
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from gpt2cli.benchmark import Case, Runner
    from gpt2cli.generation.quantize import Int4Linear, dequantize, group_quantize, int4_kernel_missing
    from gpt2cli.model.gpt2 import GPT2, GPT2Config
    from gpt2cli.runtime.devices import resolve_device, resolve_precision

    device = resolve_device(context.device)
    missing = int4_kernel_missing(device)
    if missing is not None:
        part.skipped = missing
        return
    width = context.shapes.config["n_embd"]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the layers' weights
    with exact_float32(), torch.inference_mode():
        for group_size in (32, 64, 128):
            if width % group_size:
                continue
            linear = torch.nn.Linear(width, 3 * width).to(device)  # the attention's projection: (3C, C)
            torch.nn.init.normal_(linear.weight, std=0.02)
            x = torch.randn(4, width, generator=generator).to(device, torch.bfloat16)
            reference = F.linear(x.float(), dequantize(*group_quantize(linear.weight, group_size), group_size))
            error = relative_error(Int4Linear.from_linear(linear, group_size)(x), reference + linear.bias.float())
            part.numbers[f"g{group_size}_relative_error"] = error
            part.check(
                f"g{group_size}: the kernel multiplies by its dequantized weights", error <= 1e-2, error, "<= 1e-2"
            )

    dtype = "bfloat16" if context.cuda else "float32"
    part.numbers["dtype"] = dtype
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**context.shapes.config)).to(device)
    case = Case(f"tg{context.shapes.decode_tokens}", 1, context.shapes.decode_tokens)
    with counting_cuda_graphs() as recorded:
        for compiled in (False, True):
            name = "b1-compiled" if compiled else "b1-eager"
            if skipped_in_smoke(context, part, name, compiled):
                continue
            fresh_counts(recorded)
            runner = Runner(model, resolve_precision(dtype, device), compile=compiled, quantize="int4", group_size=32)
            numbers = run_decode_case(runner, case, part, name)
            if compiled and context.cuda and numbers["error"] is None:
                skips = int(counters["inductor"]["cudagraph_skips"])
                numbers.update(cuda_graphs_recorded=recorded[0], cudagraph_skips=skips)
                part.check(
                    f"{name}: replayed as a CUDA graph",
                    recorded[0] >= 1 and skips == 0,
                    {"recorded": recorded[0], "skips": skips},
                    ">= 1 recorded, 0 skipped",
                )
            part.numbers[name] = numbers
            del runner


def part_int8(context: Context, part: Part) -> None:
    """The candidate int8 decode paths, timed side by side (tg at batch 1) so that a GPU run can choose: the shipped
    `Int8Linear` (on CUDA, compiled: the int8-to-float conversion fused into the matmul by Inductor) and torch's
    `_weight_int8pack_mm` (a CUDA kernel since torch 2.8), each compiled with Inductor's coordinate-descent tuning
    off and on. tokens/s and GB/s (the bytes a step reads, per second) for each."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from gpt2cli.benchmark import Case, Runner
    from gpt2cli.generation.quantize import Int8Linear
    from gpt2cli.model.gpt2 import GPT2, GPT2Config
    from gpt2cli.runtime.devices import resolve_device, resolve_precision

    class Int8PackLinear(Int8Linear):
        """`Int8Linear` through `_weight_int8pack_mm` on every device (its float scales, the activations' dtype)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.size(-1))
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales.to(flat.dtype))
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.reshape(*x.shape[:-1], -1)

    device = resolve_device(context.device)
    width = context.shapes.config["n_embd"]
    with exact_float32(), torch.inference_mode():
        linear = torch.nn.Linear(width, 3 * width).to(device)
        layer = Int8Linear.from_linear(linear)
        layer.__class__ = Int8PackLinear
        x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)).to(device)
        reference = (x @ layer.weight.float().t()) * layer.scales.float() + linear.bias
        error = relative_error(layer(x), reference)
    part.numbers["int8pack_relative_error"] = error
    part.check("_weight_int8pack_mm multiplies by the int8 weights and scales", error <= 1e-4, error, "<= 1e-4")

    dtype = "bfloat16" if context.cuda else "float32"
    part.numbers["dtype"] = dtype
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**context.shapes.config)).to(device)
    case = Case(f"tg{context.shapes.decode_tokens}", 1, context.shapes.decode_tokens)
    candidates = [  # (name, kernel, compiled, coordinate-descent tuning)
        ("int8linear-eager", "int8linear", False, False),  # on CUDA the refused path (slower than float): reference
        ("int8linear-compiled", "int8linear", True, False),  # what `--quantize int8 --compile` runs today
        ("int8linear-compiled-cdt", "int8linear", True, True),
        ("int8pack-eager", "int8pack", False, False),
        ("int8pack-compiled", "int8pack", True, False),
        ("int8pack-compiled-cdt", "int8pack", True, True),
    ]
    with counting_cuda_graphs() as recorded:
        for name, kernel, compiled, tuned in candidates:
            if skipped_in_smoke(context, part, name, compiled):
                continue
            fresh_counts(recorded)
            runner = Runner(model, resolve_precision(dtype, device), compile=compiled, quantize="int8")
            if kernel == "int8pack":
                for module in runner.inference_model().modules():
                    if type(module) is Int8Linear:
                        module.__class__ = Int8PackLinear
            with inductor_config.patch(coordinate_descent_tuning=tuned):  # read when the step compiles (warm-up)
                numbers = run_decode_case(runner, case, part, name)
            if compiled and context.cuda:
                numbers.update(
                    cuda_graphs_recorded=recorded[0], cudagraph_skips=int(counters["inductor"]["cudagraph_skips"])
                )
            part.numbers[name] = numbers
            del runner
    timed = {
        name: numbers["tokens_per_s"]
        for name, numbers in part.numbers.items()
        if isinstance(numbers, dict) and numbers.get("tokens_per_s")
    }
    part.numbers["fastest"] = max(timed, key=timed.__getitem__) if timed else None


def part_lookup(context: Context, part: Part) -> None:
    """Prompt lookup's verification pass: greedy with `PromptLookup(4)` gives plain greedy's tokens (float32, TF32
    off), eager and compiled (the verify pass as its own CUDA graph); tokens/s of each, drafts accepted."""
    import torch
    from torch._dynamo.utils import counters

    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.generation.drafting import PromptLookup
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.records import SamplingOptions, Timing
    from gpt2cli.runtime.devices import resolve_device

    device = resolve_device(context.device)
    model = load_model(str(context.checkpoint), device=device, dtype=torch.float32).eval()
    tokenizer = get_tokenizer()
    assert context.text is not None
    passage = tokenizer.encode(context.text.read_text(encoding="utf-8")[:2000])[:48]
    prompt = passage + passage[:8]  # a passage, then its opening again: something to look up
    options = SamplingOptions(max_new_tokens=context.shapes.decode_tokens, temperature=0.0, ignore_eot=True)
    with exact_float32(), counting_cuda_graphs() as recorded:
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            if skipped_in_smoke(context, part, mode, compiled):
                continue
            fresh_counts(recorded)
            runs: dict[str, Any] = {}
            for name, drafting in (("plain", None), ("lookup", PromptLookup(4))):
                generator = TextGenerator(model, tokenizer, compile=compiled, drafting=drafting)
                generator.generate([prompt], options)  # compiles and records first: timed once warm
                timing = Timing()
                (completion,) = generator.generate([prompt], options, timing=timing)
                runs[name] = {"tokens": completion.token_ids, "tokens_per_s": timing.decode_tokens_per_s}
                if drafting is not None:
                    runs[name].update(
                        acceptance_rate=timing.acceptance_rate,
                        tokens_per_pass=timing.tokens_per_pass,
                        drafted=timing.drafted,
                        accepted=timing.accepted,
                    )
            difference = first_difference(runs["plain"]["tokens"], runs["lookup"]["tokens"])
            numbers = {
                name: {key: value for key, value in run.items() if key != "tokens"} for name, run in runs.items()
            }
            numbers["speedup"] = runs["lookup"]["tokens_per_s"] / runs["plain"]["tokens_per_s"]
            if compiled and context.cuda:
                numbers.update(
                    cuda_graphs_recorded=recorded[0], cudagraph_skips=int(counters["inductor"]["cudagraph_skips"])
                )
            part.numbers[mode] = numbers
            part.check(f"{mode}: prompt lookup's greedy tokens are plain greedy's", difference is None, difference)


def serve_requests(engine: Any, requests: list[tuple[list[int], Any]]) -> list[tuple[list[int], list[float]]]:
    """Submit (prompt ids, options) sequences together; each one's tokens and the time each arrived."""
    import threading

    import torch

    from gpt2cli.serving.engine import Finished, Sequence, TokenGenerated

    results: list[tuple[list[int], list[float]]] = [([], []) for _ in requests]
    errors: list[str] = []
    finished = threading.Semaphore(0)

    def emitter(index: int) -> Callable[[Any], None]:
        def emit(event: Any) -> None:
            if isinstance(event, TokenGenerated):
                results[index][0].append(event.token)
                results[index][1].append(time.perf_counter())
            elif isinstance(event, Finished):
                if event.error:
                    errors.append(event.error)
                finished.release()

        return emit

    engine.submit(
        [
            Sequence(index, ids, options, torch.Generator().manual_seed(index), emitter(index))
            for index, (ids, options) in enumerate(requests)
        ]
    )
    for _ in requests:
        if not finished.acquire(timeout=300):
            raise RuntimeError("the engine did not finish its sequences within 300 s")
    if errors:
        raise RuntimeError(f"a served sequence failed: {errors[0]}")
    return results


def decode_rate(arrivals: list[list[float]]) -> float:
    """Tokens after each sequence's first, per second from the first first token to the last token."""
    start, end = min(times[0] for times in arrivals), max(times[-1] for times in arrivals)
    return sum(len(times) - 1 for times in arrivals) / (end - start) if end > start else 0.0


def part_serve(context: Context, part: Part) -> None:
    """The serve engine (continuous batching, compiled): every (rows, length) bucket compiled and recorded before
    the first request, nothing compiled or recorded after; greedy tokens of concurrent sequences finishing at
    different steps equal `gpt2 sample`'s generator (float32, TF32 off); decode tokens/s of one client, of four, and
    of one client stepped as before the buckets (the whole batch and cache every step). --smoke runs CUDA's
    buckets eagerly on the CPU."""
    import torch
    from torch._dynamo.utils import counters

    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.records import SamplingOptions
    from gpt2cli.runtime.devices import resolve_device
    from gpt2cli.serving.engine import Engine, StepBuckets, step_buckets

    device = resolve_device(context.device)
    model = load_model(str(context.checkpoint), device=device, dtype=torch.float32).eval()
    tokenizer, max_batch, capacity, tokens = get_tokenizer(), 4, model.config.block_size, context.shapes.decode_tokens
    compiled = not context.smoke
    prompts = [tokenizer.encode(text) for text in (PROMPT, "Once upon a time", "A", "To be, or not to be, that is")]
    lengths = [tokens, tokens // 2, tokens * 3 // 4, tokens // 4]  # finishing apart: rows leave and move
    greedy = [SamplingOptions(max_new_tokens=n, temperature=0.0, ignore_eot=True) for n in lengths]
    with exact_float32(), counting_cuda_graphs() as recorded:
        reference = TextGenerator(model, tokenizer)  # eager, one sequence at a time
        expected = [reference.generate([ids], greedy[0])[0].token_ids for ids in prompts]
        fresh_compilations()
        counters.clear()

        def made() -> dict[str, int]:
            return {"compilations": int(counters["frames"]["ok"]), "cuda_graphs_recorded": recorded[0]}

        buckets = None if compiled else step_buckets("cuda", True, max_batch, capacity)
        engine = Engine(model, tokenizer, max_batch, compile=compiled, buckets=buckets)
        try:
            part.numbers.update(warm_up_s=engine.start(), shapes=len(engine.buckets.shapes), compiled=compiled)
            warm = made()
            part.numbers.update(warm)
            served = serve_requests(engine, list(zip(prompts, greedy, strict=True)))
            differences = [
                first_difference(got, want[:n]) for (got, _), want, n in zip(served, expected, lengths, strict=True)
            ]
            part.numbers["greedy_first_differences"] = differences
            part.check("greedy equals the generator's", all(d is None for d in differences), differences)
            one = SamplingOptions(max_new_tokens=tokens, temperature=0.0, ignore_eot=True)
            rates = {"one_client": decode_rate([serve_requests(engine, [(prompts[0], one)])[0][1]])}
            rates["four_clients"] = decode_rate(
                [times for _, times in serve_requests(engine, [(p, one) for p in prompts])]
            )
            bucketed, engine.buckets = engine.buckets, StepBuckets((max_batch,), (capacity,))  # one shape, as before
            rates["one_client_whole_batch"] = decode_rate([serve_requests(engine, [(prompts[0], one)])[0][1]])
            engine.buckets = bucketed
            after = {key: value - warm[key] for key, value in made().items()}
        finally:
            engine.stop()
    part.numbers.update({f"{name}_tokens_per_s": rate for name, rate in rates.items()}, after_start=after)
    whole = rates["one_client_whole_batch"]
    part.numbers["one_client_speedup_over_whole_batch"] = speedup = rates["one_client"] / whole if whole else None
    if context.cuda and compiled:
        shapes = part.numbers["shapes"]
        part.check(
            "every bucket recorded before the first request, none after",
            warm["cuda_graphs_recorded"] >= shapes and after["cuda_graphs_recorded"] == 0,
            {"shapes": shapes, **warm, "after_start": after},
            ">= one graph per shape",
        )
        part.check(
            "buckets share compilations",
            0 < warm["compilations"] < shapes and after["compilations"] == 0,
            warm["compilations"],
            f"fewer than {shapes}, none after start",
        )
        part.check("one client: buckets beat the whole batch", (speedup or 0) > 1.0, speedup, "> 1", target=True)


PARTS: dict[str, Callable[[Context, Part], None]] = {
    "parity": part_parity,
    "train": part_train,
    "resume": part_resume,
    "decode": part_decode,
    "bench": part_bench,
    "distributed": part_distributed,
    "int4": part_int4,
    "int8": part_int8,
    "lookup": part_lookup,
    "serve": part_serve,
}


# ---------------------------------------------------------------- the plan: parts into calls of a time-limited GPU

# Estimated seconds of each part on one H100, compilation included (never yet measured on a GPU: a run's report
# has each part's `seconds`, which `--plan REPORT` uses instead). The first parts share the script's first estimate
# of 6-8 minutes by what each compiles and runs; a compiled 124M decode step is taken as ~30 s to compile, recording
# its CUDA graphs as milliseconds. Measured in `--device cpu --smoke` on 2 shared CPU cores (2026-12-07; prepare
# 2.8 s): parity 2.8, train 2.7, resume 3.6, decode 5.5, bench 8.3, int4 1.3, int8 0.8, lookup 0.2, serve 0.5 s;
# the smoke run skips every compilation, which is most of a GPU run, so those times say little about the GPU's.
H100_ESTIMATE_S = {
    "parity": 50,  # a CPU and a GPU forward pass, 4 CLI processes (sample, eval on each device)
    "train": 80,  # the blocks' and the loss's compilation, then 50 steps of 16 x 1024
    "resume": 40,  # 3 short float32 CLI runs
    "decode": 90,  # 2 compiled batch shapes
    "bench": 150,  # a CLI process without and with --compile: training, forward and decode compilations
    "distributed": 5,  # skipped on one GPU (~120 s with 2+)
    "int4": 60,  # 1 compilation
    "int8": 150,  # 4 compilations, 2 with coordinate-descent tuning (each Triton kernel benchmarked)
    "lookup": 70,  # 2 compilations per mode: the step and the verify pass
    "serve": 90,  # ~4 compilations shared by 21 buckets, their graphs, the runs
}
CALL_OVERHEAD_S = 30  # each call: Python and torch, CUDA's start, `prepare` (the corpus tokenized, a model saved)
CALL_FILL = 0.85  # plan calls to 85% of their limit: the estimates are estimates


def plan_calls(seconds: dict[str, float], call_limit_s: float, budget_s: float) -> tuple[list[list[str]], list[str]]:
    """Parts (in `PARTS` order within a call) packed into calls of at most `call_limit_s` x CALL_FILL each,
    overhead included, longest first into the first call with room; calls stop at `budget_s` in all. Returns the
    calls and the parts that did not fit."""
    room = call_limit_s * CALL_FILL - CALL_OVERHEAD_S
    calls: list[list[str]] = []
    loads: list[float] = []
    left_out: list[str] = []
    for name in sorted(PARTS, key=lambda name: -seconds.get(name, 0.0)):
        cost = seconds.get(name, 0.0)
        index = next((i for i, load in enumerate(loads) if load + cost <= room), None)
        total = sum(loads) + CALL_OVERHEAD_S * len(loads)
        if index is not None and total + cost <= budget_s:
            calls[index].append(name)
            loads[index] += cost
        elif cost <= room and total + CALL_OVERHEAD_S + cost <= budget_s:
            calls.append([name])
            loads.append(cost)
        else:
            left_out.append(name)
    order = list(PARTS)
    return [sorted(call, key=order.index) for call in calls], sorted(left_out, key=order.index)


def measured_seconds(report: Path) -> dict[str, float]:
    """Each part's measured seconds in a report of a full run (a smoke run's say nothing of a GPU's)."""
    data = json.loads(report.read_text())
    if data.get("smoke"):
        raise SystemExit(f"gpu_check: {report} is a --smoke report; plan from a full run's")
    return {part["name"]: float(part["seconds"]) for part in data["parts"]}


def print_plan(seconds: dict[str, float], source: str, call_limit_s: float, budget_s: float) -> None:
    calls, left_out = plan_calls(seconds, call_limit_s, budget_s)
    print(
        f"gpu_check plan from {source}: calls of at most {call_limit_s / 60:g} min (planned to {CALL_FILL:.0%}), "
        f"{budget_s / 60:g} min in all; {CALL_OVERHEAD_S} s of start-up per call"
    )
    total = 0.0
    for index, call in enumerate(calls, 1):
        estimate = CALL_OVERHEAD_S + sum(seconds.get(name, 0.0) for name in call)
        total += estimate
        print(f"  call {index} (~{estimate:.0f} s): python benchmarks/gpu_check.py --only {','.join(call)}")
    print(f"  in all ~{total:.0f} s of {budget_s:.0f} (a machine's own start counts against a budget too)")
    if left_out:
        print(f"  left out (no room): {','.join(left_out)}")


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


def write_report(
    path: Path, env: dict[str, Any], smoke: bool, started: float, prepare_s: float, parts: list[Part], complete: bool
) -> dict[str, Any]:
    """The report of the parts run so far, written (again) to `path`; `complete` once every part has run."""
    report = {
        "environment": env,
        "smoke": smoke,
        "complete": complete,
        "total_s": round(time.perf_counter() - started, 1),
        "prepare_s": prepare_s,
        "passed": all(part.status != "FAIL" for part in parts),
        "parts": [asdict(part) | {"status": part.status} for part in parts],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and no compilation (for CI on the CPU)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts (default: {','.join(PARTS)})")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the JSON")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed to any one command")
    parser.add_argument(
        "--plan",
        nargs="?",
        const="",
        metavar="REPORT",
        help="print the parts split into calls (from the H100 estimates, or a full run's REPORT) and exit",
    )
    parser.add_argument("--call-limit", type=float, default=600, help="--plan: seconds one call may take")
    parser.add_argument("--budget", type=float, default=900, help="--plan: seconds all calls may take")
    args = parser.parse_args(argv)
    if args.plan is not None:
        seconds = {**H100_ESTIMATE_S, **(measured_seconds(Path(args.plan)) if args.plan else {})}
        print_plan(seconds, args.plan or "the H100 estimates", args.call_limit, args.budget)
        return 0
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
    args.out.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "-", env.get("card") or "cpu").strip("-").lower()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = args.out / f"gpu-check-{stamp}-{card}{'-smoke' if args.smoke else ''}.json"
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        context = Context(args.device, args.smoke, SMOKE if args.smoke else FULL, Path(folder), args.timeout)
        prepare(context)
        prepare_s = round(time.perf_counter() - started, 1)
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
            write_report(path, env, args.smoke, started, prepare_s, parts, complete=False)  # a cut run keeps these
    report = write_report(path, env, args.smoke, started, prepare_s, parts, complete=True)
    print("\n".join(summary_line(part) for part in parts))
    total = report["total_s"]
    print(f"{'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'} in {total:.0f} s; report: {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
