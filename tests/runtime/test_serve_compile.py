"""`gpt2 serve`'s compiled decode step: what its arguments say per device. Their construction for every device is
in test_compile_arguments.py; graph capture itself needs a GPU run (benchmarks/gpu_check.py)."""

from gpt2cli.runtime.compile import decode_compile_arguments, serve_compile_arguments


def test_cuda_serving_records_graphs_of_a_few_shapes_from_shared_compilations() -> None:
    arguments = serve_compile_arguments("cuda")
    assert arguments["dynamic"] is None  # automatic: the buckets share compilations, a graph each
    assert arguments["options"]["triton.cudagraphs"] is True and "mode" not in arguments


def test_elsewhere_serving_compiles_as_gpt2_sample() -> None:
    assert serve_compile_arguments("cpu") == decode_compile_arguments("cpu")
