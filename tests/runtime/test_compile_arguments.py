"""The torch.compile calls each device would make, constructed on the CPU build: construction rejects a bad
combination of arguments and misspelt option names (it does not prove graph capture, which only a GPU run does)."""

import pytest
import torch

from gpt2cli.runtime.compile import block_compile_options, decode_compile_arguments


@pytest.mark.parametrize("device_type", ["cuda", "cpu", "mps"])
def test_the_decode_step_compile_call_constructs_for_every_device(device_type: str) -> None:
    arguments = decode_compile_arguments(device_type)
    torch.compile(lambda x: x + 1, **arguments)  # raises on `mode` beside `options` or an unknown option


def test_cuda_decoding_records_a_cuda_graph_of_one_shape() -> None:
    arguments = decode_compile_arguments("cuda")
    assert arguments["dynamic"] is False and arguments["options"]["triton.cudagraphs"] is True
    assert "mode" not in arguments  # torch refuses mode together with options


def test_the_block_compile_call_constructs() -> None:
    torch.nn.Linear(2, 2).compile(options=block_compile_options())
