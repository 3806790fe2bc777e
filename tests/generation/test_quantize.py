"""Weight-only int8 and int4: the kernels against a float reference, whole models against float32, decoding with and
without the KV cache, the int8 fallback (float where int8 would be slow), bad input, and `--quantize` through eval and
bench."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli, shakespeare_text
from gpt2cli import get_tokenizer, load_model
from gpt2cli.errors import UsageError
from gpt2cli.generation.generator import TextGenerator
from gpt2cli.generation.loading import load_generation_model
from gpt2cli.generation.quantize import (
    Int4Linear,
    Int8Linear,
    check_quantize_runs,
    decode_bytes_per_token,
    dequantize,
    group_quantize,
    int4_kernel_missing,
    quantize_model,
)
from gpt2cli.generation.records import SamplingOptions
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.bandwidth import read_bandwidth
from gpt2cli.settings.sections import GenerationWeights


@pytest.fixture(scope="module")
def hf_model(shared_hf_model_factory):  # read only: built once; the real 50,257-row head
    return shared_hf_model_factory(n_layer=2, n_head=4, n_embd=64, n_positions=64)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_group_quantize_rounds_each_weight_to_its_nearest_level(group_size):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    codes, table = group_quantize(weight, group_size)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 15
    assert table.shape == (256 // group_size, 48, 2) and table.dtype == torch.bfloat16
    scales = table[..., 0].t().float().repeat_interleave(group_size, dim=1)  # (N, K)
    error = (dequantize(codes, table, group_size) - weight).abs()
    assert (error <= scales * 0.5 + 1e-6).all()  # round to nearest: at most half a step off


@pytest.mark.parametrize(("rows", "group_size"), [(96, 32), (100, 64), (50257, 32)])
def test_int4_linear_equals_its_dequantized_weight(rows, group_size):
    """The packed kernel computes x · dequant(W)ᵀ + b; rows that are not a multiple of 16 (the head's 50,257) are
    padded for the kernel and cut from the output."""
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(128, rows)
    torch.nn.init.normal_(linear.weight, std=0.02, generator=generator)
    layer = Int4Linear.from_linear(linear, group_size)
    assert layer.weight.size(0) % 16 == 0 and layer.weight.size(0) >= rows
    x = torch.randn(3, 5, 128, generator=generator)
    codes, table = group_quantize(linear.weight.detach(), group_size)
    expected = x.to(torch.bfloat16).float() @ dequantize(codes, table, group_size).t() + linear.bias.detach()
    out = layer(x)
    assert out.shape == (3, 5, rows) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)  # the kernel rounds its sums to bf16


@pytest.mark.parametrize(("mode", "group_size", "min_correlation"), [("int8", 32, 0.999), ("int4", 32, 0.98)])
def test_quantized_logits_stay_close_to_float32(hf_model, mode, group_size, min_correlation):
    _, folder = hf_model
    tokens = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    model = load_model(folder)
    with torch.no_grad():
        exact = model(tokens)[0]
        summary = quantize_model(model, mode, group_size)
        approximate = model(tokens)[0]
    assert approximate.shape == exact.shape
    assert torch.corrcoef(torch.stack([exact.flatten(), approximate.flatten()]))[0, 1] > min_correlation
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert summary.layers == {mode: 9}  # 4 per block and the head; kinds with no layer are left out
    assert summary.describe() == f"{mode}" + (" (group size 32)" if mode == "int4" else "") + f": 9 {mode} layers"
    assert sum(isinstance(module, kind) for module in model.modules()) == 9


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_greedy_decoding_with_and_without_the_cache_agree(hf_model, mode):
    _, folder = hf_model
    model = load_model(folder)
    quantize_model(model, mode, 32)
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode("It was the best of times")
    options = SamplingOptions(max_new_tokens=24, temperature=0.0, ignore_eot=True)
    cached = TextGenerator(model, tokenizer).generate([prompt], options)[0].token_ids
    uncached = TextGenerator(model, tokenizer, use_cache=False).generate([prompt], options)[0].token_ids
    assert cached == uncached and len(cached) == 24


@pytest.mark.parametrize("streams", [True, False])
def test_a_compiled_cpu_step_streams_int8_rows_only_where_inductor_makes_that_fast(monkeypatch, streams):
    """Inside a compiled step (simulated), one int8 row is Inductor's reduction with AVX-512, and
    `_weight_int8pack_mm` where Inductor's int8 loop is slow (AVX2 only)."""
    from gpt2cli.generation import quantize

    monkeypatch.setattr(quantize, "inductor_streams_rows", lambda: streams)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=False))  # decides when it is made
    x = torch.randn(1, 64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if streams:
        expected = (quantize.compiled_matvec(layer.weight, x) * layer.scales_bf16.float()).unsqueeze(0)
    else:
        expected = torch._weight_int8pack_mm(x.to(torch.bfloat16), layer.weight, layer.scales_bf16).float()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize(("mode", "tolerance"), [("none", 1e-4), ("int8", 2e-2), ("int4", 2e-2)])
def test_the_compiled_cpu_decode_step_matches_eager_for_rows_at_different_positions(hf_model, mode, tolerance):
    """The compiled step (one-row products as reductions, one-query attention written out, the cache written in
    place) against eager, for one row and for three rows at different positions in a four-row cache (as `gpt2 serve`
    steps its active rows): logits and the cache itself. int8's
    eager kernel takes bf16 activations, the compiled reduction float32 ones, hence the looser tolerance. The modes
    run one after another in one process: a step compiled for one must not be reused for the next (its guards)."""
    from gpt2cli.generation.generator import compile_decode_step
    from gpt2cli.model.gpt2 import KVCache

    _, folder = hf_model
    model = load_model(folder).eval()
    quantize_model(model, mode, 32)
    compiled, _ = compile_decode_step(model, True)
    for lengths in ([5], [3, 9, 6]):
        rows = len(lengths)
        tokens = torch.randint(0, 50257, (rows, 30), generator=torch.Generator().manual_seed(rows))
        cache_rows = rows if rows == 1 else rows + 1  # a spare row: the step writes a slice of the cache (serve)
        caches = [KVCache(model.config, cache_rows, "cpu", torch.float32) for _ in range(2)]
        with torch.inference_mode():
            for cache in caches:  # prefill: each row's prompt at its own length (eager)
                for row, length in enumerate(lengths):
                    model.next_token_logits(tokens[row : row + 1, :length], cache, 0, first_row=row)
            positions = torch.tensor(lengths)
            for _ in range(6):
                end = int(positions.max()) + 1
                eager = model.next_token_logits(tokens[:, :1], caches[0], positions, caches[0].attend_length(end))
                ours = compiled(tokens[:, :1], caches[1], positions, caches[1].attend_length(end))
                torch.testing.assert_close(ours, eager, rtol=tolerance, atol=tolerance * eager.abs().max().item())
                positions += 1
        for stored, expected in zip(caches[1].keys + caches[1].values, caches[0].keys + caches[0].values, strict=True):
            torch.testing.assert_close(stored, expected, rtol=tolerance, atol=tolerance)


def test_a_width_that_does_not_divide_by_the_group_size_falls_back_to_int8(hf_model_factory):
    _, folder = hf_model_factory(n_layer=1, n_head=2, n_embd=96, n_positions=32)
    model = load_model(folder)
    summary = quantize_model(model, "int4", 64)
    # c_attn, attn.c_proj, c_fc and the head read 96 features; only mlp.c_proj (384) divides by 64.
    assert summary.layers == {"int4": 1, "int8": 4}
    assert sorted(summary.fallback) == [
        "lm_head",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
    ]
    assert "int8 for 4 whose width does not divide by 64" in summary.describe()
    result = run_cli("sample", folder, "--max-new-tokens", "3", "--quantize", "int4", "--group-size", "64")
    assert result.returncode == 0, result.stderr.decode()
    assert b"int8 for 4 whose width does not divide by 64" in result.stderr


def test_the_fallback_keeps_float_weights_where_int8_would_be_slow(shared_hf_model_factory, monkeypatch):
    """Where int8 decodes slower than float (CUDA's `fused` path without --compile, MPS without its kernel),
    `--quantize int8` is refused and int4's fallback layers follow the same rule (here on the CPU, with the device
    check patched to say what it says there)."""
    _, folder = shared_hf_model_factory(n_layer=1, n_head=2, n_embd=96, n_positions=32)
    monkeypatch.setattr("gpt2cli.runtime.devices.int8_runs_fast", lambda device, compiled: False)
    lines: list[str] = []
    weights = GenerationWeights(device="cpu", quantize="int4", group_size=64)
    model = load_generation_model(str(folder), weights, on_summary=lines.append)
    assert not any(isinstance(module, Int8Linear) for module in model.modules())
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert lines == [
        "quantized int4 (group size 64): 1 int4, 4 float layers; float weights kept for 4 whose width "
        "does not divide by 64 (int8 would run slower than float here)"
    ]
    prompt = get_tokenizer().encode("It was")
    options = SamplingOptions(max_new_tokens=3, temperature=0.0, ignore_eot=True)
    assert len(TextGenerator(model, get_tokenizer()).generate([prompt], options)[0].token_ids) == 3
    # `--quantize int8` itself is refused for decoding, not for eval's scoring passes.
    with pytest.raises(UsageError, match="--quantize int8 on cpu: every step would rebuild the float weights"):
        check_quantize_runs("int8", torch.device("cpu"), False, 32, decode=True)
    check_quantize_runs("int8", torch.device("cpu"), False, 32, decode=False)


def test_decode_bytes_count_every_weight_once_and_no_embedding_table():
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=32))
    positions = model.transformer.wpe.weight.numel()
    assert decode_bytes_per_token(model) == (model.num_parameters() - positions) * 4  # the tied head counted once
    quantize_model(model, "int4", 32)
    head = model.lm_head
    assert isinstance(head, Int4Linear)
    head_bytes = head.weight.numel() + head.scales_and_zeros.numel() * 2  # packed nibbles, bf16 scales and zeros
    assert head_bytes == 50304 * 64 // 2 + 50304 * 2 * 2 * 2
    assert decode_bytes_per_token(model) < (model.num_parameters() - positions) * 4 / 5


