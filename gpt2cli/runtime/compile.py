"""Whether a training run compiles (`--compile`, `--no-compile`, or auto: neither) and where compiled code is kept.

Auto compiles where Inductor works here and the run is long enough to repay compiling; otherwise the run stays
eager and says why in one line. An explicit `--compile` where Inductor cannot work is refused before anything runs,
rather than failing inside Inductor with a traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gpt2cli.errors import UsageError
from gpt2cli.runtime.files import default_cache_dir

# Auto's estimate of what compiling repays (benchmarks/README.md, "compile = auto"): the run's remaining training
# FLOPs (per process) at the eager rate give its eager time; compiling saves SAVED_FRACTION of that, and must save
# more than a cold compilation costs (Inductor's cache makes later ones cheaper, but a first run pays in full).
# CPU: the default run's eager rate (600 steps of 2.0e11 FLOPs in ~4.5 min on 2 cores, bf16); a cold compile of
# its blocks and loss took ~20 s on an idle 2-core Xeon and 92 s on a 2-core EPYC shared with 13 other processes.
# CUDA: assumptions on the side of compiling less (a fast eager rate, a slow compile).
EAGER_TFLOPS = {"cpu": 0.45, "cuda": 100.0}
COMPILE_S = {"cpu": 60.0, "cuda": 60.0}
SAVED_FRACTION = 1 / 3  # compiled steps take 2/3 of the eager time (1.5x faster)


@dataclass(frozen=True)
class CompileChoice:
    enabled: bool
    reason: str | None = None  # why auto stayed eager; None when it compiles or was told what to do


def choose_compile(setting: bool | Literal["auto"], device: torch.device, training_flops: float) -> CompileChoice:
    """Compile or not, for a run of `training_flops` (what is left of it, per process) on `device`. Raises
    UsageError for an explicit `--compile` that Inductor cannot honour here."""
    if setting is False:
        return CompileChoice(False)
    if setting is True:
        problem = inductor_problem(device) if device.type in ("cpu", "cuda") else None  # others: torch's to try
        if problem is not None:
            raise UsageError(f"--compile: {problem}; {_remedy(device)}, or pass --no-compile")
        return CompileChoice(True)
    short = too_short_to_compile(device, training_flops)  # first: it is free, and short runs never touch Inductor
    if short is not None:
        return CompileChoice(False, short)
    problem = inductor_problem(device)
    if problem is not None:
        return CompileChoice(False, f"{problem}; {_remedy(device)} or pass --no-compile to silence")
    return CompileChoice(True)


def too_short_to_compile(device: torch.device, training_flops: float) -> str | None:
    """Why compiling would not pay for itself in a run of `training_flops`; None where it would."""
    eager_s = training_flops / (EAGER_TFLOPS.get(device.type, EAGER_TFLOPS["cpu"]) * 1e12)
    compile_s = COMPILE_S.get(device.type, COMPILE_S["cpu"])
    if eager_s * SAVED_FRACTION >= compile_s:
        return None
    return (
        f"run too short to repay compiling: ~{eager_s:.0f} s of eager training would save "
        f"~{eager_s * SAVED_FRACTION:.0f} s, compiling costs ~{compile_s:.0f} s"
    )


def inductor_problem(device: torch.device) -> str | None:
    """Why torch.compile's Inductor cannot build kernels for `device` on this machine; None where it can."""
    if device.type == "cpu":
        if find_cpp_compiler() is None:
            return "no C++ compiler found for Inductor"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (Inductor generates Triton kernels on CUDA)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major < 7:  # Triton's oldest target is Volta (7.0)
            return f"Triton needs CUDA compute capability 7.0 or later, this GPU has {major}.{minor}"
        return None
    return f"Inductor's {device.type} backend is experimental"


def _remedy(device: torch.device) -> str:
    if device.type == "cpu":
        return "install g++ (or set CXX)"
    if device.type == "cuda":
        return "install triton"
    return "pass --compile to try it"


def find_cpp_compiler() -> str | None:
    """The C++ compiler Inductor would call on the CPU (`torch._inductor.config.cpp.cxx`: $CXX, else g++, or
    clang++ on macOS), as a path; None where it is not installed. Found on PATH rather than through Inductor,
    whose import takes seconds."""
    wanted = os.environ.get("CXX")
    return shutil.which(wanted or ("clang++" if sys.platform == "darwin" else "g++"))


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels and graphs between runs: $TORCHINDUCTOR_CACHE_DIR where set, else
    gpt2cli's cache folder (torch's own default is under /tmp, which a reboot empties)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir() / "inductor")


