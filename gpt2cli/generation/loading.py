"""A model ready for inference: the one sequence `gpt2 sample`, `serve`, `eval` and `bench` share.

Settings that cannot run (or not fast) on the device are refused before any weights are read; the weights are then
loaded on the device, in their dtype, and quantized as `--quantize` says. `bench` builds its model from a preset
rather than a checkpoint, so the check (`prepare_inference`) and the quantization (`quantize_for_inference`) are
also callable on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from gpt2cli.errors import UsageError
from gpt2cli.formats.checkpoint import load_model
from gpt2cli.generation.quantize import QuantizeSummary, check_quantize_runs, quantize_model
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.runtime import devices  # by module: tests patch `devices.resolve_device` and `devices.int8_runs_fast`

if TYPE_CHECKING:
    from gpt2cli.settings.sections import GenerationWeights


def prepare_inference(device: torch.device, quantize: str, group_size: int, *, compile: bool, decode: bool) -> None:
    """Refuse (exit 2) a quantization that cannot run, or not fast, on `device`, and keep freed host memory on the
    CPU (`devices.keep_freed_memory`). Call it before any weights are read.

    `decode`: the weights run a decode loop (sample, serve, bench), where int8 slower than float is refused
    (`devices.int8_runs_fast`); scoring passes (eval) are not bound by that rule (`quantize.check_quantize_runs`)."""
    check_quantize_runs(quantize, device, compile, group_size, decode=decode)
    devices.keep_freed_memory(device)


def quantize_for_inference(
    model: GPT2,
    quantize: str,
    group_size: int,
    *,
    compile: bool,
    decode: bool,
    on_summary: Callable[[str], None] | None = None,
) -> QuantizeSummary:
    """Quantize `model` in place (`none`, `int8`, `int4`); `on_summary` gets a line saying how, unless `none`.

    Under int4 the layers whose width does not divide by the group size become int8, except where a decode loop
    would run int8 slower than float (`devices.int8_runs_fast`): they keep their float weights there."""
    device = next(model.parameters()).device
    int8_fallback = not decode or devices.int8_runs_fast(device, compile)
    summary = quantize_model(model, quantize, group_size, int8_fallback=int8_fallback)
    if on_summary is not None and quantize != "none":
        on_summary(f"quantized {summary.describe()}")
    return summary


def load_inference_model(
    checkpoint: str,
    device: str | torch.device,
    dtype: str | None = None,
    quantize: str = "none",
    group_size: int = 32,
    *,
    compile: bool = False,
    decode: bool = True,
    on_summary: Callable[[str], None] | None = None,
) -> tuple[GPT2, QuantizeSummary]:
    """A checkpoint on its device, in its dtype, quantized, and what the quantization did.

    `device`: a name (`auto`, `cuda:1`) or a device the caller has resolved already. `dtype`: the weights' dtype
    (`float32`, `bfloat16`, `float16`; float16 is refused on the CPU), or None to keep the stored one (eval computes
    under autocast and checks its dtype itself). `compile`: whether the decode step will be compiled (CUDA's
    `fused` int8 needs it); `decode`: see `prepare_inference`. Everything is checked before the checkpoint is read."""
    if isinstance(device, str):
        device = devices.resolve_device(device)
    if dtype == "float16" and not devices.device_rules(device).float16:
        raise UsageError("--dtype float16 is not supported on the CPU; use bfloat16 or float32")
    prepare_inference(device, quantize, group_size, compile=compile, decode=decode)
    model = load_model(checkpoint, device=device, dtype=None if dtype is None else devices.DTYPES[dtype])
    summary = quantize_for_inference(model, quantize, group_size, compile=compile, decode=decode, on_summary=on_summary)
    return model, summary


def load_generation_model(
    checkpoint: str, weights: GenerationWeights, on_summary: Callable[[str], None] | None = None
) -> GPT2:
    """`gpt2 sample` and `gpt2 serve`: a checkpoint as their shared settings section says, ready to decode."""
    model, _ = load_inference_model(
        checkpoint,
        weights.device,
        weights.dtype,
        weights.quantize,
        weights.group_size,
        compile=weights.compile,
        on_summary=on_summary,
    )
    return model