def test_decode_bytes_count_only_the_int8_scales_this_device_reads():
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=32))
    quantize_model(model, "int8")
    layers = [module for module in model.modules() if isinstance(module, Int8Linear)]
    norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    # On the CPU the kernel reads the int8 rows and the bf16 scales; the float32 scales (CUDA's) are not read.
    expected = sum(layer.weight.numel() + layer.scales_bf16.numel() * 2 for layer in layers)
    expected += sum(layer.bias.numel() * 4 for layer in layers if layer.bias is not None)  # the head has none
    expected += sum(parameter.numel() * 4 for norm in norms for parameter in norm.parameters())
    assert decode_bytes_per_token(model) == expected


def test_read_bandwidth_is_measured():
    assert read_bandwidth("cpu", buffer_bytes=32 * 2**20, passes=2) > 1e8  # any machine reads 100 MB/s


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["sample", "eval", "bench"])
def test_group_size_48_exits_2(tmp_path, command):
    extra = [] if command == "bench" else [str(tmp_path / "any")] + (["x.txt"] if command == "eval" else [])
    result = run_cli(command, *extra, "--quantize", "int4", "--group-size", "48")
    assert_one_line_error(result, 2, "group_size", "must be 32, 64 or 128")


def test_int4_on_a_device_without_a_kernel_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr("gpt2cli.generation.quantize.int4_kernel_missing", lambda device: "no kernel here")
    result = run_cli("sample", tmp_path / "absent.safetensors", "--quantize", "int4", "--device", "cpu")
    assert_one_line_error(result, 2, "--quantize int4 cannot run on cpu: no kernel here")
    # The rules give MPS torch's int4 kernel; this CPU build has no MPS kernels registered.
    assert int4_kernel_missing(torch.device("mps")).startswith("this torch has no MPS kernel for ")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert "compute capability 7.5" in int4_kernel_missing(torch.device("cuda"))


