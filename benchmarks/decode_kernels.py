"""Benchmark: one-row (batch-1 decode) products of the 124M model's shapes in every kernel a quantized decode step
could use on the CPU, against the kernel `gpt2 sample` uses today for the same weights, in the same run.

Shapes (in -> out): 768 -> 2304 (attention's c_attn), 768 -> 768 (c_proj), 768 -> 3072 (the MLP's c_fc),
3072 -> 768 (its c_proj) and 768 -> 50257 (the output head). Kernels:

  fp32-linear       F.linear, float32 (eager float32 today)
  fp32-matvec-c     `quantize.compiled_matvec` compiled (float32 `--compile` today)
  int8-pack         `_weight_int8pack_mm`, bf16 activations (eager int8 today)
  int8-matvec-c     `compiled_matvec` of the int8 weights compiled (int8 `--compile` today)
  int8-int_mm       the row quantized to int8 (per-row absmax), `torch._int_mm` int8 x int8 -> int32, rescaled
                    (what torchao's int8 dynamic-activation x int8-weight runs on the CPU)
  int8-dyn-c        the same arithmetic compiled by Inductor (int8 x int8 summed in int32, one loop)
  int4-gG           `_weight_int4pack_mm_for_cpu` (tinygemm, bf16 activations), groups of G (int4 today)
  ao-da8w4-gG       torchao's `Int8DynamicActInt4WeightCPULayout` kernel (`da8w4_linear_cpu`), where torchao is
                    installed with its CPU kernels (PyPI's 0.18 wheel has none: reported, not timed)

Each kernel's result is checked against its dequantized reference before timing. Timing: `--rounds` rounds, each
timing every kernel in turn (`--calls` calls each), so a busy machine slows all alike; the best round per kernel is
reported, as microseconds per call, GB/s of weights (and scales) read, and the ratio to today's kernel for the same
format (fp32-linear, int8-pack, int4-gG eager; the compiled ones against the compiled today's). This machine's read
bandwidth (summing 512 MiB) is printed beside them: the most a streaming kernel could reach.

  python benchmarks/decode_kernels.py                  # 2 threads, table
  python benchmarks/decode_kernels.py --threads 1 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]
GROUPS = (32, 64)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide which int8 kernels are fast (VNNI: int8 dot products in one instruction)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return [flag for flag in wanted if flag in flags]


def quantize_row(x: Any) -> tuple[Any, Any]:
    """The activation row as int8 with one absmax scale (dynamic, symmetric): the activation half of an int8 x int8
    product."""
    import torch

    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def int_mm_product(x: Any, weight_t: Any, scales: Any) -> Any:
    """x `(1, K)` float, `weight_t` `(K, N)` int8, `scales` `(N,)`: `_int_mm` of the quantized row, rescaled."""
    import torch

    quantized, row_scale = quantize_row(x)
    return torch._int_mm(quantized, weight_t).float() * (row_scale * scales)


def dynamic_int8_reduction(x: Any, weight: Any, scales: Any) -> Any:
    """The same as one loop for Inductor: int8 x int8 summed in int32 over the weight `(N, K)`."""
    import torch

    quantized, row_scale = quantize_row(x)
    total = (weight.to(torch.int32) * quantized.reshape(-1).to(torch.int32)).sum(-1)
    return (total.float() * scales * row_scale.reshape(())).unsqueeze(0)


def build_kernels(in_features: int, out_features: int) -> dict[str, tuple[Callable[[], Any], Any, int, str]]:
    """name -> (call, reference output, bytes of weights and scales read, the kernel it is compared with)."""
    import torch

    from gpt2cli.generation.quantize import compiled_matvec, dequantize, group_quantize, pack_int4
    from gpt2cli.runtime.compile import default_compile_arguments

    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.02
    x = torch.randn(1, in_features)
    kernels: dict[str, tuple[Callable[[], Any], Any, int, str]] = {}

    fp32_reference = x @ weight.t()
    matvec = torch.compile(compiled_matvec, **default_compile_arguments())
    kernels["fp32-linear"] = (lambda: torch.nn.functional.linear(x, weight), fp32_reference, weight.nbytes, "")
    kernels["fp32-matvec-c"] = (lambda: matvec(weight, x), fp32_reference[0], weight.nbytes, "")

    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    int8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    scales_bf16 = scales.to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    int8_bytes = int8.nbytes + scales_bf16.nbytes
    int8_reference = x @ (int8.float() * scales_bf16.float()[:, None]).t()
    kernels["int8-pack"] = (
        lambda: torch._weight_int8pack_mm(x_bf16, int8, scales_bf16),
        int8_reference,
        int8_bytes,
        "",
    )
    kernels["int8-matvec-c"] = (lambda: matvec(int8, x) * scales_bf16.float(), int8_reference[0], int8_bytes, "")
    int8_t = int8.t()  # (K, N) column-major: the stored rows, no copy
    scales_f32 = scales_bf16.float()
    dynamic = torch.compile(dynamic_int8_reduction, **default_compile_arguments())
    kernels["int8-int_mm"] = (
        lambda: int_mm_product(x, int8_t, scales_f32),
        int8_reference,
        int8.nbytes + scales_f32.nbytes,
        "int8-pack",
    )
    kernels["int8-dyn-c"] = (
        lambda: dynamic(x, int8, scales_f32),
        int8_reference,
        int8.nbytes + scales_f32.nbytes,
        "int8-matvec-c",
    )

    padded = -(-out_features // 64) * 64
    padded_weight = torch.cat([weight, weight.new_zeros(padded - out_features, in_features)])
    for group in GROUPS:
        codes, table = group_quantize(padded_weight, group)
        packed = pack_int4(codes, "cpu")
        reference = x @ dequantize(codes, table, group)[:out_features].t()
        kernels[f"int4-g{group}"] = (
            lambda packed=packed, table=table, group=group: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x_bf16, packed, group, table
            )[:, :out_features],
            reference,
            packed.nbytes + table.nbytes,
            "",
        )
    return kernels


def torchao_state() -> str:
    """Whether torchao's x86 int8 x int4 kernel can run here: its version, or why not."""
    try:
        import torch
        import torchao
    except ImportError:
        return "torchao not installed"
    try:
        weight = torch.randint(0, 15, (64, 128), dtype=torch.uint8)
        torchao.ops.da8w4_linear_prepack_cpu(weight, torch.rand(64, 4), torch.zeros(64, 4, dtype=torch.int8))
    except (NotImplementedError, RuntimeError, AttributeError) as error:
        return f"torchao {torchao.__version__}: da8w4_linear_cpu cannot run here ({type(error).__name__})"
    return f"torchao {torchao.__version__}: da8w4_linear_cpu available (not yet timed by this script)"


