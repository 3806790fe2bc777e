"""The device rules (`runtime/device_rules.py`): one table of every choice made by device, asked for devices this
machine does not have (CUDA 7.0, 8.0, 9.0, MPS) as well as the CPU; and checked against what torch declares."""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import pytest
import yaml

from gpt2cli.runtime import device_rules as rules_module
from gpt2cli.runtime.device_rules import (
    DISPATCH_KEYS,
    INT4_OPS,
    INT8_CUDA_ENV,
    INT8_OPS,
    int8_cuda_choice,
    maxrss_bytes,
    rules_for,
)

V100, A100, H100 = (7, 0), (8, 0), (9, 0)


@pytest.mark.parametrize(
    ("device_type", "capability", "fast_bf16", "dtype"),
    [
        ("cuda", V100, False, "float16"),  # fp16 tensor cores, bf16 emulated: fp16 with loss scaling
        ("cuda", (7, 5), False, "float16"),
        ("cuda", A100, False, "bfloat16"),
        ("cuda", H100, False, "bfloat16"),
        ("cpu", None, False, "float32"),
        ("cpu", None, True, "bfloat16"),  # AMX or AVX512-BF16
        ("mps", None, False, "float32"),
    ],
)
def test_auto_dtype(device_type, capability, fast_bf16, dtype):
    assert rules_for(device_type, capability, cpu_fast_bf16=fast_bf16).auto_dtype == dtype


def test_float16_computes_everywhere_but_on_the_cpu():
    assert not rules_for("cpu").float16
    assert rules_for("cuda", V100).float16 and rules_for("mps").float16


def test_tf32_from_ampere_only():
    assert [rules_for("cuda", capability).tf32 for capability in (V100, A100, H100)] == [False, True, True]
    assert not rules_for("cpu").tf32 and not rules_for("mps").tf32


def test_triton_needs_volta():
    assert (
        rules_for("cuda", (6, 1)).compile_problem
        == "Triton needs CUDA compute capability 7.0 or later, this GPU has 6.1"
    )
    assert all(rules_for("cuda", capability).compile_problem is None for capability in (V100, A100, H100))
    assert rules_for("cpu").compile_problem is None and rules_for("cpu").compiler == "cpp"


def test_mps_compiles_only_when_asked():
    mps = rules_for("mps")
    assert mps.compile_problem is None and mps.compile_caveat == "Inductor's mps backend is experimental"
    assert mps.compile_remedy == "pass --compile to try it"


@pytest.mark.parametrize("capability", [V100, A100, H100])
def test_cuda_decodes_through_cuda_graphs(capability):
    cuda = rules_for("cuda", capability)
    assert cuda.cuda_graphs and cuda.decode_warmup_calls == 3  # CUDA graph trees: warm up, record, replay
    assert not cuda.streaming_matvec


@pytest.mark.parametrize("device_type", ["cpu", "mps"])
def test_other_devices_decode_a_dynamic_length_after_one_warm_up(device_type):
    rules = rules_for(device_type)
    assert not rules.cuda_graphs and rules.decode_warmup_calls == 1 and not rules.coordinate_descent
    assert rules.streaming_matvec == (device_type == "cpu")


# ---------------------------------------------------------------- int8 and int4


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
def test_int8_reads_int8_by_default_everywhere_eager_or_compiled(device_type):
    rules = rules_for(device_type, H100 if device_type == "cuda" else None)
    assert rules.int8_kernel == "int8pack" and rules.int8_problem is None
    assert rules.int8_runs_fast(compiled=False) and rules.int8_runs_fast(compiled=True)
    assert not rules.coordinate_descent


def test_the_fused_cuda_int8_candidate_needs_compile_and_coordinate_descent():
    fused = rules_for("cuda", H100, int8_cuda="fused")
    assert fused.int8_kernel == "fused" and fused.coordinate_descent
    assert fused.int8_runs_fast(compiled=True) and not fused.int8_runs_fast(compiled=False)
    assert "torch.compile fuses the int8 weights into the matmul" in (fused.int8_problem or "")


def test_a_torch_without_the_cuda_int8_kernel_takes_the_fused_path():
    rules = rules_for("cuda", H100, missing_ops=frozenset({"_weight_int8pack_mm"}))
    assert rules.int8_kernel == "fused" and rules.coordinate_descent
    assert (rules.int8_problem or "").startswith("no CUDA kernel for _weight_int8pack_mm in this torch: ")


def test_mps_int8_pads_rows_for_its_kernel_and_without_it_is_refused():
    mps = rules_for("mps")
    assert (mps.int8_row_multiple, mps.int8_width_multiple) == (32, 32)  # `_weight_int8pack_mm_mps`'s checks
    old = rules_for("mps", missing_ops=frozenset({"_weight_int8pack_mm"}))
    assert old.int8_kernel == "dequant" and not old.int8_runs_fast(compiled=True)