# ---------------------------------------------------------------- through the commands


@pytest.mark.slow
def test_eval_quantize_measures_what_quantization_costs(hf_model, tmp_path):
    _, folder = hf_model
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text()[:3000])
    results = {}
    for mode in ("none", "int8", "int4"):
        result = run_cli("eval", folder, text, "--quantize", mode, "--json")
        assert result.returncode == 0, result.stderr.decode()
        results[mode] = json.loads(result.stdout)
    assert "quantize" not in results["none"]
    assert results["int4"]["quantize"] == {"mode": "int4", "group_size": 32, "layers": {"int4": 9}, "fallback": []}
    for mode in ("int8", "int4"):
        assert results[mode]["tokens"] == results["none"]["tokens"]
        assert results[mode]["perplexity"] != results["none"]["perplexity"]  # the quantized weights were scored
        assert abs(results[mode]["loss"] / results["none"]["loss"] - 1) < 0.01


@pytest.mark.slow
def test_bench_quantize_reports_bandwidth_against_the_measured_read_bandwidth():
    shape = ("--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32")
    result = run_cli(
        "bench",
        *shape,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--tests",
        "tg4,pp8",
        "--batch-size",
        "1",
        "--reps",
        "1",
        "--warmup",
        "1",
        "--quantize",
        "int4",
        "--json",
    )
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    decode, prefill = report["results"]
    assert decode["quantize"] == prefill["quantize"] == "int4" and decode["group_size"] == 32
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=32))
    quantize_model(model, "int4", 32)
    assert decode["weight_bytes_per_token"] == decode_bytes_per_token(model)
    steps_per_s = decode["tokens_per_s"]  # batch 1: one token per step
    assert decode["bandwidth_gbps"] == pytest.approx(decode["weight_bytes_per_token"] * steps_per_s / 1e9)
    assert decode["measured_read_gbps"] > 0 and report["environment"]["measured_read_gbps"] > 0
    assert decode["measured_read_fraction"] == pytest.approx(decode["bandwidth_gbps"] / decode["measured_read_gbps"])
    assert prefill["measured_read_gbps"] is None  # bandwidth is the decode ceiling only
