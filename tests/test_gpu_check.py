"""benchmarks/gpu_check.py, the GPU acceptance check, in its CPU smoke mode: so that it still runs when a GPU comes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def report(folder) -> dict:
    (path,) = folder.glob("gpu-check-*-smoke.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_the_smoke_run_passes_every_part_and_writes_one_report(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        env=cli_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    data = report(tmp_path)
    statuses = {part["name"]: part["status"] for part in data["parts"]}
    assert statuses == {
        "parity": "pass",
        "train": "pass",
        "resume": "pass",
        "decode": "pass",
        "bench": "pass",
        "distributed": "skipped",
    }
    assert data["passed"] is True and data["smoke"] is True
    assert {"torch", "gpt2cli", "device", "date", "cpu"} <= set(data["environment"])
    parts = {part["name"]: part for part in data["parts"]}
    assert parts["parity"]["numbers"]["logits_max_abs_diff"] == 0.0  # the CPU against itself
    assert parts["train"]["numbers"]["last_loss"] < parts["train"]["numbers"]["first_loss"]
    assert parts["resume"]["numbers"]["whole"] == parts["resume"]["numbers"]["split"]
    assert all(check["passed"] for part in data["parts"] for check in part["checks"])
    assert b"all checks passed" in result.stdout


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    script = load_script(monkeypatch)

    def broken(context, part):
        raise RuntimeError("the parity part broke")

    monkeypatch.setitem(script.PARTS, "parity", broken)
    monkeypatch.setattr(script, "prepare", lambda context: None)  # the bench part needs no prepared files
    code = script.main(["--device", "cpu", "--smoke", "--only", "parity,bench", "--out", str(tmp_path)])
    assert code == 1
    parts = {part["name"]: part for part in report(tmp_path)["parts"]}
    assert parts["parity"]["status"] == "FAIL" and "the parity part broke" in parts["parity"]["error"]
    assert parts["bench"]["status"] == "pass" and len(parts["bench"]["numbers"]["eager"]) == 8
