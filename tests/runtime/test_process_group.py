"""The process group a torchrun rank joins: NCCL on CUDA, gloo on the CPU and where torch has no NCCL (Windows)."""

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
    return calls


@pytest.mark.parametrize(("nccl", "backend"), [(True, "nccl"), (False, "gloo")])
def test_cuda_ranks_use_nccl_where_torch_has_it_else_gloo(monkeypatch, joined, nccl, backend):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    device = start(World(rank=1, world_size=2, local_rank=1), torch.device("cuda"))
    assert device == torch.device("cuda", 1)
    assert [call["backend"] for call in joined] == [backend]
    assert ("device_id" in joined[0]) == nccl  # binding a device up front is NCCL's


def test_cpu_ranks_use_gloo_and_a_single_process_joins_nothing(joined):
    assert start(World(rank=0, world_size=2), torch.device("cpu")) == torch.device("cpu")
    assert start(World(), torch.device("cuda")) == torch.device("cuda")
    assert joined == [{"backend": "gloo"}]
