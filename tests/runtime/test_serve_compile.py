"""`gpt2 serve`'s compiled decode step, constructed on the CPU build for each device (construction rejects a bad
combination of arguments and misspelt option names; graph capture itself needs a GPU run: benchmarks/gpu_check.py)."""

import pytest
import torch

from gpt2cli.runtime.compile import decode_compile_arguments, serve_compile_arguments


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_the_serve_step_compile_call_constructs(device_type: str) -> None:
    torch.compile(lambda x: x + 1, **serve_compile_arguments(device_type))


def test_cuda_serving_records_graphs_of_a_few_shapes_from_shared_compilations() -> None:
    arguments = serve_compile_arguments("cuda")
    assert arguments["dynamic"] is None  # automatic: the buckets share compilations, a graph each
    assert arguments["options"]["triton.cudagraphs"] is True and "mode" not in arguments


def test_elsewhere_serving_compiles_as_gpt2_sample() -> None:
    assert serve_compile_arguments("cpu") == decode_compile_arguments("cpu")
