"""The read-bandwidth measurement: the CPU path for real, the CUDA branch's logic with a fake timer."""

from __future__ import annotations

import pytest
import torch

from gpt2cli.runtime import bandwidth


class ScriptedTimer:
    """A pass timer whose passes take the given seconds, in turn."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = list(seconds)
        self.started = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> float:
        return self.seconds.pop(0)


def test_the_cpu_reads_at_a_plausible_rate_timed_by_the_host_clock():
    assert isinstance(bandwidth.pass_timer(torch.device("cpu")), bandwidth.HostTimer)
    assert bandwidth.runs_per_pass(torch.device("cpu")) == 1
    assert bandwidth.read_bandwidth("cpu", buffer_bytes=32 * 2**20, passes=2) > 1e8  # any machine reads 100 MB/s


def test_cuda_times_several_sums_per_pass_with_events():
    device = torch.device("cuda", 1)
    timer = bandwidth.pass_timer(device)  # built without a GPU: events are made only when a pass starts
    assert isinstance(timer, bandwidth.CudaEventTimer) and timer.device == device
    assert bandwidth.runs_per_pass(device) == bandwidth.CUDA_SUMS_PER_PASS > 1


def test_the_best_pass_is_divided_by_its_runs():
    calls = []
    timer = ScriptedTimer([0.030, 0.020, 0.025])
    best = bandwidth.best_seconds_per_run(lambda: calls.append(1), timer, passes=3, runs=10)
    assert best == pytest.approx(0.002) and len(calls) == 30 and timer.started == 3


def test_read_bandwidth_takes_the_devices_timer_and_runs_per_pass(monkeypatch):
    timer = ScriptedTimer([0.5, 0.25])
    monkeypatch.setattr(bandwidth, "pass_timer", lambda device: timer)
    monkeypatch.setattr(bandwidth, "runs_per_pass", lambda device: 4)
    rate = bandwidth.read_bandwidth("cpu", buffer_bytes=2**20, passes=2)
    assert rate == pytest.approx(2**20 / (0.25 / 4))  # the faster pass, per sum
