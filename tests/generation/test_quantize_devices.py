"""The int8 and int4 kernel calls of the CUDA and MPS branches, run on the CPU build with fake tensors.

Under `FakeTensorMode`, `torch.empty(..., device="cuda")` gives a tensor that only claims to be on `cuda:0`: every
operator runs its meta kernel (shapes, dtypes, strides; torch's own checks of them), none touches a GPU. So
`Int4Linear.from_linear` and `Int8Linear` run their CUDA and MPS code paths here, calling
`_convert_weight_to_int4pack`, `_weight_int4pack_mm` and `_weight_int8pack_mm` as a GPU run would. A dispatch mode
records those calls, and each is checked against the C++ checks of the kernel it would reach (the meta kernels check
less: CUDA's bf16-only activations, contiguity, group sizes, the table's shape), as torch 2.13 writes them in
aten/src/ATen/native/cuda/int4mm.cu, cuda/int8mm.cu and mps/operations/Quantized.mm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2cli.generation.quantize import Int4Linear, Int8Linear, decode_bytes_per_token, quantize_model
from gpt2cli.runtime import devices
from gpt2cli.runtime.device_rules import rules_for

KERNELS = {"_convert_weight_to_int4pack", "_weight_int4pack_mm", "_weight_int8pack_mm"}
TINYGEMM_GROUPS = (32, 64, 128, 256)


class KernelCalls(TorchDispatchMode):
    """The quantization kernels' calls that pass through, with their (fake) arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.split("::")[-1]
        if name in KERNELS:
            self.calls.append((name, args))
        return func(*args, **(kwargs or {}))


@contextmanager
def fake_device() -> Iterator[KernelCalls]:
    with FakeTensorMode(), KernelCalls() as calls:
        yield calls


def fake_linear(
    rows: int, width: int, device: str, bias: bool = True, dtype: torch.dtype = torch.float32
) -> torch.nn.Linear:
    """A Linear whose parameters are fake tensors on `device` (inside `fake_device()`): its initialisation would
    draw random numbers on the device, and `.to()` would swap tensors, which a CPU build cannot do for a fake device,
    so they are assigned."""
    linear = torch.nn.Linear(width, rows, bias=bias, device="meta")
    linear.weight = torch.nn.Parameter(torch.randn(rows, width, device=device, dtype=dtype) * 0.02)
    linear.bias = torch.nn.Parameter(torch.zeros(rows, device=device, dtype=dtype)) if bias else None
    return linear


# ---------------------------------------------------------------- the kernels' C++ checks


def check_int4_pack(device_type: str, weight: torch.Tensor, inner_tiles: int) -> None:
    """`_convert_weight_to_int4pack_{cuda,mps}`: uint8 `[n][k / 2]` (two codes a byte), row-major; 2, 4 or 8 inner
    K tiles of 16 that divide K."""
    assert weight.device.type == device_type
    assert weight.dim() == 2 and weight.dtype == torch.uint8 and weight.is_contiguous()
    assert inner_tiles in (2, 4, 8)
    assert (weight.size(1) * 2) % (inner_tiles * 16) == 0


