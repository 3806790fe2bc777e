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
from typing import Literal

import torch

from gpt2cli.errors import UsageError

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
    from gpt2cli.data.inputs import default_cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir() / "inductor")


def keep_compiled_code() -> None:
    """Point Inductor's on-disk caches (FX graph cache, AOTAutograd cache, Triton's kernels) at a folder that
    survives reboots, so the next run loads what this one compiles. Before the first compilation: Inductor reads
    the variable when it first needs the folder."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
