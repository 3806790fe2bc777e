"""Compiling: whether a training run compiles, where compiled code is kept, the arguments of every torch.compile
call in the project, and which errors mean "could not compile".

Auto compiles where Inductor works here and the run is long enough to repay compiling; otherwise the run stays
eager and says why in one line. An explicit `--compile` where Inductor cannot work is refused before anything runs,
rather than failing inside Inductor with a traceback. Every call site takes its arguments from a `*_arguments`
function here, which tests construct for every device's rules (tests/runtime/test_compile_arguments.py).
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
from gpt2cli.runtime.device_rules import DeviceRules, rules_for
from gpt2cli.runtime.devices import device_rules
from gpt2cli.runtime.files import default_cache_dir

# Auto's estimate of what compiling repays (benchmarks/README.md, "compile = auto"): the run's remaining training
# FLOPs (per process) at the device's eager rate give its eager time; compiling saves SAVED_FRACTION of that, and
# must save more than a cold compilation costs (Inductor's cache makes later ones cheaper, but a first run pays in
# full). The rates and costs are the device's (`DeviceRules.eager_tflops`, `compile_s`).
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
    rules = device_rules(device)
    if setting is True:
        problem = inductor_problem(device) if rules.compile_caveat is None else None  # a caveat: torch's to try
        if problem is not None:
            raise UsageError(f"--compile: {problem}; {_remedy(rules)}, or pass --no-compile")
        return CompileChoice(True)
    short = too_short_to_compile(device, training_flops)  # first: it is free, and short runs never touch Inductor
    if short is not None:
        return CompileChoice(False, short)
    problem = inductor_problem(device)
    if problem is not None:
        return CompileChoice(False, f"{problem}; {_remedy(rules)} or pass --no-compile to silence")
    return CompileChoice(True)


def too_short_to_compile(device: torch.device, training_flops: float) -> str | None:
    """Why compiling would not pay for itself in a run of `training_flops`; None where it would."""
    rules = device_rules(device)
    eager_s = training_flops / (rules.eager_tflops * 1e12)
    if eager_s * SAVED_FRACTION >= rules.compile_s:
        return None
    return (
        f"run too short to repay compiling: ~{eager_s:.0f} s of eager training would save "
        f"~{eager_s * SAVED_FRACTION:.0f} s, compiling costs ~{rules.compile_s:.0f} s"
    )


def inductor_problem(device: torch.device) -> str | None:
    """Why torch.compile's Inductor cannot (or, a caveat, should not by default) build kernels for `device` on this
    machine; None where it can. What this machine lacks comes first, then what the device rules say."""
    rules = device_rules(device)
    if rules.compiler == "cpp" and find_cpp_compiler() is None:
        return "no C++ compiler found for Inductor"
    if rules.compiler == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (Inductor generates Triton kernels on CUDA)"
    return rules.compile_problem or rules.compile_caveat


def _remedy(rules: DeviceRules) -> str:
    """What to do about a compile problem: install this platform's C++ compiler for Inductor's C++ backend
    (`cpp_compiler_remedy`), else what the device rules say."""
    return cpp_compiler_remedy() if rules.compiler == "cpp" else rules.compile_remedy


def find_cpp_compiler() -> str | None:
    """The C++ compiler Inductor would call on the CPU, as a path; None where it is not installed. Inductor's own
    choice (`torch._inductor.cpp_builder.get_cpp_compiler`): $CXX, else MSVC's `cl` on Windows, else
    `config.cpp.cxx`: clang++ on macOS, g++ elsewhere. Found on PATH rather than through Inductor, whose import
    takes seconds."""
    wanted = os.environ.get("CXX")
    default = {"win32": "cl", "darwin": "clang++"}.get(sys.platform, "g++")
    return shutil.which(wanted or default)


def cpp_compiler_remedy() -> str:
    """What to install for Inductor's C++ compiler on this platform (`find_cpp_compiler`)."""
    if sys.platform == "win32":
        # cl is on PATH only in a shell set up by vcvars; Inductor passes MSVC's flags, so clang-cl also works
        return (
            "install Visual Studio's C++ build tools (MSVC) and run gpt2 from a Developer Command Prompt, where cl "
            "is on PATH (or set CXX to cl or clang-cl)"
        )
    if sys.platform == "darwin":
        return "install Xcode's command line tools for clang++ (or set CXX)"
    return "install g++ (or set CXX)"


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels and graphs between runs: $TORCHINDUCTOR_CACHE_DIR where set, else
    gpt2cli's cache folder (torch's own default is under /tmp, which a reboot empties)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir() / "inductor")


