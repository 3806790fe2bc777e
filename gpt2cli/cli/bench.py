"""`gpt2 bench`: tokens/s, MFU and memory of training, forward, prefill and decode on this device."""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Annotated, Any

import typer

from gpt2cli.cli.options import (
    OUTPUT,
    RUN,
    SPEED,
    BlockSizeOption,
    CompileOption,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    NEmbdOption,
    NHeadOption,
    NLayerOption,
    PresetOption,
    SectionSetting,
    overrides,
)
from gpt2cli.cli.output import info, write_stdout
from gpt2cli.settings.sections import BenchSettings, ModelSettings
from gpt2cli.settings.types import OutputFormat, Quantize

COLUMNS = [
    *("test", "batch_size", "seq_len", "dtype", "compile", "tokens_per_s", "tokens_per_s_std", "mfu"),
    *("peak_memory_bytes", "warmup_s", "ms_per_token", "bandwidth_gbps", "bandwidth_fraction", "quantize"),
    *("group_size", "weight_bytes_per_token", "measured_read_gbps", "measured_read_fraction", "error"),
]

_b = SectionSetting(BenchSettings, RUN)


def _ints(text: str | None) -> list[int] | None:
    from gpt2cli.errors import UsageError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"expected a comma list of whole numbers, got {text!r}") from None