def check_int4_matmul(device_type: str, x: torch.Tensor, packed: torch.Tensor, group: int, table: torch.Tensor) -> None:
    """`_weight_int4pack_mm_{cuda,mps}`: activations `(M, K)` row-major (CUDA: bf16 only; MPS: the table in their
    dtype), the packed weight `[n / 8][k / (tiles * 16)][32][tiles / 2]` int32, a supported group size, and the
    `(K / group, N, 2)` table of scales and zeros."""
    assert x.device == packed.device == table.device and x.device.type == device_type
    assert x.dim() == 2 and x.is_contiguous()
    assert (
        x.dtype == torch.bfloat16
        if device_type == "cuda"
        else x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )
    assert packed.dtype == torch.int32 and packed.is_contiguous() and packed.dim() == 4 and packed.size(2) == 32
    tiles = packed.size(3) * 2
    assert tiles in (2, 4, 8) and packed.size(1) == x.size(1) // (tiles * 16)
    assert group in TINYGEMM_GROUPS and x.size(1) % group == 0
    assert table.dim() == 3 and table.shape == (x.size(1) // group, packed.size(0) * 8, 2)
    assert table.dtype == x.dtype  # CUDA reads bf16; MPS's shader reads the table as the activations' type


def check_int8_matmul(device_type: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> None:
    """`_weight_int8pack_mm_cuda` (which casts activations and scales to float32 itself) and `_mps` (float
    activations and scales of one dtype, row-major, N and K multiples of 32)."""
    assert x.device == weight.device == scales.device and x.device.type == device_type
    assert x.dim() == 2 and weight.dim() == 2 and scales.dim() == 1 and weight.dtype == torch.int8
    assert x.size(1) == weight.size(1) and weight.size(0) == scales.size(0)
    if device_type == "mps":
        assert x.dtype in (torch.bfloat16, torch.float16, torch.float32) and scales.dtype == x.dtype
        assert x.is_contiguous() and weight.is_contiguous()
        assert weight.size(0) % 32 == 0 and weight.size(1) % 32 == 0


def check_calls(device_type: str, calls: list[tuple[str, tuple[Any, ...]]]) -> None:
    for name, args in calls:
        if name == "_convert_weight_to_int4pack":
            check_int4_pack(device_type, *args)
        elif name == "_weight_int4pack_mm":
            check_int4_matmul(device_type, *args)
        else:
            check_int8_matmul(device_type, *args)


# ---------------------------------------------------------------- int4 (tinygemm)

# GPT-2's projections (768 -> 2304, 3072 -> 768), its 50,257-row head, and gpt2-xl's 1,600-wide input (4 tiles).
SHAPES = [(2304, 768), (768, 3072), (50257, 768), (6400, 1600)]


@pytest.mark.parametrize("device_type", ["cuda", "mps"])
@pytest.mark.parametrize(("rows", "width"), SHAPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_packs_and_multiplies_as_the_gpu_kernels_check(device_type, rows, width, group_size):
    if width % group_size:
        pytest.skip("falls back to int8")
    with fake_device() as calls:
        layer = Int4Linear.from_linear(fake_linear(rows, width, device_type), group_size)
        outputs = [
            layer(torch.randn(batch, 1, width, device=device_type, dtype=dtype))
            for batch, dtype in [(1, torch.float32), (8, torch.bfloat16)]
        ]
    assert [name for name, _ in calls.calls] == ["_convert_weight_to_int4pack"] + ["_weight_int4pack_mm"] * 2
    check_calls(device_type, calls.calls)
    assert layer.weight.size(0) * 8 >= rows and layer.weight.device.type == device_type
    assert [(out.shape, out.dtype) for out in outputs] == [
        ((1, 1, rows), torch.float32),
        ((8, 1, rows), torch.bfloat16),
    ]


# ---------------------------------------------------------------- int8


@pytest.mark.parametrize("device_type", ["cuda", "mps"])
@pytest.mark.parametrize(("rows", "width"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_multiplies_as_the_gpu_kernels_check(device_type, rows, width, dtype):
    rules = rules_for(device_type, (9, 0) if device_type == "cuda" else None)
    with fake_device() as calls:
        layer = Int8Linear.from_linear(fake_linear(rows, width, device_type, dtype=dtype), rules)
        out = layer(torch.randn(1, 1, width, device=device_type, dtype=dtype))
        batched = layer(torch.randn(8, 1, width, device=device_type, dtype=dtype))
    assert layer.kernel == "int8pack"
    assert [name for name, _ in calls.calls] == ["_weight_int8pack_mm"] * 2
    check_calls(device_type, calls.calls)
    assert (out.shape, batched.shape, out.dtype) == ((1, 1, rows), (8, 1, rows), dtype)
    padded = -(-rows // 32) * 32 if device_type == "mps" else rows  # MPS's kernel wants rows in 32s: cut off after
    assert layer.weight.shape == (padded, width)


def test_mps_int8_of_a_width_its_kernel_refuses_dequantizes():
    with fake_device() as calls:
        layer = Int8Linear.from_linear(fake_linear(64, 48, "mps"), rules_for("mps"))
        out = layer(torch.randn(1, 48, device="mps"))
    assert layer.kernel == "dequant" and calls.calls == [] and out.shape == (1, 64)


def test_the_fused_cuda_candidate_leaves_the_product_to_inductor():
    with fake_device() as calls:
        layer = Int8Linear.from_linear(fake_linear(2304, 768, "cuda"), rules_for("cuda", (9, 0), int8_cuda="fused"))
        out = layer(torch.randn(1, 1, 768, device="cuda", dtype=torch.float32))
    assert layer.kernel == "fused" and calls.calls == [] and out.shape == (1, 1, 2304)


def test_quantize_model_on_a_cuda_device_takes_the_rules_kernels(monkeypatch):
    """The whole path as `gpt2 sample --quantize` runs it on a CUDA build: the rules from the device, the layers
    swapped, their calls."""
    monkeypatch.setattr(devices, "missing_ops", lambda device_type: frozenset())  # a CUDA build registers them
    for mode, kernels in [("int8", {"_weight_int8pack_mm"}), ("int4", {"_weight_int4pack_mm"})]:
        with fake_device() as calls:
            model = torch.nn.Sequential(fake_linear(2304, 768, "cuda"), fake_linear(768, 2304, "cuda"))
            summary = quantize_model(model, mode, 32)  # type: ignore[arg-type]
            model(torch.randn(1, 768, device="cuda"))
        assert summary.layers == {mode: 2}
        assert {name for name, _ in calls.calls} - {"_convert_weight_to_int4pack"} == kernels
        check_calls("cuda", calls.calls)


# ---------------------------------------------------------------- what a decode step reads


def test_bytes_per_token_count_the_float_copy_where_the_kernel_writes_one():
    """int8pack reads the int8 weights; `fused` compiled at one row too; otherwise a float copy of the weights is
    written, and the matmul reads it."""
    with fake_device():
        linear = fake_linear(128, 64, "cuda", bias=False, dtype=torch.bfloat16)
        fused = Int8Linear.from_linear(linear, rules_for("cuda", (9, 0), int8_cuda="fused"))
        int8pack = Int8Linear.from_linear(linear, rules_for("cuda", (9, 0)))
    copy = 128 * 64 * 2  # bf16
    assert fused.dequantized_bytes(rows=1, compiled=True) == 0
    assert fused.dequantized_bytes(rows=8, compiled=True) == copy
    assert fused.dequantized_bytes(rows=1, compiled=False) == copy
    assert int8pack.dequantized_bytes(rows=8, compiled=False) == 0


def test_decode_bytes_per_token_adds_the_copies(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 64, bias=False))
    quantize_model(model, "int8")  # type: ignore[arg-type]
    stored = decode_bytes_per_token(model)  # type: ignore[arg-type]
    assert stored == 2 * (128 * 64 + 128 * 2 + 0) - 128 * 2 + 64 * 2  # int8 rows and bf16 scales of each layer
    monkeypatch.setattr(Int8Linear, "dequantized_bytes", lambda self, rows, compiled: rows * 1000)
    assert decode_bytes_per_token(model, rows=8, compiled=True) == stored + 2 * 8000  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("candidate", ["int8pack", "fused"])
def test_inductor_fuses_the_fused_candidate_only_at_one_row_with_its_options(candidate, rows):
    """What Inductor makes of an int8 layer's call on CUDA, decomposed as it decomposes it under the decode step's
    compile options (Inductor's own decomposition table, traced on fake CUDA tensors): `fused` becomes a reduction
    over the converted weights only at one row with `coordinate_descent_tuning`; otherwise a matmul of a converted
    (float) copy, which `Int8Linear.dequantized_bytes` counts. int8pack stays torch's kernel either way."""
    from torch._inductor import config
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from gpt2cli.generation.quantize import int8_matmul
    from gpt2cli.runtime.compile import decode_compile_arguments

    rules = rules_for("cuda", (9, 0), int8_cuda=candidate)
    options = decode_compile_arguments(rules)["options"]
    with FakeTensorMode():
        x = torch.empty(rows, 768, dtype=torch.bfloat16, device="cuda")
        weight = torch.empty(2304, 768, dtype=torch.int8, device="cuda")
        scales = torch.empty(2304, dtype=torch.bfloat16, device="cuda")

    def layer(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, weight, scales, scales, rules.int8_kernel, "cuda")

    with config.patch(coordinate_descent_tuning=options.get("coordinate_descent_tuning", False)):
        graph = make_fx(layer, decomposition_table=select_decomp_table())(x, weight, scales).graph
    ops = {str(node.target).split(".")[1] for node in graph.nodes if node.op == "call_function"}
    if candidate == "int8pack":
        assert "_weight_int8pack_mm" in ops and "mm" not in ops
    elif rows == 1:
        assert "sum" in ops and "mm" not in ops  # one pass: each int8 weight converted as it is read
    else:
        assert "mm" in ops  # cuBLAS on a converted copy of the weights