def keep_compiled_code() -> None:
    """Point Inductor's on-disk caches (FX graph cache, AOTAutograd cache, Triton's kernels) at a folder that
    survives reboots, so the next run loads what this one compiles. Before the first compilation: Inductor reads
    the variable when it first needs the folder."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


# ---------------------------------------------------------------- training


def block_compile_options() -> dict[str, Any]:
    """torch.compile options for the blocks. On the CPU, Inductor then computes GELU's tanh from one exp instead of
    a vectorised tanh: 2.3x faster forward (1.9 → 0.8 ms for 2048 × 1024 values on a 2-core Xeon), 1.3x backward.
    torch leaves it off because the decomposition loses relative precision for tanh near 0, but GELU adds tanh's
    output to 1: against float64, GELU's largest error is 5.2e-7 with it and 4.3e-7 without. GPUs ignore it, and
    torch releases before the option (2.7) would refuse it, so it is only passed where it exists."""
    import torch._inductor.config as inductor_config

    return {"cpp.use_decompose_tanh": True} if hasattr(inductor_config.cpp, "use_decompose_tanh") else {}


def compile_blocks(blocks: nn.ModuleList) -> None:
    """torch.compile every block in place (one compilation serves them all: the code is the same)."""
    options = block_compile_options()
    for block in blocks:
        block.compile(options=options)


def _compiler_error_types() -> tuple[type[BaseException], ...]:
    """torch.compile's "could not compile" errors, as far as this torch release defines them."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = [
        (dynamo_exc, "BackendCompilerFailed"),
        (inductor_exc, "InvalidCxxCompiler"),
        (inductor_exc, "CppCompileError"),
        (inductor_exc, "TritonMissing"),
        (inductor_exc, "GPUTooOldForTriton"),
    ]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def is_compiler_error(error: BaseException) -> bool:
    """True for a failure to compile (not one that happened while compiling for another reason, such as memory)."""
    if not isinstance(error, _compiler_error_types()):
        return False
    inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed wraps what the backend raised
    return not _is_out_of_memory(error) and not (inner is not None and _is_out_of_memory(inner))


def compiler_failure(error: BaseException) -> str:
    """The name of what failed to compile, for a one-line report."""
    inner = getattr(error, "inner_exception", None)
    return type(inner if inner is not None else error).__name__


# ---------------------------------------------------------------- decoding


# Guards a compiled decode step may skip: that no module has gained hooks or new attributes since it was compiled.
# Generation adds neither; checking the 124M model's ~220 of them cost ~0.1 ms per token (of ~0.6). The guards
# on module types, tensors and constants stay, so a step is never reused for another model or quantization.
_SKIPPED_GUARDS = {"EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT"}


def skip_hook_guards(entries: list[Any]) -> list[bool]:
    return [entry.guard_type not in _SKIPPED_GUARDS for entry in entries]


def decode_compile_arguments(device_type: str) -> dict[str, Any]:
    """torch.compile's arguments for a decode step on `device_type`.

    CUDA: one static shape, recorded as a CUDA graph: `reduce-overhead`'s one option (`triton.cudagraphs`) given in
    `options`, since torch refuses `mode` and `options` together. Elsewhere: a dynamic cache length, so the
    power-of-two buckets the step attends to share one compilation."""
    options: dict[str, Any] = {"guard_filter_fn": skip_hook_guards}
    if device_type == "cuda":
        return {"dynamic": False, "options": {**options, "triton.cudagraphs": True}}
    return {"dynamic": True, "options": options}


# ---------------------------------------------------------------- serving


def serve_compile_arguments(device_type: str) -> dict[str, Any]:
    """torch.compile's arguments for `gpt2 serve`'s decode step on `device_type`.

    CUDA: the step runs over a few (rows, attended length) buckets (`serving/engine.py`), each replayed as its own
    CUDA graph. Dynamo's automatic dynamic shapes let the buckets share a few compilations (the first shape static,
    then the length and the rows symbolic once they have changed; a compilation per bucket would take minutes), and
    CUDA graph trees record one graph per distinct size of a symbolic compilation. `reduce-overhead`'s one option is
    given in `options`, since torch refuses `mode` and `options` together. Elsewhere: `gpt2 sample`'s step."""
    if device_type != "cuda":
        return decode_compile_arguments(device_type)
    return {"dynamic": None, "options": {"guard_filter_fn": skip_hook_guards, "triton.cudagraphs": True}}


def allow_step_shapes(shapes: int) -> None:
    """Let one compiled step take `shapes` shapes without falling back to eager or warning: Dynamo's recompile
    limits (per code object, and in all; whatever it ends up specialising, every bucket stays compiled) and Inductor's
    warning past a number of CUDA graphs recorded for one compilation. Limits only ever rise. The names differ across
    the torch releases the project allows: `recompile_limit` (2.7 and later) was `cache_size_limit`."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for names in (
        ("recompile_limit", "cache_size_limit"),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
    ):
        name = next((name for name in names if hasattr(dynamo_config, name)), None)
        if name is not None:
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), shapes))
    warn_limit = getattr(inductor_config.triton, "cudagraph_dynamic_shape_warn_limit", None)
    if warn_limit is not None:  # None: the warning is off already
        inductor_config.triton.cudagraph_dynamic_shape_warn_limit = max(warn_limit, shapes)