def keep_compiled_code() -> None:
    """Point Inductor's on-disk caches (FX graph cache, AOTAutograd cache, Triton's kernels) at a folder that
    survives reboots, so the next run loads what this one compiles. Before the first compilation: Inductor reads
    the variable when it first needs the folder."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


# ---------------------------------------------------------------- the arguments of every compilation
#
# Every torch.compile / Module.compile call in gpt2cli/ and benchmarks/ takes its arguments as `**f(...)` from one
# of the functions below (tests/runtime/test_compile_arguments.py finds the calls with `ast` and fails on any other).
# The tests construct each function's arguments for every device's rules: construction is where torch refuses
# `mode` beside `options`, an unknown Inductor option or one of the wrong type, so a CUDA-only mistake fails on
# the CPU build too. Construction does not capture a graph: only a GPU run proves that.


def block_compile_options() -> dict[str, Any]:
    """Inductor options for the blocks. On the CPU, Inductor then computes GELU's tanh from one exp instead of a
    vectorised tanh: 2.3x faster forward (1.9 → 0.8 ms for 2048 × 1024 values on a 2-core Xeon), 1.3x backward.
    torch leaves it off because the decomposition loses relative precision for tanh near 0, but GELU adds tanh's
    output to 1: against float64, GELU's largest error is 5.2e-7 with it and 4.3e-7 without. GPUs ignore it, and
    torch releases before the option (2.7) would refuse it, so it is only passed where it exists."""
    import torch._inductor.config as inductor_config

    return {"cpp.use_decompose_tanh": True} if hasattr(inductor_config.cpp, "use_decompose_tanh") else {}


def block_compile_arguments(*, fullgraph: bool = False) -> dict[str, Any]:
    """`Module.compile`'s arguments for a transformer block (the same on every device: GPUs ignore the option)."""
    return {"options": block_compile_options(), **({"fullgraph": True} if fullgraph else {})}


def compile_blocks(blocks: nn.ModuleList) -> None:
    """torch.compile every block in place (one compilation serves them all: the code is the same)."""
    for block in blocks:
        block.compile(**block_compile_arguments())


def loss_compile_arguments() -> dict[str, Any]:
    """The fused loss's block kernel: its blocks have one shape (the last is made equal), so no dynamic shapes."""
    return {"dynamic": False}


def default_compile_arguments() -> dict[str, Any]:
    """torch's defaults, named so that the call sites that use them are known: bench's `fwd` and
    benchmarks/compile_ab.py's optimizer step."""
    return {}


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


def decode_compile_arguments(rules: DeviceRules | str) -> dict[str, Any]:
    """torch.compile's arguments for a decode step on the device of `rules` (or of a device type's defaults).

    CUDA: one static shape, recorded as a CUDA graph: `reduce-overhead`'s one option (`triton.cudagraphs`) given in
    `options`, since torch refuses `mode` and `options` together; on the `fused` int8 path also
    `coordinate_descent_tuning`, under which Inductor turns a one-row product into a reduction that converts the
    int8 weights as it reads them. Elsewhere: a dynamic cache length, so the power-of-two buckets the step attends to
    share one compilation."""
    if isinstance(rules, str):
        rules = rules_for(rules)
    options: dict[str, Any] = {"guard_filter_fn": skip_hook_guards}
    if rules.coordinate_descent:
        options["coordinate_descent_tuning"] = True
    if rules.cuda_graphs:
        return {"dynamic": False, "options": {**options, "triton.cudagraphs": True}}
    return {"dynamic": True, "options": options}


# ---------------------------------------------------------------- serving


def serve_compile_arguments(rules: DeviceRules | str) -> dict[str, Any]:
    """torch.compile's arguments for `gpt2 serve`'s decode step on the device of `rules` (or a device type's).

    CUDA: the step runs over a few (rows, attended length) buckets (`serving/engine.py`), each replayed as its own
    CUDA graph. Dynamo's automatic dynamic shapes let the buckets share a few compilations (the first shape static,
    then the length and the rows symbolic once they have changed; a compilation per bucket would take minutes), and
    CUDA graph trees record one graph per distinct size of a symbolic compilation. `reduce-overhead`'s one option is
    given in `options`, since torch refuses `mode` and `options` together. Elsewhere: `gpt2 sample`'s step."""
    if isinstance(rules, str):
        rules = rules_for(rules)
    arguments = decode_compile_arguments(rules)  # the options (CUDA graphs, the fused int8 path's tuning) as sample's
    return {**arguments, "dynamic": None} if rules.cuda_graphs else arguments


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
