"""The process group a torchrun rank joins where torch has no NCCL (its Windows builds): gloo, on CUDA too. NCCL on
CUDA builds is tested in test_gpu_paths.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gpt2cli.runtime.distributed import World, start


@pytest.fixture
def joined(monkeypatch) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **arguments: calls.append(arguments))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    return calls


def test_cuda_ranks_use_gloo_where_torch_has_no_nccl(joined):
    device = start(World(rank=1, world_size=2, local_rank=1), torch.device("cuda"))
    assert device == torch.device("cuda", 1)
    assert joined == [{"backend": "gloo"}]  # no device_id: binding a device up front is NCCL's


def test_cpu_ranks_use_gloo_and_a_single_process_joins_nothing(joined):
    assert start(World(rank=0, world_size=2), torch.device("cpu")) == torch.device("cpu")
    assert start(World(), torch.device("cuda")) == torch.device("cuda")
    assert joined == [{"backend": "gloo"}]
