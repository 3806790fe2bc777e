"""The one inference loader (`generation/loading.py`) that sample, serve, eval and bench share: the checks come before
the checkpoint is read, and the int4 fallback follows the decode rule only where a decode loop runs."""

from __future__ import annotations

import pytest
import torch

from gpt2cli.benchmark import Runner
from gpt2cli.errors import UsageError
from gpt2cli.generation.loading import load_inference_model
from gpt2cli.generation.quantize import Int4Linear, Int8Linear
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.devices import resolve_precision

SHAPE = {"n_layer": 1, "n_head": 2, "n_embd": 96, "n_positions": 32}  # 96 does not divide by 64: int4 falls back


def _has(model: torch.nn.Module, kind: type) -> bool:
    return any(isinstance(module, kind) for module in model.modules())


@pytest.mark.parametrize("decode", [True, False])
def test_the_int4_fallback_keeps_float_only_for_a_slow_decode_loop(shared_hf_model_factory, monkeypatch, decode):
    """Where eager int8 decodes slower than float (CUDA without --compile, patched in here), sample and serve keep
    float weights in the layers int4 cannot take; eval's scoring passes still get int8 there."""
    _, folder = shared_hf_model_factory(**SHAPE)
    monkeypatch.setattr("gpt2cli.runtime.devices.int8_runs_fast", lambda device, compiled: False)
    lines: list[str] = []
    model, summary = load_inference_model(str(folder), "cpu", None, "int4", 64, decode=decode, on_summary=lines.append)
    assert _has(model, Int4Linear) and summary.fallback_kind == ("float" if decode else "int8")
    assert _has(model, Int8Linear) is not decode
    assert lines == [f"quantized {summary.describe()}"]


def test_the_stored_dtype_is_kept_unless_one_is_asked_for(shared_hf_model_factory):
    _, folder = shared_hf_model_factory(**SHAPE)
    stored, summary = load_inference_model(str(folder), torch.device("cpu"), None)
    assert next(stored.parameters()).dtype == torch.float32 and summary.mode == "none"
    cast, _ = load_inference_model(str(folder), "cpu", "bfloat16")
    assert {parameter.dtype for parameter in cast.parameters()} == {torch.bfloat16}


def test_settings_that_cannot_run_are_refused_before_the_checkpoint_is_read(tmp_path):
    absent = str(tmp_path / "absent.safetensors")
    with pytest.raises(UsageError, match="--dtype float16 is not supported on the CPU"):
        load_inference_model(absent, "cpu", "float16")
    with pytest.raises(UsageError, match="group"):
        load_inference_model(absent, "cpu", None, "int4", 48)


def test_the_bench_inference_copy_follows_the_same_fallback_rule(monkeypatch):
    monkeypatch.setattr("gpt2cli.runtime.devices.int8_runs_fast", lambda device, compiled: False)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=96, block_size=32))
    precision = resolve_precision("float32", torch.device("cpu"))
    copy = Runner(model, precision, compile=False, quantize="int4", group_size=64).inference_model()
    assert copy is not model
    assert _has(copy, Int4Linear) and not _has(copy, Int8Linear)
