"""Devices, compute dtypes and the peak throughput figures that MFU is measured against."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

# MKL may otherwise use fewer threads when the machine is busy, which changes the order of its sums: the same run
# would give different float32 results under load, and a resumed run would not match an uninterrupted one. MKL
# reads this when it first runs, which is after this module is imported.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import torch

from gpt2cli.errors import UsageError
from gpt2cli.runtime.device_rules import (
    DISPATCH_KEYS,
    INT4_OPS,
    INT8_OPS,
    Capability,
    DeviceRules,
    int8_cuda_choice,
    maxrss_bytes,
    rules_for,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GpuPeaks:
    """One GPU's dense (not sparse) peaks from the vendor's datasheet; None where the GPU lacks the unit.

    `bf16` and `fp16` are tensor-core rates with float32 accumulation; `tf32` the tensor-core rate for float32
    matmuls when TF32 is on; `fp32` the plain CUDA-core rate (float32 with TF32 off, or GPUs without TF32).
    """

    pattern: str  # matched against torch.cuda.get_device_name(), in table order: the more specific names first
    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float
    bandwidth_gbps: float


# Word boundaries keep e.g. "GH200" from matching "H200". The NVL parts run at lower clocks than the SXM ones.
GPU_PEAKS: list[GpuPeaks] = [
    GpuPeaks(r"\bH200 NVL\b", bf16=835.0, fp16=835.0, tf32=418.0, fp32=60.0, bandwidth_gbps=4800.0),
    GpuPeaks(r"\bH200\b", bf16=989.0, fp16=989.0, tf32=494.0, fp32=67.0, bandwidth_gbps=4800.0),  # SXM
    GpuPeaks(r"\bH100 NVL\b", bf16=835.0, fp16=835.0, tf32=418.0, fp32=60.0, bandwidth_gbps=3900.0),
    GpuPeaks(r"\bH100\b.*PCIe", bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.0, bandwidth_gbps=2000.0),
    GpuPeaks(r"\bH100\b", bf16=989.0, fp16=989.0, tf32=494.0, fp32=67.0, bandwidth_gbps=3350.0),  # SXM
    GpuPeaks(r"\bA100\b.*80GB PCIe", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5, bandwidth_gbps=1935.0),
    GpuPeaks(r"\bA100\b.*80GB", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5, bandwidth_gbps=2039.0),
    GpuPeaks(r"\bA100\b", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5, bandwidth_gbps=1555.0),
    GpuPeaks(r"\bL40S\b", bf16=362.0, fp16=362.0, tf32=183.0, fp32=91.6, bandwidth_gbps=864.0),
    GpuPeaks(r"\bL4\b", bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3, bandwidth_gbps=300.0),
    GpuPeaks(r"\bA10G\b", bf16=70.0, fp16=70.0, tf32=35.0, fp32=31.2, bandwidth_gbps=600.0),
    GpuPeaks(r"\bA10\b", bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2, bandwidth_gbps=600.0),
    GpuPeaks(r"RTX 4090\b", bf16=165.0, fp16=165.0, tf32=82.6, fp32=82.6, bandwidth_gbps=1008.0),
    GpuPeaks(r"RTX 3090\b", bf16=71.0, fp16=71.0, tf32=35.6, fp32=35.6, bandwidth_gbps=936.0),
    # Volta and Turing: fp16 tensor cores only; bf16 is emulated and there is no TF32.
    GpuPeaks(r"\bV100\b", bf16=None, fp16=125.0, tf32=None, fp32=15.7, bandwidth_gbps=900.0),
    GpuPeaks(r"\bT4\b", bf16=None, fp16=65.0, tf32=None, fp32=8.1, bandwidth_gbps=320.0),
]


def gpu_peaks(name: str) -> GpuPeaks | None:
    """The table's row for a device name; None for unknown GPUs and MIG slices (a slice has a fraction of the
    GPU's units, and its name is the whole GPU's plus "MIG ...")."""
    if re.search(r"\bMIG\b", name):
        return None
    return next((row for row in GPU_PEAKS if re.search(row.pattern, name)), None)


def peak_tflops_for(name: str, dtype: torch.dtype, tf32: bool = True) -> float | None:
    """The dense peak (TFLOP/s) of the GPU called `name` for matmuls in `dtype` (the run's compute dtype);
    float32 counts as TF32 where `tf32` is on and the GPU has it. None where unknown: no MFU then."""
    row = gpu_peaks(name)
    if row is None:
        return None
    if dtype == torch.bfloat16:
        return row.bf16
    if dtype == torch.float16:
        return row.fp16
    return row.tf32 if tf32 and row.tf32 is not None else row.fp32


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; asking for a device that is not there is a usage error.

    `cuda:N` also becomes the current CUDA device: kernels torch launches without an explicit device (Triton's,
    CUDA graphs, `torch.cuda.synchronize()`) then run on the device asked for rather than on GPU 0."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        if device.index is not None:
            torch.cuda.set_device(device)
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def device_capability(device: torch.device) -> Capability | None:
    """The compute capability of the CUDA device used (`cuda` alone: the current one), None for other devices.

    `torch.cuda.is_bf16_supported()` would also count emulated bf16 (V100, T4), and asks about the current device,
    not necessarily `device`. None too where this build or machine has no CUDA (tests ask about CUDA on the CPU)."""
    if device.type != "cuda":
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
    except (AssertionError, RuntimeError):  # "Torch not compiled with CUDA enabled", no driver
        return None
    return major, minor


@functools.cache
def missing_ops(device_type: str) -> frozenset[str]:
    """The int8/int4 kernels' aten operators this torch build registers no kernel for on `device_type` (the CUDA
    int8 kernel came in a later release than the oldest torch we run on, for one)."""
    key = DISPATCH_KEYS.get(device_type)
    if key is None:
        return frozenset()
    ops = {op for table in (INT8_OPS, INT4_OPS) for names in table.values() for op in names}
    return frozenset(op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key))


def device_rules(device: torch.device) -> DeviceRules:
    """The rules (`device_rules.rules_for`) of the device used, from its facts: the CUDA capability, the CPU's
    native bf16, the kernels this torch build has, and the CUDA int8 kernel asked for ($GPT2_CUDA_INT8)."""
    try:
        int8_cuda = int8_cuda_choice(os.environ)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return rules_for(
        device.type,
        device_capability(device),
        cpu_fast_bf16=device.type == "cpu" and cpu_has_fast_bf16(),
        int8_cuda=int8_cuda,
        missing_ops=missing_ops(device.type),
    )


def int8_runs_fast(device: torch.device, compiled: bool) -> bool:
    """Weight-only int8 pays only where a kernel reads the int8 weights directly (`_weight_int8pack_mm`: the CPU's,
    CUDA's, MPS's), or on CUDA's `fused` path the matmul torch.compile generates with the int8-to-float conversion
    fused into it (gpt-fast's way). Rebuilding every float weight at every decode step is slower than float."""
    return device_rules(device).int8_runs_fast(compiled)


def check_int8_runs_fast(device: torch.device, compiled: bool) -> None:
    """Refuse `--quantize int8` where it runs slower than the float weights (`int8_runs_fast`)."""
    if int8_runs_fast(device, compiled):
        return
    rules = device_rules(device)
    if rules.int8_kernel == "fused":
        raise UsageError(f"--quantize int8 on CUDA needs --compile ({rules.int8_problem})")
    problem = rules.int8_problem or "every step would rebuild the float weights (slower than without --quantize)"
    raise UsageError(f"--quantize int8 on {device.type}: {problem}; use --quantize int4 or none")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16), so bf16 autocast is faster than float32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