def check(name: str, call: Callable[[], Any], reference: Any) -> float:
    """Largest error of a kernel against its dequantized reference, relative to the reference's largest value."""
    out = call().float().reshape(reference.shape)
    error = float((out - reference).abs().max() / reference.abs().max())
    limit = 0.05 if "int_mm" in name or "dyn" in name else 0.02  # the row's own int8 rounding: a little more
    if error > limit:
        raise SystemExit(f"{name}: off by {error:.3g} of the largest output against its reference")
    return error


def time_round(call: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="IN x OUT, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from gpt2cli.runtime.bandwidth import read_bandwidth
    from gpt2cli.runtime.compile import allow_step_shapes

    torch.set_num_threads(args.threads)
    allow_step_shapes(64)  # each shape and dtype compiles the same functions again
    shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes.split(",")]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "torchao": torchao_state(),
        "read_GB_per_s": round(read_bandwidth("cpu", passes=3) / 1e9, 2),
        "shapes": {},
    }
    with torch.inference_mode():
        for in_features, out_features in shapes:
            print(f"{in_features} -> {out_features} ...", file=sys.stderr, flush=True)
            kernels = build_kernels(in_features, out_features)
            errors = {name: check(name, call, reference) for name, (call, reference, _, _) in kernels.items()}
            best = dict.fromkeys(kernels, float("inf"))
            for _ in range(args.rounds):
                for name, (call, *_) in kernels.items():
                    best[name] = min(best[name], time_round(call, args.calls))
            rows = {}
            for name, (_, _, read, peer) in kernels.items():
                rows[name] = {
                    "us": best[name] * 1e6,
                    "GB_per_s": read / best[name] / 1e9,
                    "relative_error": errors[name],
                    "vs": peer,
                    "speedup": best[peer] / best[name] if peer else None,
                }
            report["shapes"][f"{in_features}x{out_features}"] = rows
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"decode kernels {report['date']}: {report['cpu']} ({', '.join(report['cpu_flags'])}), {report['cores']} "
        f"cores, {args.threads} threads, torch {report['torch']}; {report['torchao']}; read bandwidth "
        f"{report['read_GB_per_s']:.1f} GB/s; best of {args.rounds} rounds of {args.calls} calls"
    )
    for shape, rows in report["shapes"].items():
        print(f"\n{shape:<16} {'us/call':>9} {'GB/s':>7} {'rel.err':>8}  vs today's")
        for name, row in rows.items():
            versus = f"{row['speedup']:.2f}x {row['vs']}" if row["speedup"] else ""
            print(f"{name:<16} {row['us']:>9.1f} {row['GB_per_s']:>7.1f} {row['relative_error']:>8.1e}  {versus}")


if __name__ == "__main__":
    main()