@pytest.mark.parametrize(
    ("device_type", "capability", "kernel"),
    [("cpu", None, "cpu"), ("cuda", A100, "tinygemm"), ("cuda", H100, "tinygemm"), ("mps", None, "tinygemm")],
)
def test_int4_kernels(device_type, capability, kernel):
    rules = rules_for(device_type, capability)
    assert rules.int4_kernel == kernel and rules.int4_problem is None


def test_int4_refused_before_ampere_and_without_a_kernel():
    assert rules_for("cuda", (7, 5)).int4_problem == (
        "the GPU (compute capability 7.5) is older than 8.0, which torch's int4 kernel needs"
    )
    assert rules_for("cuda", V100).int4_kernel is None
    missing = frozenset({"_weight_int4pack_mm"})
    assert rules_for("mps", missing_ops=missing).int4_problem == "this torch has no MPS kernel for _weight_int4pack_mm"
    assert rules_for("xpu").int4_problem == "torch has no int4 matmul kernel for xpu"


def test_the_cuda_int8_candidate_comes_from_the_environment():
    assert int8_cuda_choice({}) == "int8pack"
    assert int8_cuda_choice({INT8_CUDA_ENV: "fused"}) == "fused"
    with pytest.raises(ValueError, match="GPT2_CUDA_INT8=fast: use one of int8pack, fused"):
        int8_cuda_choice({INT8_CUDA_ENV: "fast"})


# ---------------------------------------------------------------- running and measuring


def test_measuring_and_running_rules():
    cpu, cuda, mps = rules_for("cpu"), rules_for("cuda", H100), rules_for("mps")
    assert (cpu.peak_memory, cuda.peak_memory, mps.peak_memory) == ("process", "allocator", "driver")
    assert (cpu.peak_table, cuda.peak_table, mps.peak_table) == (False, True, False)
    assert (cpu.asynchronous, cuda.asynchronous, mps.asynchronous) == (False, True, True)
    assert (cpu.own_memory, cuda.own_memory, mps.own_memory) == (False, True, False)
    assert (cpu.pin_memory, cuda.pin_memory, mps.pin_memory) == (False, True, False)
    assert (cpu.distributed_backend, cuda.distributed_backend, mps.distributed_backend) == ("gloo", "nccl", None)
    assert cpu.fused_adamw and cuda.fused_adamw and mps.fused_adamw


def test_ru_maxrss_is_bytes_on_macos_and_kib_on_linux():
    assert maxrss_bytes(1000, "darwin") == 1000
    assert maxrss_bytes(1000, "linux") == 1024_000


# ---------------------------------------------------------------- the table against torch


def native_functions() -> dict[str, set[str]]:
    """Operator name -> the dispatch keys torch's native_functions.yaml (shipped in torchgen) declares for it."""
    declared = _read_native_functions()
    if declared is None:
        pytest.skip("torchgen, with its native_functions.yaml, is not installed")
    return declared


@functools.cache
def _read_native_functions() -> dict[str, set[str]] | None:
    spec = importlib.util.find_spec("torchgen")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    if not path.exists():
        return None
    declared: dict[str, set[str]] = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for entry in yaml.load(path.read_text(), Loader=loader):  # a safe loader, the C one where built
        name = entry["func"].split("(", 1)[0]
        keys = set()
        for key in entry.get("dispatch") or {}:
            keys.update(part.strip() for part in key.split(","))
        declared.setdefault(name, set()).update(keys)
    return declared


@pytest.mark.parametrize(("device_type", "capability"), [("cpu", None), ("cuda", A100), ("cuda", H100), ("mps", None)])
def test_torch_declares_every_kernel_the_rules_name_for_the_device(device_type, capability):
    """torch 2.13 dispatches `_weight_int8pack_mm`, `_convert_weight_to_int4pack` and `_weight_int4pack_mm` to CUDA
    and to MPS, the `_for_cpu` ones to the CPU (a CPU build registers only the CPU's, so this reads the schema)."""
    declared = native_functions()
    rules = rules_for(device_type, capability)
    assert rules.kernel_ops
    for op in rules.kernel_ops:
        assert DISPATCH_KEYS[device_type] in declared[op], (op, declared[op])


def test_the_kernel_tables_name_real_operators():
    declared = native_functions()
    for op in {op for table in (INT8_OPS, INT4_OPS) for ops in table.values() for op in ops}:
        assert op in declared


def test_the_rules_module_imports_no_torch():
    tree = ast.parse(Path(rules_module.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"__future__", "collections", "dataclasses", "typing"}, imported
