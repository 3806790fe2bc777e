"""What each kind of device does, decided in one place: pure functions of the device type and, for CUDA, the
compute capability. Torch-free, so that tests can ask about devices this machine does not have (CUDA 7.0, 8.0,
9.0, Apple's MPS) and construct what each would run.

The code that holds a real device gathers its facts (`devices.device_rules`: the capability, whether the CPU
multiplies bf16 natively, the kernels this torch build has, the int8 kernel asked for) and takes every decision
from the `DeviceRules` that `rules_for` returns. docs/devices.md shows the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Capability = tuple[int, int]
Int8Kernel = Literal["int8pack", "dequant", "fused"]
Int4Kernel = Literal["cpu", "tinygemm"]
PeakMemory = Literal["allocator", "driver", "process"]

BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores (V100, T4 emulate it: slower than fp16)
TRITON_CAPABILITY = (7, 0)  # Volta: Triton's oldest target
TINYGEMM_CAPABILITY = (8, 0)  # torch's int4 CUDA kernel is built for Ampere and later only
TF32_CAPABILITY = (8, 0)
EAGER_FALLBACK_TFLOPS = 0.45  # devices without a guess of their own take the CPU's (compiling less)

# int8 weight-only decoding on CUDA, two candidates (docs/devices.md, "int8 on CUDA"):
#   "int8pack" torch's `_weight_int8pack_mm` CUDA kernel: it reads the int8 weights and their scales and nothing
#              else, eager or compiled, at every batch size. The default, being the one whose reads are int8 by
#              construction.
#   "fused"    `F.linear` on the int8 weights converted to the activations' dtype, left to Inductor, with
#              `coordinate_descent_tuning` in the decode step's compile options: only under it does Inductor turn a
#              one-row product into a reduction that converts each weight as it reads it. Eagerly, or at batch > 1,
#              every step first writes a float copy of every weight. Kept for the GPU check to measure.
INT8_CUDA_KERNELS = ("int8pack", "fused")
INT8_CUDA_ENV = "GPT2_CUDA_INT8"  # the GPU acceptance check sets it to measure "fused"

# The aten operators each kernel calls, as torch's native_functions.yaml names them (tests check that this torch
# declares each for the device's dispatch key; `devices.device_rules` that the running build registered it).
INT8_OPS: dict[str, tuple[str, ...]] = {"int8pack": ("_weight_int8pack_mm",), "dequant": (), "fused": ()}
INT4_OPS: dict[str, tuple[str, ...]] = {
    "cpu": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
    "tinygemm": ("_convert_weight_to_int4pack", "_weight_int4pack_mm"),
}
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}


@dataclass(frozen=True)
class DeviceRules:
    """Every choice the code makes by device, for one device type (and CUDA capability)."""

    device_type: str
    capability: Capability | None
    # Precision. `auto_dtype`: what `--dtype auto` computes in; float16 always with loss scaling.
    auto_dtype: Literal["bfloat16", "float16", "float32"]
    float16: bool  # whether float16 computes here at all (the CPU: no)
    tf32: bool  # float32 matmuls as TF32 (`devices.fast_matmul`), measured against the TF32 peak
    # Compiling. `compile_problem`: why Inductor cannot work (an explicit --compile is refused); `compile_caveat`:
    # why auto stays eager although an explicit --compile may try.
    compiler: Literal["cpp", "triton", "metal"] | None
    compile_problem: str | None
    compile_caveat: str | None
    compile_remedy: str
    eager_tflops: float  # auto's guess of the eager training rate, to judge whether compiling repays itself
    compile_s: float  # and of a cold compilation's cost
    # Decoding. A CUDA graph replays one shape: the compiled step then attends to the whole cache, and takes
    # `decode_warmup_calls` calls before timing (CUDA graph trees: warm up, record, replay).
    cuda_graphs: bool
    decode_warmup_calls: int
    streaming_matvec: bool  # one-row products as streaming reductions (`quantize.MatVecLinear`): the CPU's
    coordinate_descent: bool  # Inductor's `coordinate_descent_tuning` in the decode compile options
    # Weight-only quantization. int8: `int8pack` (torch's kernel), `dequant` (a float copy of the weights each
    # step) or `fused` (dequant, fused by the compiled decode step at batch 1). The MPS kernel wants the rows in
    # multiples of 32 and the width too (other widths take `dequant`).
    int8_kernel: Int8Kernel
    int8_row_multiple: int
    int8_width_multiple: int
    int8_problem: str | None  # why int8 decodes slower than float here, eager ("fused"/"dequant": it rebuilds)
    int4_kernel: Int4Kernel | None
    int4_problem: str | None
    # Running and measuring.
    asynchronous: bool  # kernels run after the host queued them: sync before reading a clock; clip on the device
    peak_table: bool  # the GPU datasheet table gives MFU's and bandwidth's peaks
    peak_memory: PeakMemory  # allocator: torch's peak; driver: Metal's pool after the case; process: peak RSS
    own_memory: bool  # memory apart from the host's: bench keeps only the case's model on it
    pin_memory: bool  # batches go through pinned host memory, copied without waiting
    fused_adamw: bool  # torch has a fused AdamW kernel for it
    distributed_backend: Literal["nccl", "gloo"] | None  # torchrun's; None: not supported

    def int8_runs_fast(self, compiled: bool) -> bool:
        """Whether int8 decoding beats the float weights: a kernel that reads int8, or the fused compiled step."""
        return self.int8_problem is None or (self.int8_kernel == "fused" and compiled)

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        """The aten operators the int8 and int4 kernels chosen here call."""
        int4 = INT4_OPS[self.int4_kernel] if self.int4_kernel else ()
        return INT8_OPS[self.int8_kernel] + int4


def _at_least(capability: Capability | None, wanted: Capability) -> bool:
    return capability is None or capability >= wanted  # None: not read (a CPU build asked about CUDA)


def _missing(ops: tuple[str, ...], missing_ops: frozenset[str]) -> str | None:
    return next((op for op in ops if op in missing_ops), None)


def rules_for(
    device_type: str,
    capability: Capability | None = None,
    *,
    cpu_fast_bf16: bool = False,
    int8_cuda: str = "int8pack",
    missing_ops: frozenset[str] = frozenset(),
) -> DeviceRules:
    """The rules of a `device_type` ("cpu", "cuda", "mps"; others get the cautious ones).

    `capability`: CUDA's compute capability (None: not known, taken as a current GPU). `cpu_fast_bf16`: the CPU
    multiplies bf16 natively (AMX, AVX512-BF16). `int8_cuda`: the CUDA int8 candidate (`INT8_CUDA_KERNELS`).
    `missing_ops`: aten operators this torch build has no kernel for on the device (older releases)."""
    if int8_cuda not in INT8_CUDA_KERNELS:
        raise ValueError(f"int8_cuda={int8_cuda!r}: use one of {', '.join(INT8_CUDA_KERNELS)}")
    common = {"device_type": device_type, "capability": capability}
    if device_type == "cpu":
        int4_missing = _missing(INT4_OPS["cpu"], missing_ops)
        return DeviceRules(
            **common,
            auto_dtype="bfloat16" if cpu_fast_bf16 else "float32",
            float16=False,
            tf32=False,
            compiler="cpp",
            compile_problem=None,
            compile_caveat=None,
            compile_remedy="install a C++ compiler (or set CXX)",  # compile.py names the platform's
            # The default run's eager rate (600 steps of 2.0e11 FLOPs in ~4.5 min on 2 cores, bf16); a cold
            # compile of its blocks and loss took ~20 s on an idle 2-core Xeon, 92 s on a busy 2-core EPYC.
            eager_tflops=0.45,
            compile_s=60.0,
            cuda_graphs=False,
            decode_warmup_calls=1,
            streaming_matvec=True,
            coordinate_descent=False,
            int8_kernel="int8pack",
            int8_row_multiple=1,
            int8_width_multiple=1,
            int8_problem=None,
            int4_kernel=None if int4_missing else "cpu",
            int4_problem=f"this torch has no CPU kernel for {int4_missing}" if int4_missing else None,
            asynchronous=False,
            peak_table=False,
            peak_memory="process",
            own_memory=False,
            pin_memory=False,
            fused_adamw=True,
            distributed_backend="gloo",
        )
    if device_type == "cuda":
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        int8pack_missing = _missing(INT8_OPS["int8pack"], missing_ops)
        int8 = "fused" if int8_cuda == "fused" or int8pack_missing else "int8pack"
        why_fused = f"no CUDA kernel for {int8pack_missing} in this torch: " if int8pack_missing else ""
        int4_missing = _missing(INT4_OPS["tinygemm"], missing_ops)
        if not _at_least(capability, TINYGEMM_CAPABILITY):
            int4_problem = f"the GPU (compute capability {shown}) is older than 8.0, which torch's int4 kernel needs"
        else:
            int4_problem = f"this torch has no CUDA kernel for {int4_missing}" if int4_missing else None
        return DeviceRules(
            **common,
            auto_dtype="bfloat16" if _at_least(capability, BF16_CAPABILITY) else "float16",
            float16=True,
            tf32=_at_least(capability, TF32_CAPABILITY),
            compiler="triton",
            compile_problem=None
            if _at_least(capability, TRITON_CAPABILITY)
            else f"Triton needs CUDA compute capability 7.0 or later, this GPU has {shown}",
            compile_caveat=None,
            compile_remedy="install triton",
            eager_tflops=100.0,  # assumptions on the side of compiling less: a fast eager rate, a slow compile
            compile_s=60.0,
            cuda_graphs=True,
            decode_warmup_calls=3,
            streaming_matvec=False,
            coordinate_descent=int8 == "fused",
            int8_kernel=int8,
            int8_row_multiple=1,
            int8_width_multiple=1,
            int8_problem=None
            if int8 == "int8pack"
            else why_fused + "torch.compile fuses the int8 weights into the matmul; without it every step would "
            "rebuild the float weights and run slower than without --quantize",
            int4_kernel=None if int4_problem else "tinygemm",
            int4_problem=int4_problem,
            asynchronous=True,
            peak_table=True,
            peak_memory="allocator",
            own_memory=True,
            pin_memory=True,
            fused_adamw=True,
            distributed_backend="nccl",
        )
    if device_type == "mps":
        int8pack_missing = _missing(INT8_OPS["int8pack"], missing_ops)
        int4_missing = _missing(INT4_OPS["tinygemm"], missing_ops)
        return DeviceRules(
            **common,
            # bf16 needs macOS 14 and nothing was measured on a Mac: float32 unless asked (--dtype bfloat16).
            auto_dtype="float32",
            float16=True,
            tf32=False,
            compiler="metal",
            compile_problem=None,
            compile_caveat="Inductor's mps backend is experimental",
            compile_remedy="pass --compile to try it",
            eager_tflops=EAGER_FALLBACK_TFLOPS,
            compile_s=60.0,
            cuda_graphs=False,
            decode_warmup_calls=1,
            streaming_matvec=False,
            coordinate_descent=False,  # Inductor leaves MPS's one-row products to the matmul anyway
            int8_kernel="dequant" if int8pack_missing else "int8pack",
            int8_row_multiple=32,  # `_weight_int8pack_mm_mps` checks N % 32 == 0 and K % 32 == 0
            int8_width_multiple=32,
            int8_problem=f"this torch has no MPS kernel for {int8pack_missing}, and every step would rebuild the "
            "float weights (slower than without --quantize)"
            if int8pack_missing
            else None,
            int4_kernel=None if int4_missing else "tinygemm",
            int4_problem=f"this torch has no MPS kernel for {int4_missing}" if int4_missing else None,
            asynchronous=True,
            peak_table=False,
            peak_memory="driver",
            own_memory=False,  # unified memory: moving a model to the host frees nothing
            pin_memory=False,
            fused_adamw=True,
            distributed_backend=None,  # gloo reduces host tensors only, NCCL is CUDA's
        )
    return DeviceRules(
        **common,
        auto_dtype="float32",
        float16=True,
        tf32=False,
        compiler=None,
        compile_problem=None,
        compile_caveat=f"Inductor's {device_type} backend is experimental",
        compile_remedy="pass --compile to try it",
        eager_tflops=EAGER_FALLBACK_TFLOPS,
        compile_s=60.0,
        cuda_graphs=False,
        decode_warmup_calls=1,
        streaming_matvec=False,
        coordinate_descent=False,
        int8_kernel="dequant",
        int8_row_multiple=1,
        int8_width_multiple=1,
        int8_problem=None,  # as before the table: allowed, not known to be slow
        int4_kernel=None,
        int4_problem=f"torch has no int4 matmul kernel for {device_type}",
        asynchronous=False,
        peak_table=False,
        peak_memory="process",
        own_memory=False,
        pin_memory=False,
        fused_adamw=False,
        distributed_backend=None,
    )


def int8_cuda_choice(environ: Mapping[str, str]) -> str:
    """The CUDA int8 candidate asked for in `environ` (`GPT2_CUDA_INT8`), else the default; ValueError if unknown."""
    choice = environ.get(INT8_CUDA_ENV) or INT8_CUDA_KERNELS[0]
    if choice not in INT8_CUDA_KERNELS:
        raise ValueError(f"{INT8_CUDA_ENV}={choice}: use one of {', '.join(INT8_CUDA_KERNELS)}")
    return choice


# ---------------------------------------------------------------- the platform


def maxrss_bytes(ru_maxrss: int, platform: str) -> int:
    """`getrusage`'s peak resident memory in bytes: macOS reports it in bytes, Linux (and the BSDs) in KiB."""
    return ru_maxrss if platform == "darwin" else ru_maxrss * 1024