@dataclass(frozen=True)
class Precision:
    """How a device computes: the autocast dtype (None: plain float32) and whether losses need scaling."""

    device: torch.device
    dtype: torch.dtype | None
    needs_scaler: bool = False

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation value: 4 in float32, 2 under bf16/fp16 autocast."""
        return 4 if self.dtype is None else self.dtype.itemsize

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """`auto`: bf16 where the device computes it fast, fp16 with loss scaling on older GPUs, else float32
    (`DeviceRules.auto_dtype`).

    Weights stay float32 (the optimizer's master copy); only the forward and backward run in the 16-bit type.
    """
    rules = device_rules(device)
    if dtype == "auto":
        dtype = rules.auto_dtype
    if dtype == "float32":
        return Precision(device, None)
    if dtype == "float16" and not rules.float16:
        raise UsageError("--dtype float16 is not supported for training on the CPU; use bfloat16 or float32")
    return Precision(device, DTYPES[dtype], needs_scaler=dtype == "float16")


def peak_tflops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's dense peak for a run computing in `dtype` (None: float32), or None where unknown.

    float32 matmuls run as TF32 on CUDA here (`fast_matmul`), so float32 is measured against the TF32 peak."""
    if not device_rules(device).peak_table:
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device), dtype or torch.float32)


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    if not device_rules(device).peak_table:
        return None
    row = gpu_peaks(torch.cuda.get_device_name(device))
    return None if row is None else row.bandwidth_gbps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):  # noqa: SIM115
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return device.type


def keep_freed_memory(device: torch.device) -> bool:
    """On the CPU, tell glibc's allocator to keep freed memory in the process instead of returning it to the OS.

    A training step allocates and frees hundreds of MB of temporaries (logits, activations). By default glibc serves
    blocks over 32 MB with fresh mmap()s and trims the heap after frees, so every step page-faults that memory in
    again: on a 2-core VM that was 890k page faults and 1.9 s of kernel time per step of a 4-layer model (1.67 s
    per step; 0.58 s with this setting). The price is that the process keeps its peak memory until it exits, so
    nothing changes when the tensors live on another device. Returns whether the setting was applied (glibc on
    Linux only).
    """
    return device.type == "cpu" and _keep_freed_host_memory()


@functools.cache
def _keep_freed_host_memory() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    trim_threshold, top_pad, mmap_threshold = -1, -2, -3  # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
    largest = 2**31 - 1  # mallopt takes an int
    return bool(mallopt(mmap_threshold, largest) and mallopt(trim_threshold, largest) and mallopt(top_pad, 1 << 28))


@contextlib.contextmanager
def fast_matmul(device: torch.device) -> Iterator[None]:
    """TF32 for float32 matmuls on CUDA (the precision GPT-2 training tolerates), restored afterwards."""
    if not device_rules(device).tf32:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


# ---------------------------------------------------------------- timing and memory, as the rules say


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (before reading a clock); nothing to wait for on the CPU."""
    if not device_rules(device).asynchronous:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_cached_memory(device: torch.device) -> None:
    """Hand the memory torch's caching allocator holds unused back to the device (CUDA, MPS)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's CUDA counter, or an emptied Metal pool (which then grows to the new peak)."""
    kind = device_rules(device).peak_memory
    if kind in ("allocator", "driver"):
        release_cached_memory(device)
    if kind == "allocator":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The peak memory since `reset_peak_memory`: CUDA's peak allocated bytes; on MPS the Metal driver's pool, which
    keeps what it allocated (so its size is the peak, an upper bound of the tensors'); elsewhere the process's peak
    resident memory (for the whole process so far). None where the platform does not say (Windows)."""
    kind = device_rules(device).peak_memory
    if kind == "allocator":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "driver":
        return int(torch.mps.driver_allocated_memory())
    try:
        import resource
    except ImportError:  # Windows
        return None
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)
