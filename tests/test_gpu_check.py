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
        "int4": "pass",
        "int8": "pass",
        "lookup": "pass",
        "serve": "pass",
    }
    assert data["passed"] is True and data["smoke"] is True and data["complete"] is True
    assert {"torch", "gpt2cli", "device", "date", "cpu"} <= set(data["environment"])
    parts = {part["name"]: part for part in data["parts"]}
    assert parts["parity"]["numbers"]["logits_max_abs_diff"] == 0.0  # the CPU against itself
    assert parts["train"]["numbers"]["last_loss"] < parts["train"]["numbers"]["first_loss"]
    assert parts["resume"]["numbers"]["whole"] == parts["resume"]["numbers"]["split"]
    assert parts["serve"]["numbers"]["greedy_first_differences"] == [None] * 4
    assert parts["serve"]["numbers"]["shapes"] == 9  # CUDA's buckets, run eagerly: 3 batch sizes x 3 lengths
    assert parts["int8"]["numbers"]["fastest"] in ("int8linear-eager", "int8pack-eager")
    assert parts["lookup"]["numbers"]["eager"]["lookup"]["drafted"] > 0
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


def test_the_plan_splits_every_part_into_calls_within_the_limits(monkeypatch):
    script = load_script(monkeypatch)
    calls, left_out = script.plan_calls(script.H100_ESTIMATE_S, call_limit_s=600, budget_s=900)
    assert left_out == [] and sorted(name for call in calls for name in call) == sorted(script.PARTS)
    costs = [script.CALL_OVERHEAD_S + sum(script.H100_ESTIMATE_S[name] for name in call) for call in calls]
    assert all(cost <= 600 * script.CALL_FILL for cost in costs) and sum(costs) <= 900
    order = list(script.PARTS)
    assert all(call == sorted(call, key=order.index) for call in calls)  # each call runs its parts in order


def test_a_plan_without_room_says_what_it_left_out(monkeypatch):
    script = load_script(monkeypatch)
    calls, left_out = script.plan_calls(script.H100_ESTIMATE_S, call_limit_s=300, budget_s=400)
    assert left_out and sum(script.CALL_OVERHEAD_S + sum(script.H100_ESTIMATE_S[n] for n in c) for c in calls) <= 400
    assert set(left_out).isdisjoint(name for call in calls for name in call)


def test_plan_prints_the_only_groups_from_estimates_or_a_report(monkeypatch, tmp_path, capsys):
    script = load_script(monkeypatch)
    assert script.main(["--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    groups = [line.split("--only ")[1].split(",") for line in lines if "--only " in line]
    assert sorted(name for group in groups for name in group) == sorted(script.PARTS)
    report = tmp_path / "full.json"
    measured = [{"name": name, "seconds": 475.0 if name == "bench" else 10.0} for name in script.PARTS]
    report.write_text(json.dumps({"smoke": False, "parts": measured}))
    assert script.main(["--plan", str(report)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("--only bench") for line in lines)  # 475 s leaves no room for another part
    report.write_text(json.dumps({"smoke": True, "parts": measured}))
    with pytest.raises(SystemExit):
        script.main(["--plan", str(report)])