def command(
    preset: PresetOption = None,
    n_layer: NLayerOption = None,
    n_head: NHeadOption = None,
    n_embd: NEmbdOption = None,
    block_size: BlockSizeOption = None,
    device: DeviceOption[BenchSettings] = None,
    dtype: DtypeOption[BenchSettings] = None,
    compile: CompileOption[BenchSettings] = None,
    # Comma lists on the command line, lists in the settings: these three are converted below.
    batch_size: Annotated[str | None, _b("batch_sizes", RUN, metavar="INTEGERS")] = None,
    seq_len: Annotated[str | None, _b("seq_lens", RUN, metavar="INTEGERS")] = None,
    tests: Annotated[str | None, _b("tests", RUN, metavar="TEXT")] = None,
    reps: Annotated[int | None, _b("reps")] = None,
    warmup: Annotated[int | None, _b("warmup")] = None,
    peak_tflops: Annotated[float | None, _b("peak_tflops")] = None,
    quantize: Annotated[Quantize | None, _b("quantize", SPEED)] = None,
    group_size: Annotated[int | None, _b("group_size", SPEED)] = None,
    output_format: Annotated[OutputFormat | None, _b("output_format", OUTPUT, "--format")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Same as --format json.", rich_help_panel=OUTPUT)] = False,
    config: ConfigOption = None,
) -> None:
    """Measure tokens/s (mean ± std), MFU and peak memory of train, fwd, ppN (prefill) and tgN (decode).

    Random weights of the chosen shape. FLOPs per token: training 6·N + 12·L·C·T (N parameters without position
    embeddings, L layers, C width, T sequence length), forward a third of it; MFU divides by the device's dense
    peak for the dtype (known GPUs, or --peak-tflops) and is omitted where the peak is unknown. For tgN, the
    achieved bandwidth is the weight bytes read per decode step × steps/s, against this machine's read bandwidth
    (measured once per run by summing a 512 MiB buffer) and, for known GPUs, their peak. --quantize int8|int4
    applies to fwd, ppN and tgN.
    """
    from gpt2cli.settings.sections import load_settings

    flags = overrides(locals(), model=ModelSettings, bench=BenchSettings)
    lists = {
        "batch_sizes": _ints(batch_size),
        "seq_lens": _ints(seq_len),
        "tests": tests.split(",") if tests is not None else None,
        "output_format": "json" if json_output else output_format,
    }
    flags.setdefault("bench", {}).update({name: value for name, value in lists.items() if value is not None})
    settings = load_settings(config, flags)
    run_bench(settings)


def run_bench(settings: Any) -> None:
    import torch

    from gpt2cli.benchmark import Runner, environment, parse_tests, plan_cases
    from gpt2cli.generation.loading import prepare_inference
    from gpt2cli.model.gpt2 import GPT2
    from gpt2cli.runtime.devices import resolve_device, resolve_precision

    options = settings.bench
    tests = parse_tests(options.tests)
    device = resolve_device(options.device)
    precision = resolve_precision(options.dtype, device)
    prepare_inference(device, options.quantize, options.group_size, compile=options.compile, decode=True)
    config = settings.model.to_config()
    cases = plan_cases(tests, options.batch_sizes, options.seq_lens or [config.block_size], config.block_size)
    torch.manual_seed(0)
    model = GPT2(config).to(device)
    runner = Runner(model, precision, options.compile, options.peak_tflops, options.quantize, options.group_size)
    env = environment(device)
    quantized = "" if options.quantize == "none" else f" · {options.quantize}"
    quantized += f" (group size {options.group_size})" if options.quantize == "int4" else ""
    info(
        f"bench: {env['device_name']} · {precision.name}{quantized} · compile {options.compile} · "
        f"{model.num_parameters() / 1e6:.1f}M parameters · {len(cases)} case(s)"
    )

    def on_rep(case: Any, phase: str, index: int, total: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r\x1b[2K{case.test} b{case.batch_size} s{case.seq_len}: {phase} {index}/{total}")
            sys.stderr.flush()

    results = []
    for case in cases:
        result = runner.run(case, options.reps, options.warmup, on_rep)
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[2K")
        status = "OOM" if result.error else f"{result.tokens_per_s:,.1f} ± {result.tokens_per_s_std:,.1f} tok/s"
        info(f"{case.test} batch {case.batch_size} seq {case.seq_len}: {status}")
        results.append(result.as_dict())
    measured = next((row["measured_read_gbps"] for row in results if row["measured_read_gbps"]), None)
    if measured is not None:
        env["measured_read_gbps"] = measured
    _print(results, env, options.output_format)


def _print(results: list[dict[str, Any]], env: dict[str, Any], output_format: str) -> None:
    if output_format == "json":
        write_stdout([json.dumps({"environment": env, "results": results}, indent=2) + "\n"])
    elif output_format == "jsonl":
        write_stdout([json.dumps(row) + "\n" for row in results])
    elif output_format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(results)
        write_stdout([buffer.getvalue()])
    elif output_format == "md":
        rows = [_human(row, env) for row in results]
        header = list(rows[0]) if rows else []
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
        write_stdout(["\n".join(lines) + "\n"])
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"gpt2 bench · {env['device_name']} · torch {env['torch']}", title_justify="left")
        rows = [_human(row, env) for row in results]
        for column in rows[0] if rows else []:
            table.add_column(column, justify="left" if column in ("device", "test", "dtype") else "right")
        for row in rows:
            table.add_row(*row.values())
        Console(width=None if sys.stdout.isatty() else 200).print(table)  # a pipe gets every column unwrapped


def _human(row: dict[str, Any], env: dict[str, Any]) -> dict[str, str]:
    def number(value: float | None, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    oom = row["error"] == "OOM"
    extra = ""
    if row["bandwidth_gbps"] is not None:
        shares = [f"{row['measured_read_fraction']:.0%} of read"] if row["measured_read_fraction"] is not None else []
        shares += [f"{row['bandwidth_fraction']:.0%} of peak"] if row["bandwidth_fraction"] is not None else []
        extra = f"{row['bandwidth_gbps']:.1f} GB/s" + (f" ({', '.join(shares)})" if shares else "")
    weights = row["dtype"] if row["quantize"] == "none" else row["quantize"]
    weights += f"/g{row['group_size']}" if row["group_size"] else ""
    return {
        "device": env["device_name"],
        "dtype": row["dtype"],
        "weights": weights,
        "compile": "yes" if row["compile"] else "no",
        "test": row["test"],
        "batch": str(row["batch_size"]),
        "seq": str(row["seq_len"]),
        "tokens/s": "OOM" if oom else number(row["tokens_per_s"], "{:,.1f}"),
        "±": "" if oom else number(row["tokens_per_s_std"], "{:,.1f}"),
        "MFU": number(row["mfu"] * 100 if row["mfu"] is not None else None, "{:.1f}%"),
        "memory": number(row["peak_memory_bytes"] / 2**20 if row["peak_memory_bytes"] else None, "{:,.0f} MiB"),
        "ms/token": number(row["ms_per_token"], "{:.2f}"),
        "bandwidth": extra or "-",
        "warm-up": number(row["warmup_s"], "{:.2f} s"),
    }
