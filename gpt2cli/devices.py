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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense peak TFLOP/s for 16-bit tensor-core math (bf16/fp16 with fp32 accumulation), from the vendors' datasheets;
# matched against torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_TFLOPS_16BIT: list[tuple[str, float]] = [
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),  # SXM
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"L4\b", 121.0),
    (r"A10G", 70.0),
    (r"A10\b", 125.0),
    (r"RTX 4090", 165.0),
    (r"RTX 3090", 71.0),
    (r"V100", 125.0),
    (r"T4\b", 65.0),
]


# Peak memory bandwidth in GB/s (HBM / GDDR), for decode's achieved-bandwidth column.
PEAK_BANDWIDTH_GBPS: list[tuple[str, float]] = [
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),
    (r"A100.*80GB", 2039.0),
    (r"A100", 1555.0),
    (r"L40S", 864.0),
    (r"L4\b", 300.0),
    (r"A10G", 600.0),
    (r"A10\b", 600.0),
    (r"RTX 4090", 1008.0),
    (r"RTX 3090", 936.0),
    (r"V100", 900.0),
    (r"T4\b", 320.0),
]


def _lookup(table: list[tuple[str, float]], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, value in table:
        if re.search(pattern, name):
            return value
    return None


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; asking for a device that is not there is a usage error."""
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
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return torch.device(name)


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

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """`auto`: bf16 where the device computes it fast, fp16 with loss scaling on older GPUs, else float32.

    Weights stay float32 (the optimizer's master copy); only the forward and backward run in the 16-bit type.
    """
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device.type == "cpu" and cpu_has_fast_bf16():
            dtype = "bfloat16"
        else:
            dtype = "float32"
    if dtype == "float32":
        return Precision(device, None)
    if dtype == "float16" and device.type == "cpu":
        raise UsageError("--dtype float16 is not supported for training on the CPU; use bfloat16 or float32")
    return Precision(device, DTYPES[dtype], needs_scaler=dtype == "float16")


def peak_tflops(device: torch.device, dtype: torch.dtype | None = None) -> float | None:
    """The device's dense peak for `dtype` (16-bit by default), or None where unknown (MFU is then omitted).

    float32 runs on tensor cores as TF32 (enabled for CUDA here), whose dense rate is half the 16-bit one on every
    GPU in the table.
    """
    peak = _lookup(PEAK_TFLOPS_16BIT, device)
    if peak is not None and dtype == torch.float32:
        return peak / 2
    return peak


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    return _lookup(PEAK_BANDWIDTH_GBPS, device)


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
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
