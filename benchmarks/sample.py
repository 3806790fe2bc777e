"""Benchmark: batch-1 greedy decoding with `gpt2cli`'s sampler against transformers' `generate` (KV cache on both),
in every weight format: float32, bf16, int8, int4 (group sizes 32, 64, 128), each eager and compiled (`--compile`).

The `gpt2` preset (124M) with random weights (seed 0, built by transformers and converted, so both hold the same
weights), a 16-token prompt, 128 new tokens, greedy. Each contender runs in its own process, once to warm up and
then `--reps` times; decode tokens/s excludes the prompt. For each mode: the ratio to transformers' float32
`generate` measured in the same run, and its share of its own bandwidth limit: the bytes one decode step reads
(weights as stored; `quantize.decode_bytes_per_token`) ÷ this machine's read bandwidth (summing a 512 MiB buffer,
`gpt2cli/runtime/bandwidth.py`, measured again before each timed run and set against it) is the fastest it could go.
Each mode's perplexity change against float32 is measured on the held-out last 5% of the bundled Shakespeare
(`--ppl-tokens` tokens), with the trained checkpoint given by `--checkpoint` (e.g. the default run's), else with the
random 124M weights (labelled: then a measure of numerical error only). Then batch 8 (`--num-samples 8`: eight
copies of the prompt decoded together), generated tokens/s against batch 1, in float32 and in the fastest quantized
mode (eager or compiled, whichever was faster at batch 1). Last, prompt lookup (`--prompt-lookup N`) against
plain greedy on a trained checkpoint.

  python benchmarks/sample.py                                   # table
  python benchmarks/sample.py --checkpoint runs/<the default run> --json
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
# (name, dtype, quantize, group size): each runs eager and compiled (`--compile`, name + "-compiled")
WEIGHT_MODES = [
    ("fp32", "float32", "none", 32),
    ("bf16", "bfloat16", "none", 32),
    ("int8", "float32", "int8", 32),
    ("int4-g32", "float32", "int4", 32),
    ("int4-g64", "float32", "int4", 64),
    ("int4-g128", "float32", "int4", 128),
]
COMPILED = "-compiled"
MODES = [mode for name, *rest in WEIGHT_MODES for mode in [(name, *rest), (name + COMPILED, *rest)]]


def machine() -> dict[str, Any]:
    """The CPU model, its SIMD features that matter to the kernels, cores, and versions."""
    import platform

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_kernels import cpu_flags, cpu_model

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def build_checkpoint(folder: Path, tiny: bool = False) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64) if tiny else GPT2Config()  # tiny: to check the script
    GPT2LMHeadModel(config).save_pretrained(folder / "hf")
    return folder / "hf"


# ---------------------------------------------------------------- workers (each in its own process)


def time_hf(folder: Path, reps: int) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = torch.tensor([PROMPT])

    def run(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=50256
            )
        assert out.shape[1] == len(PROMPT) + new_tokens
        return time.perf_counter() - started

    run(8)
    rates = []
    for _ in range(reps):  # decode rate: the time of 128 tokens minus the time of the prompt and first token
        total, first = run(NEW_TOKENS), run(1)
        rates.append((NEW_TOKENS - 1) / (total - first))
    return {"decode_tokens_per_s": statistics.median(rates), "runs": rates}


def load_mode(folder: Path, mode: str) -> Any:
    import torch

    from gpt2cli import load_model
    from gpt2cli.generation.quantize import quantize_model

    _, dtype, quantize, group_size = next(row for row in WEIGHT_MODES if row[0] == mode)
    model = load_model(folder, dtype=getattr(torch, dtype))
    quantize_model(model, quantize, group_size)
    return model


def time_ours(folder: Path, reps: int, mode: str, rows: int) -> dict[str, Any]:
    """Decode tokens/s, and the share of the read limit: this machine's read bandwidth is measured again before
    each timed run (it varied 36-63 GB/s between runs minutes apart on the shared 2-core VM), and each run is set
    against the bandwidth measured just before it."""
    import torch

    from gpt2cli import get_tokenizer
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.quantize import decode_bytes_per_token
    from gpt2cli.generation.records import SamplingOptions, Timing
    from gpt2cli.runtime.bandwidth import read_bandwidth
    from gpt2cli.runtime.devices import keep_freed_memory

    keep_freed_memory(torch.device("cpu"))
    model = load_mode(folder, mode.removesuffix(COMPILED))
    text_generator = TextGenerator(model, get_tokenizer(), compile=mode.endswith(COMPILED))
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eot=True)
    prompts = [PROMPT] * rows
    text_generator.generate(prompts, options)  # warm-up: compiles every attended-length bucket
    bytes_per_token = decode_bytes_per_token(model)
    rates, bandwidths, completions = [], [], []
    for _ in range(reps):
        bandwidths.append(read_bandwidth("cpu", passes=3))
        timing = Timing()
        completions = text_generator.generate(prompts, options, timing=timing)
        rates.append(timing.decode_tokens_per_s)  # generated tokens/s: every row's tokens
    assert all(len(completion.token_ids) == NEW_TOKENS for completion in completions)
    shares = [rate * bytes_per_token / rows / bandwidth for rate, bandwidth in zip(rates, bandwidths, strict=True)]
    return {
        "decode_tokens_per_s": statistics.median(rates),
        "runs": rates,
        "bytes_per_token": bytes_per_token,
        "read_GB_per_s": [round(bandwidth / 1e9, 2) for bandwidth in bandwidths],
        "fraction_of_read_limit": statistics.median(shares),
    }


def perplexity(folder: Path, mode: str, tokens: int) -> dict[str, Any]:
    """Perplexity of the held-out last 5% of the bundled Shakespeare (what the default run validates on)."""
    import numpy as np
    import torch

    from gpt2cli import get_tokenizer
    from gpt2cli.evaluation import evaluate_lm
    from gpt2cli.runtime.devices import resolve_precision

    text = gzip.decompress((REPO / "gpt2cli" / "assets" / "shakespeare.txt.gz").read_bytes()).decode()
    held_out = text[int(len(text) * 0.95) :]
    ids = np.asarray(get_tokenizer().encode(held_out)[:tokens], dtype=np.uint32)
    model = load_mode(folder, mode).eval()
    block = model.config.block_size
    result = evaluate_lm(model, [ids], resolve_precision("float32", torch.device("cpu")), block, block, 8)
    return {"perplexity": result.perplexity, "tokens": result.tokens}


def measure_bandwidth() -> dict[str, float]:
    from gpt2cli.runtime.bandwidth import read_bandwidth

    return {"read_bytes_per_s": read_bandwidth("cpu")}


def worker(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if args.worker == "hf-fp32":
        result = time_hf(folder, args.reps)
    elif args.worker == "bandwidth":
        result = measure_bandwidth()
    elif args.worker.startswith("ppl-"):
        result = perplexity(folder, args.worker.removeprefix("ppl-"), args.ppl_tokens)
    elif args.worker == "llama-files":
        result = {name: str(path) for name, path in peer_ggufs(folder, Path(args.gguf_dir)).items()}
    elif args.worker == "llama-time":
        result = time_llama(folder, args.reps, args.threads)
    elif args.worker.startswith("seen-"):
        result = time_ours_as_seen(folder, args.worker.removeprefix("seen-"), args.reps, args.threads)
    elif args.worker.startswith("steady-"):
        result = time_ours_steady(folder, args.reps, args.worker.removeprefix("steady-"))
    else:
        result = time_ours(folder, args.reps, args.worker, args.rows)
    print(json.dumps(result))


def run_worker(
    name: str, folder: Path, args: argparse.Namespace, rows: int = 1, extra: list[str] | None = None
) -> dict[str, Any]:
    print(f"running {name}{f' (batch {rows})' if rows > 1 else ''} ...", file=sys.stderr, flush=True)
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--folder",
        str(folder),
        "--reps",
        str(args.reps),
        "--rows",
        str(rows),
        "--ppl-tokens",
        str(args.ppl_tokens),
        "--threads",
        str(args.threads),
        *(extra or []),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


# ---------------------------------------------------------------- sections


def section_modes(folder: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Batch 1 in every mode against transformers' float32 generate, with each mode's share of its limit."""
    read = run_worker("bandwidth", folder, args)["read_bytes_per_s"]
    hf = run_worker("hf-fp32", folder, args)
    modes = {name: run_worker(name, folder, args) for name, *_ in MODES}
    fp32_bytes = modes["fp32"]["bytes_per_token"]
    hf["fraction_of_read_limit"] = hf["decode_tokens_per_s"] / (read / fp32_bytes)
    for result in modes.values():
        result.update(
            vs_transformers=result["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
            read_limit_tokens_per_s=statistics.median(result["read_GB_per_s"]) * 1e9 / result["bytes_per_token"],
        )
    report.update(read_GB_per_s=round(read / 1e9, 2), hf_fp32=hf, modes=modes)


def section_perplexity(folder: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Each mode's perplexity change against float32, on the trained checkpoint if one was given."""
    scored = Path(args.checkpoint) if args.checkpoint else folder
    report["perplexity_model"] = str(scored) if args.checkpoint else "random 124M weights (numerical error only)"
    values = {name: run_worker(f"ppl-{name}", scored, args)["perplexity"] for name, *_ in WEIGHT_MODES}
    for name, value in values.items():  # compiling changes the order of sums, not the weights: scored once
        for mode in (name, name + COMPILED):
            report["modes"][mode].update(perplexity=value, perplexity_change=value / values["fp32"] - 1)


def section_batch(folder: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Batch 8 against batch 1, in float32 and in the fastest quantized mode (each eager or compiled: the faster)."""

    def fastest(names: list[str]) -> str:
        return max(names, key=lambda name: report["modes"][name]["decode_tokens_per_s"])

    quantized = [name for name, _, quantize, _ in MODES if quantize != "none"]
    report["batch8"] = {}
    for name in (fastest(["fp32", "fp32" + COMPILED]), fastest(quantized)):
        rate = run_worker(name, folder, args, rows=8)["decode_tokens_per_s"]
        single = report["modes"][name]["decode_tokens_per_s"]
        report["batch8"][name] = {"decode_tokens_per_s": rate, "vs_batch1": rate / single}


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
        print(f"training the default run into {LOOKUP_RUN} (about six minutes) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "gpt2cli", "train", "--out", str(LOOKUP_RUN)], check=True)
    return LOOKUP_RUN


def section_prompt_lookup(folder: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Plain greedy against `--prompt-lookup N` greedy on the trained checkpoint, float32, batch 1, NEW_TOKENS new
    tokens, the runs interleaved (plain, N=4, N=10, plain, ...) so that a loaded machine slows all alike.

    `folder` (the random 124M weights) is unused: random weights have nothing to look up."""
    import torch

    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.generation.drafting import PromptLookup
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.records import SamplingOptions, Timing

    checkpoint = trained_checkpoint(getattr(args, "checkpoint", None))
    print(f"running prompt lookup on {checkpoint} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(checkpoint, dtype=torch.float32), get_tokenizer()
    prompt, passage = lookup_prompt(tokenizer)
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eot=True)
    generators = {0: TextGenerator(model, tokenizer)}
    generators.update({draft: TextGenerator(model, tokenizer, drafting=PromptLookup(draft)) for draft in LOOKUP_DRAFTS})
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
    print(
        f"\nprompt lookup: {lookup['checkpoint']}, float32, batch 1, {lookup['prompt_tokens']}-token prompt "
        f"(a passage, then its start again), {NEW_TOKENS} new tokens, greedy; plain greedy copies "
        f"{lookup['copied_tokens']} tokens of the passage"
    )
    print(f"{'decoder':<16} {'tok/s':>8} {'speedup':>8} {'accepted':>8} {'tok/pass':>8} {'identical':>9}")
    print(f"{'plain greedy':<16} {lookup['plain_tokens_per_s']:>8.1f}")
    for draft, r in lookup["drafts"].items():
        print(
            f"{'--prompt-lookup ' + draft:<16} {r['tokens_per_s']:>8.1f} {r['speedup_per_pair']:>7.2f}x "
            f"{r['acceptance_rate']:>8.0%} {r['tokens_per_pass']:>8.2f} "
            f"{'yes' if r['identical'] else 'NO':>9}"
        )


# ---------------------------------------------------------------- llama.cpp, the CPU peer (issue #30)
#
# The same random 124M weights, converted to GGUF by `gpt2 convert` (float32) and quantized by llama.cpp's own
# quantizer (q8_0, q4_0), decoded by llama-cpp-python, batch 1, greedy, the same 16-token prompt, 128 new tokens,
# `--threads` threads on both sides. Ours as the user sees it: `tokens_per_s` and `compile_s` of `gpt2 sample --json`
# (a fresh process each run, the Inductor cache warm after the first); and ours and llama.cpp in steady state: the
# time of a 144-token run minus that of a 16-token run, prefill included in both, so 128 steps of decoding alone.

PEER_PROMPT = " x" * 16  # 16 tokens of " x"
STEADY_LONG, STEADY_SHORT = 144, 16
# (our mode, its `gpt2 sample` flags, llama.cpp's format): each against the peer of the same bits per weight
PEER_MODES = [
    ("fp32-compiled", ["--compile"], "f32"),
    ("fp32", [], "f32"),
    ("int8-compiled", ["--quantize", "int8", "--compile"], "q8_0"),
    ("int8", ["--quantize", "int8"], "q8_0"),
    ("int4-g32-compiled", ["--quantize", "int4", "--group-size", "32", "--compile"], "q4_0"),
    ("int4-g64-compiled", ["--quantize", "int4", "--group-size", "64", "--compile"], "q4_0"),
    ("int4-g64", ["--quantize", "int4", "--group-size", "64"], "q4_0"),
]
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def ensure_llama_cpp() -> str | None:
    """llama-cpp-python's version, installing it (pip builds llama.cpp from source: minutes) where it is missing;
    None where it cannot be had. The benchmark's own dependency: neither the tool nor CI installs it."""
    probe = [sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode != 0:
        print("installing llama-cpp-python (builds llama.cpp: minutes) ...", file=sys.stderr, flush=True)
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], capture_output=True)
        if installed.returncode != 0:
            print(installed.stderr.decode(errors="replace")[-2000:], file=sys.stderr)
            return None
        found = subprocess.run(probe, capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def peer_ggufs(folder: Path, target: Path) -> dict[str, Path]:
    """The float32 GGUF (`gpt2 convert`) and llama.cpp's own q8_0 and q4_0 of it."""
    import ctypes

    import llama_cpp

    files = {"f32": target / "model-f32.gguf"}
    subprocess.run([sys.executable, "-m", "gpt2cli", "convert", str(folder), str(files["f32"])], check=True)
    for name, ftype in LLAMA_FTYPES.items():
        files[name] = target / f"model-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = os.cpu_count() or 1
        source, target_file = str(files["f32"]).encode(), str(files[name]).encode()
        if llama_cpp.llama_model_quantize(source, target_file, ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize to {name}")
    return files


def time_llama(gguf: Path, reps: int, threads: int) -> dict[str, Any]:
    """llama.cpp's decode rate in steady state (best of `reps` of each length), greedy, EOS ignored."""
    import llama_cpp

    from gpt2cli import get_tokenizer

    model = llama_cpp.Llama(str(gguf), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = get_tokenizer().encode(PEER_PROMPT)

    def run(new_tokens: int) -> float:
        model.reset()
        started = time.perf_counter()
        for count, _ in enumerate(model.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
            if count == new_tokens:
                break
        return time.perf_counter() - started

    run(STEADY_LONG)  # warm-up
    long_s = min(run(STEADY_LONG) for _ in range(reps))
    short_s = min(run(STEADY_SHORT) for _ in range(reps))
    return {"steady_tokens_per_s": (STEADY_LONG - STEADY_SHORT) / (long_s - short_s), "file_bytes": gguf.stat().st_size}


def time_ours_steady(folder: Path, reps: int, mode: str) -> dict[str, Any]:
    """Our decode rate in steady state, measured as llama.cpp's is (a 144-token run minus a 16-token run)."""
    import torch

    from gpt2cli import get_tokenizer, load_model
    from gpt2cli.generation.generator import TextGenerator
    from gpt2cli.generation.quantize import quantize_model
    from gpt2cli.generation.records import SamplingOptions, Timing
    from gpt2cli.runtime.devices import keep_freed_memory

    keep_freed_memory(torch.device("cpu"))
    flags = next(flags for name, flags, _ in PEER_MODES if name == mode)
    quantize = flags[flags.index("--quantize") + 1] if "--quantize" in flags else "none"
    group_size = int(flags[flags.index("--group-size") + 1]) if "--group-size" in flags else 32
    model = load_model(folder, dtype=torch.float32)
    quantize_model(model, quantize, group_size)
    tokenizer = get_tokenizer()
    generator = TextGenerator(model, tokenizer, compile="--compile" in flags)
    prompt = [tokenizer.encode(PEER_PROMPT)]

    def run(new_tokens: int) -> float:
        timing = Timing()
        options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eot=True)
        generator.generate(prompt, options, timing=timing)
        return timing.prefill_s + timing.decode_s  # the warm-up of the step apart, as `gpt2 sample` reports it

    run(STEADY_LONG)  # compiles and warms up every length
    long_s = min(run(STEADY_LONG) for _ in range(reps))
    short_s = min(run(STEADY_SHORT) for _ in range(reps))
    return {"steady_tokens_per_s": (STEADY_LONG - STEADY_SHORT) / (long_s - short_s)}


def time_ours_as_seen(folder: Path, mode: str, reps: int, threads: int) -> dict[str, Any]:
    """`gpt2 sample --json`'s own numbers, a fresh process each run: the median tokens_per_s, and compile_s."""
    flags = next(flags for name, flags, _ in PEER_MODES if name == mode)
    command = [sys.executable, "-m", "gpt2cli", "sample", str(folder), "--prompt", PEER_PROMPT, "--max-new-tokens"]
    command += [str(NEW_TOKENS), "--temperature", "0", "--ignore-eot", "--dtype", "float32", "--json", *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    records = []
    for _ in range(reps):
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
        records.append(json.loads(output.strip().splitlines()[-1]))
    rates = [record["tokens_per_s"] for record in records]
    return {
        "tokens_per_s": statistics.median(rates),
        "runs": rates,
        "compile_s": [record["compile_s"] for record in records],
    }


def section_llama_cpp(folder: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Each mode as `gpt2 sample --json` reports it and in steady state, against llama.cpp of the same bits."""
    version = ensure_llama_cpp()
    if version is None:
        report["llama_cpp"] = {"error": "llama-cpp-python could not be installed: no peer measured"}
        return
    peer: dict[str, Any] = {"llama_cpp_python": version, "threads": args.threads, "formats": {}, "modes": {}}
    report["llama_cpp"] = peer
    with tempfile.TemporaryDirectory(prefix="gpt2-sample-gguf-") as temporary:
        files = run_worker("llama-files", folder, args, extra=["--gguf-dir", temporary])
        for name, path in files.items():
            peer["formats"][name] = run_worker("llama-time", Path(path), args)
    for mode, _, peer_format in PEER_MODES:
        seen = run_worker(f"seen-{mode}", folder, args)
        steady = run_worker(f"steady-{mode}", folder, args)["steady_tokens_per_s"]
        llama = peer["formats"][peer_format]["steady_tokens_per_s"]
        peer["modes"][mode] = {
            **seen,
            "steady_tokens_per_s": steady,
            "peer": peer_format,
            "vs_llama_cpp_as_seen": seen["tokens_per_s"] / llama,
            "vs_llama_cpp_steady": steady / llama,
            "as_seen_of_steady": seen["tokens_per_s"] / steady,
        }


def print_llama_cpp(report: dict[str, Any]) -> None:
    peer = report.get("llama_cpp")
    if peer is None:
        return
    if "error" in peer:
        print(f"\nllama.cpp: {peer['error']}")
        return
    print(
        f"\nagainst llama.cpp (llama-cpp-python {peer['llama_cpp_python']}), {peer['threads']} threads, batch 1, "
        f"greedy, 16-token prompt, {NEW_TOKENS} new tokens; steady state = ({STEADY_LONG} - {STEADY_SHORT}) tokens / "
        f"(t{STEADY_LONG} - t{STEADY_SHORT})"
    )
    for name, result in peer["formats"].items():
        rate, megabytes = result["steady_tokens_per_s"], result["file_bytes"] / 1e6
        print(f"llama.cpp {name:<5} steady {rate:8.1f} tok/s ({megabytes:.0f} MB)")
    print(
        f"{'mode':<18} {'as seen':>8} {'steady':>8} {'seen/steady':>11} {'peer':>5} {'x peer seen':>11} "
        f"{'x peer steady':>13}  compile_s (each run)"
    )
    for name, r in peer["modes"].items():
        compile_s = ", ".join(f"{value:.1f}" for value in r["compile_s"])
        print(
            f"{name:<18} {r['tokens_per_s']:>8.1f} {r['steady_tokens_per_s']:>8.1f} {r['as_seen_of_steady']:>10.0%} "
            f"{r['peer']:>5} {r['vs_llama_cpp_as_seen']:>10.2f}x {r['vs_llama_cpp_steady']:>12.2f}x  {compile_s}"
        )


SECTION_NAMES = {
    "modes": section_modes,
    "perplexity": section_perplexity,
    "batch": section_batch,
    "lookup": section_prompt_lookup,
    "llama": section_llama_cpp,
}


def print_table(report: dict[str, Any]) -> None:
    hf = report["hf_fp32"]
    print(
        f"sample benchmark {report['date']}: 124M random weights, batch 1, 16-token prompt, {NEW_TOKENS} new "
        f"tokens, greedy; read bandwidth {report['read_GB_per_s']:.1f} GB/s; perplexity on "
        f"{report['perplexity_model']}"
    )
    print(
        f"{'mode':<18} {'decode tok/s':>12} {'vs hf':>6} {'MB/token':>8} {'limit tok/s':>11} {'of limit':>8} "
        f"{'perplexity':>10} {'change':>8}"
    )
    print(
        f"{'hf-fp32':<18} {hf['decode_tokens_per_s']:>12.1f} {'':>6} {'':>8} {'':>11} "
        f"{hf['fraction_of_read_limit']:>8.0%}"
    )
    for name, r in report["modes"].items():
        print(
            f"{name:<18} {r['decode_tokens_per_s']:>12.1f} {r['vs_transformers']:>5.2f}x "
            f"{r['bytes_per_token'] / 1e6:>8.1f} {r['read_limit_tokens_per_s']:>11.1f} "
            f"{r['fraction_of_read_limit']:>8.0%} {r.get('perplexity', float('nan')):>10.3f} "
            f"{r.get('perplexity_change', float('nan')):>+8.2%}"
        )
    for name, r in report.get("batch8", {}).items():
        print(f"batch 8, {name}: {r['decode_tokens_per_s']:.1f} generated tok/s = {r['vs_batch1']:.2f}x batch 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--checkpoint",
        help="A trained checkpoint: each mode's perplexity change is measured on it "
        "(else on the random weights) and prompt lookup runs on it (else on the default run, trained "
        "into runs/ if missing).",
    )
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="Held-out tokens scored for perplexity.")
    parser.add_argument("--threads", type=int, default=2, help="Threads for every contender (OMP_NUM_THREADS).")
    parser.add_argument(
        "--sections",
        default=",".join(SECTION_NAMES),
        help=f"Which parts to run, comma-separated, of {', '.join(SECTION_NAMES)} (default: all).",
    )
    parser.add_argument("--tiny", action="store_true", help="A 2-layer, 64-wide model: checks the script runs.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gguf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sections = [SECTION_NAMES[name] for name in args.sections.split(",")]
    if {section_batch, section_perplexity} & set(sections) and section_modes not in sections:
        parser.error("--sections batch and perplexity need modes (they add to its table)")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "new_tokens": NEW_TOKENS, **machine()}
    with tempfile.TemporaryDirectory(prefix="gpt2-sample-bench-") as temporary:
        folder = build_checkpoint(Path(temporary), args.tiny)
        for section in sections:
            section(folder, args, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['cpu']} ({', '.join(report['cpu_flags'])}), {report['cores']} cores, torch {report['torch']}, "
        f"Python {report['python']}"
    )
    if "modes" in report:
        print_table(report)
    if "prompt_lookup" in report:
        print_prompt_lookup(report)
    print_llama_cpp(report)


if __name__ == "__main__":
    main()
