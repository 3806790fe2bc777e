"""The code that holds a device takes its decisions from the device rules: given CUDA's or MPS's rules on the CPU,
it does what it would do there (warm-up calls, the whole cache, matvec, peaks, refusals)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import assert_one_line_error, cli_env, run_cli
from gpt2cli import get_tokenizer
from gpt2cli.errors import UsageError
from gpt2cli.generation import generator as generator_module
from gpt2cli.generation.generator import TextGenerator, compile_decode_step
from gpt2cli.generation.quantize import MatVecLinear, check_quantize_runs
from gpt2cli.model.gpt2 import GPT2, GPT2Config, KVCache
from gpt2cli.runtime import devices
from gpt2cli.runtime.compile import choose_compile
from gpt2cli.runtime.device_rules import rules_for
from gpt2cli.runtime.distributed import World, start

MPS = torch.device("mps")


def tiny_model() -> GPT2:
    return GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()


@pytest.fixture
def as_an_mps_build(monkeypatch):
    """The kernels an MPS build of torch registers (this CPU build has none for MPS)."""
    monkeypatch.setattr(devices, "missing_ops", lambda device_type: frozenset())


# ---------------------------------------------------------------- decoding


def test_a_cuda_decode_step_attends_to_the_whole_cache_and_keeps_its_linears(monkeypatch):
    monkeypatch.setattr(generator_module, "device_rules", lambda device: rules_for("cuda", (9, 0)))
    model = tiny_model()
    _, whole_cache = compile_decode_step(model, True)  # constructed, not compiled: that happens on the first call
    assert whole_cache is True
    assert not any(isinstance(module, MatVecLinear) for module in model.modules())


@pytest.mark.parametrize("streams", [True, False])
def test_a_cpu_decode_step_attends_to_a_bucket_through_streaming_products_where_they_are_fast(monkeypatch, streams):
    monkeypatch.setattr(generator_module, "inductor_streams_rows", lambda: streams)  # AVX-512 or AVX2 only
    model = tiny_model()
    _, whole_cache = compile_decode_step(model, True)
    assert whole_cache is False and isinstance(model.lm_head, MatVecLinear) is streams


@pytest.mark.parametrize(("rules", "calls"), [(rules_for("cuda", (8, 0)), 3), (rules_for("cpu"), 1)])
def test_the_warm_up_calls_the_step_as_often_as_the_rules_say(monkeypatch, rules, calls):
    monkeypatch.setattr(generator_module, "device_rules", lambda device: rules)
    generator = TextGenerator(tiny_model(), get_tokenizer())
    made = []
    generator.step = lambda tokens, cache, positions, length: made.append(length)
    generator.full_length = rules.cuda_graphs
    generator.compiled = True  # as a compiled generator starts
    cache = KVCache(generator.model.config, 1, "cpu", torch.float32)
    generator._warm_up(torch.zeros(1, 1, dtype=torch.long), cache, torch.zeros(1, dtype=torch.long), 5, 1)
    assert made == [cache.capacity if rules.cuda_graphs else cache.attend_length(5)] * calls


# ---------------------------------------------------------------- MPS


def test_mps_dtype_auto_is_float32_and_float16_is_allowed():
    assert devices.resolve_precision("auto", MPS).dtype is None
    assert devices.resolve_precision("float16", MPS).needs_scaler


def test_mps_quantizes_with_torchs_kernels_where_the_build_has_them(as_an_mps_build):
    check_quantize_runs("int4", MPS, False, 32, decode=True)
    check_quantize_runs("int8", MPS, False, 32, decode=True)


def test_mps_int4_without_its_kernel_is_one_line_exit_2():
    # This CPU build registers no MPS kernels: what an older torch on a Mac would say.
    with pytest.raises(UsageError, match="--quantize int4 cannot run on mps: this torch has no MPS kernel for _"):
        check_quantize_runs("int4", MPS, False, 32, decode=True)


def test_mps_compiles_only_when_asked():
    assert "mps backend is experimental" in (choose_compile("auto", MPS, 1e18).reason or "")
    assert choose_compile(True, MPS, 1.0).enabled


def test_mps_has_no_peaks_and_is_synchronised_before_the_clock(monkeypatch):
    assert devices.peak_tflops(MPS, torch.bfloat16) is None and devices.peak_bandwidth_gbps(MPS) is None
    synced = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: synced.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append("cuda"))
    devices.synchronize(MPS)
    devices.synchronize(torch.device("cpu"))
    assert synced == ["mps"]


def test_mps_peak_memory_is_the_metal_pool(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 123)
    devices.reset_peak_memory(MPS)
    assert devices.peak_memory_bytes(MPS) == 123 and calls == ["empty"]


def test_torchrun_on_mps_is_refused():
    with pytest.raises(UsageError, match="torchrun on mps is not supported"):
        start(World(rank=0, world_size=2), MPS)


# ---------------------------------------------------------------- the platform and the environment


@pytest.mark.parametrize(("platform", "factor"), [("linux", 1024), ("darwin", 1)])
def test_the_cpu_peak_is_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, factor):
    resource = pytest.importorskip("resource")  # POSIX
    monkeypatch.setattr(sys, "platform", platform)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = devices.peak_memory_bytes(torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak is not None and before * factor <= peak <= after * factor


def test_a_bad_cuda_int8_choice_is_one_line_exit_2():
    env = cli_env(GPT2_CUDA_INT8="fast")
    shape = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--tests", "tg2"]
    result = run_cli("bench", *shape, "--device", "cpu", "--reps", "1", "--warmup", "0", env=env)
    assert_one_line_error(result, 2, "GPT2_CUDA_INT8=fast: use one of int8pack, fused")


def test_the_cuda_int8_choice_is_not_taken_for_a_setting():
    env = cli_env(GPT2_CUDA_INT8="fused")  # GPT2_ is the settings' prefix too: it must not be refused as one
    shape = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--tests", "tg2"]
    result = run_cli("bench", *shape, "--device", "cpu", "--reps", "1", "--warmup", "0", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
