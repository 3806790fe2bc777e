"""The CUDA paths' logic, checked on the CPU: precision choice by compute capability, the peak table and MFU
arithmetic, the fused loss's fallback (compiler errors only), stopping under torchrun, device binding, int8."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli_env, run_cli, shakespeare_text
from gpt2cli import benchmark, get_tokenizer
from gpt2cli.benchmark import Case, Runner
from gpt2cli.data.inputs import TokenData
from gpt2cli.errors import UsageError
from gpt2cli.model.flops import forward_flops_per_token, mfu, prefill_flops_per_token, training_flops_per_token
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.compile import is_compiler_error
from gpt2cli.runtime.devices import (
    check_int8_runs_fast,
    peak_tflops_for,
    resolve_device,
    resolve_precision,
)
from gpt2cli.runtime.distributed import StopPoll, World, poll_interval, start
from gpt2cli.settings.sections import load_settings
from gpt2cli.training import loss as losses
from gpt2cli.training.optim import clip_gradients, clip_gradients_on_device
from gpt2cli.training.setup import prepare_trainer
from gpt2cli.training.trainer import dropout_seed

# ---------------------------------------------------------------- precision: bf16 only where it is native


@pytest.mark.parametrize(
    ("capability", "dtype", "scaled"),
    [
        ((7, 0), torch.float16, True),
        ((7, 5), torch.float16, True),
        ((8, 0), torch.bfloat16, False),
        ((9, 0), torch.bfloat16, False),
    ],
)
def test_auto_dtype_follows_the_compute_capability_of_the_device_used(monkeypatch, capability, dtype, scaled):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # counts emulation: unused
    precision = resolve_precision("auto", torch.device("cuda", 1))
    assert (precision.dtype, precision.needs_scaler) == (dtype, scaled)
    assert asked == [1]  # the device asked for, not the current one


def test_auto_dtype_on_plain_cuda_asks_the_current_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (7, 0))
    assert resolve_precision("auto", torch.device("cuda")).dtype == torch.float16 and asked == [3]


# ---------------------------------------------------------------- the peak table


H100_SXM, H100_NVL, H200, H200_NVL = "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL"


def test_the_peak_follows_the_compute_dtype():
    assert peak_tflops_for(H100_SXM, torch.bfloat16) == 989.0
    assert peak_tflops_for(H100_SXM, torch.float32) == 494.0  # TF32
    assert peak_tflops_for(H100_SXM, torch.float32, tf32=False) == 67.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0


def test_v100_and_t4_have_no_tf32_and_no_native_bf16():
    assert peak_tflops_for("Tesla V100-SXM2-16GB", torch.float32) == 15.7
    assert peak_tflops_for("Tesla T4", torch.float32) == 8.1
    assert peak_tflops_for("Tesla V100-SXM2-16GB", torch.float16) == 125.0
    assert peak_tflops_for("Tesla T4", torch.float16) == 65.0
    assert peak_tflops_for("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # emulated: no honest peak


def test_nvl_parts_do_not_get_the_sxm_figures():
    assert peak_tflops_for(H100_NVL, torch.bfloat16) == 835.0 != peak_tflops_for(H100_SXM, torch.bfloat16)
    assert peak_tflops_for(H200_NVL, torch.bfloat16) == 835.0 != peak_tflops_for(H200, torch.bfloat16)
    assert peak_tflops_for("NVIDIA H100 PCIe", torch.bfloat16) == 756.0


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
        "NVIDIA GH200 480GB",
        "NVIDIA B200",
        "Some Future GPU",
    ],
)
def test_unknown_and_mig_devices_get_no_peak(name):
    assert all(peak_tflops_for(name, dtype) is None for dtype in (torch.float32, torch.bfloat16, torch.float16))


# ---------------------------------------------------------------- FLOPs and MFU


def test_mfu_divides_by_the_peak_of_every_device():
    flops = training_flops_per_token(1000, 2, 8, 16)
    one = mfu(flops, 1e9, 100.0)
    assert one == pytest.approx(flops * 1e9 / 100e12)
    assert mfu(flops, 1e9, 100.0, world_size=8) == pytest.approx(one / 8)
    assert mfu(flops, 1e9, None) is None


def test_prefill_counts_the_output_head_once_per_prompt():
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset("gpt2"))
    n, head = model.num_parameters(exclude_positions=True), 50257 * 768
    shape = (n, 12, 768)
    assert prefill_flops_per_token(*shape, 50257, 1) == forward_flops_per_token(*shape, 1)  # one token: the same
    saved = forward_flops_per_token(*shape, 512) - prefill_flops_per_token(*shape, 50257, 512)
    assert saved == pytest.approx(2 * head * (1 - 1 / 512))  # 511 of 512 tokens skip the 50,257-way head
    assert prefill_flops_per_token(*shape, 50257, 512) == pytest.approx(
        2 * (n - head) + 4 * 12 * 768 * 512 + 2 * head / 512
    )


def test_bench_prefill_mfu_uses_the_prefill_flops():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    runner = Runner(model, resolve_precision("float32", torch.device("cpu")), compile=False, peak=1.0)
    result = runner.run(Case("pp16", 1, 16), reps=1, warmup=0)
    flops = prefill_flops_per_token(model.num_parameters(exclude_positions=True), 1, 32, 50257, 16)
    assert result.mfu == pytest.approx(flops * result.tokens_per_s / 1e12)


@pytest.fixture(scope="module")
def tokens() -> TokenData:
    ids = np.array(get_tokenizer().encode(shakespeare_text()[:8_000]), dtype=np.uint16)
    return TokenData(train=[ids[:-300]], val=[ids[-300:]], sources=["shakespeare"])


def test_training_mfu_uses_the_run_dtype_and_the_world_size(tmp_path, monkeypatch, tokens):
    asked = []
    monkeypatch.setattr("gpt2cli.training.trainer.peak_tflops", lambda device, dtype: asked.append(dtype) or 100.0)
    model = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
    settings = load_settings(None, {"model": model, "train": {"device": "cpu", "dtype": "float32", "batch_size": 2}})
    trainer = prepare_trainer(settings, tokens, tmp_path / "run", resolve_precision("float32", torch.device("cpu")))
    assert asked == [None]  # float32: the TF32 / float32 peak, not the 16-bit one
    single = trainer._mfu(1e6)
    assert single == pytest.approx(trainer.flops_per_token * 1e6 / 100e12)
    trainer.world = World(rank=0, world_size=4)
    assert trainer._mfu(1e6) == pytest.approx(single / 4)


# ---------------------------------------------------------------- the fused loss falls back on compiler errors only


def _loss_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    return hidden, weight, torch.randint(0, 50, (8,), generator=generator)


def _raising(error: BaseException):
    def kernel(*args):
        raise error

    return kernel


def test_out_of_memory_in_the_compiled_loss_propagates(monkeypatch):
    monkeypatch.setattr(losses, "_compiled_kernel", _raising(torch.OutOfMemoryError("CUDA out of memory.")))
    monkeypatch.setattr(losses, "compiled_kernel_failure", None)
    with pytest.raises(torch.OutOfMemoryError):
        losses.fused_linear_cross_entropy(*_loss_inputs(), compiled=True)
    assert losses.compiled_kernel_failure is None and losses._compiled_kernel is not losses.cross_entropy_block


def test_out_of_memory_while_compiling_is_not_a_compiler_error():
    from torch._dynamo.exc import BackendCompilerFailed

    wrapped = BackendCompilerFailed(lambda: None, torch.OutOfMemoryError("CUDA out of memory."), None)
    assert not is_compiler_error(wrapped)
    assert not is_compiler_error(RuntimeError("some bug"))
    assert is_compiler_error(BackendCompilerFailed(lambda: None, RuntimeError("no triton"), None))


def test_a_compiler_error_falls_back_to_the_eager_kernel_and_says_so(monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    monkeypatch.setattr(losses, "_compiled_kernel", _raising(InvalidCxxCompiler()))
    monkeypatch.setattr(losses, "compiled_kernel_failure", None)
    with pytest.warns(UserWarning, match="compiled loss kernel unavailable"):
        loss = losses.fused_linear_cross_entropy(*_loss_inputs(), compiled=True)
    assert loss.item() == pytest.approx(losses.fused_linear_cross_entropy(*_loss_inputs()).item())
    assert losses.compiled_kernel_failure == "InvalidCxxCompiler"


def _train_runner(monkeypatch) -> Runner:
    monkeypatch.setattr(benchmark, "compile_blocks", lambda blocks: None)  # only the (patched) loss is "compiled"
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    return Runner(model, resolve_precision("float32", torch.device("cpu")), compile=True)


def test_bench_reports_out_of_memory_of_the_compiled_loss(monkeypatch):
    monkeypatch.setattr(losses, "_compiled_kernel", _raising(torch.OutOfMemoryError("CUDA out of memory.")))
    result = _train_runner(monkeypatch).run(Case("train", 2, 16), reps=1, warmup=1)
    assert result.error == "OOM" and result.tokens_per_s is None


def test_bench_does_not_call_an_eager_loss_compiled(monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    monkeypatch.setattr(losses, "_compiled_kernel", _raising(InvalidCxxCompiler()))
    monkeypatch.setattr(losses, "compiled_kernel_failure", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _train_runner(monkeypatch).run(Case("train", 2, 16), reps=1, warmup=1)
    assert result.error is None and result.compile is False


# ---------------------------------------------------------------- the training step and stopping


def test_clipping_on_the_device_matches_the_host_path():
    def gradients():
        generator = torch.Generator().manual_seed(1)
        parameters = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(4))]
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 3
        return parameters

    for max_norm in (1.0, 100.0, math.inf):
        host, device = gradients(), gradients()
        norm = clip_gradients(host, max_norm)
        assert clip_gradients_on_device(device, max_norm).item() == pytest.approx(norm)
        for a, b in zip(host, device, strict=True):
            torch.testing.assert_close(a.grad, b.grad)


def test_stop_agreement_is_bounded_in_seconds():
    assert poll_interval(0.01) == 500  # 5 s of 10 ms steps
    assert poll_interval(0.0001) == 1000  # at most every 1000 steps
    assert poll_interval(2.0) == 2 and poll_interval(7.0) == 1 and poll_interval(0.0) == 1
    assert poll_interval(0.5, budget_s=10.0) * 0.5 <= 10.0
    poll = StopPoll(World(), torch.device("cpu"))
    assert [poll.agreed_stop(step, requested) for step, requested in [(1, False), (2, True)]] == [False, True]


def test_dropout_seeds_differ_per_rank_and_step():
    seeds = {dropout_seed(1337, step, rank) for step in range(100) for rank in range(8)}
    assert len(seeds) == 800


# ---------------------------------------------------------------- device binding, int8


def test_cuda_n_becomes_the_current_device(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]


def test_torchrun_binds_each_rank_to_its_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)  # a CUDA build (gloo without: Windows)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    device = start(World(rank=3, world_size=4, local_rank=1), torch.device("cuda"))
    assert device == torch.device("cuda", 1)
    assert calls == [("set_device", device), ("init", {"backend": "nccl", "device_id": device})]


def test_int8_on_cuda_needs_compile_on_the_fused_path_only(monkeypatch):
    monkeypatch.setattr("gpt2cli.runtime.devices.missing_ops", lambda device_type: frozenset())  # as a CUDA build
    check_int8_runs_fast(torch.device("cuda"), compiled=False)  # int8pack: CUDA's _weight_int8pack_mm, eager too
    monkeypatch.setenv("GPT2_CUDA_INT8", "fused")
    with pytest.raises(UsageError, match="--quantize int8 on CUDA needs --compile"):
        check_int8_runs_fast(torch.device("cuda"), compiled=False)
    check_int8_runs_fast(torch.device("cuda"), compiled=True)
    check_int8_runs_fast(torch.device("cpu"), compiled=False)


def test_a_torch_without_the_cuda_int8_kernel_needs_compile(monkeypatch):
    monkeypatch.setattr("gpt2cli.runtime.devices.missing_ops", lambda device_type: frozenset({"_weight_int8pack_mm"}))
    with pytest.raises(UsageError, match=r"needs --compile \(no CUDA kernel for _weight_int8pack_mm in this torch"):
        check_int8_runs_fast(torch.device("cuda"), compiled=False)


def test_the_bench_inference_copy_is_cast_tensor_by_tensor():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    copy = Runner(model, resolve_precision("bfloat16", torch.device("cpu")), compile=False).inference_model()
    assert copy is not model and copy.lm_head.weight is copy.transformer.wte.weight
    assert {parameter.dtype for parameter in copy.parameters()} == {torch.bfloat16}
    for (name, cast), (_, original) in zip(copy.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(cast, original.to(torch.bfloat16)), name


def test_ranks_exchange_the_stop_flag_only_every_k_steps(monkeypatch):
    exchanged = []

    def all_reduce(value, op):  # as if the other rank sent the same values
        exchanged.append(value.tolist())

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    now = [0.0]
    poll = StopPoll(World(rank=1, world_size=2), torch.device("cpu"), budget_s=5.0, clock=lambda: now[0])
    stops = []
    for step in range(1, 13):
        now[0] += 1.0  # every step takes 1 s
        stops.append(poll.agreed_stop(step, requested=step >= 3))
    assert len(exchanged) == 3  # steps 1, 6 and 11: five 1-second steps apart
    assert stops == [False] * 5 + [True] + [False] * 4 + [True, False]


def test_a_compiled_bench_does_not_call_its_eager_prefill_compiled():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32))
    runner = Runner(model, resolve_precision("float32", torch.device("cpu")), compile=True)
    assert runner.run(Case("pp16", 1, 16), reps=1, warmup=0).compile is False


def test_gpt2_sample_refuses_eager_int8_on_cuda_before_loading_anything(monkeypatch, tmp_path):
    monkeypatch.setattr("gpt2cli.runtime.devices.resolve_device", lambda name: torch.device("cuda"))
    env = cli_env(GPT2_CUDA_INT8="fused")  # the GPU check's candidate; the default reads int8 eagerly too
    result = run_cli("sample", tmp_path / "absent.safetensors", "--quantize", "int8", "--device", "cuda", env=env)
    assert_one_line_error(result, 2, "--quantize int8 on CUDA needs --compile")
