"""Faults users meet, each injected: a second writer, a killed writer, SIGTERM, damaged and contended cache entries,
a full disk mid-save, a run too large for memory. Real processes and real signals where the machine allows; a full
disk by making the lowest-level call (`os.fsync`, safetensors' save) fail with ENOSPC."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, exact_environment, run_cli, write_corpus
from gpt2cli import load_model
from gpt2cli.data.encoding import EncodeOptions
from gpt2cli.data.inputs import tokens_of
from gpt2cli.data.shards import HEADER_BYTES, ShardWriter, read_shard
from gpt2cli.data.token_cache import checksum_path
from gpt2cli.training.run_folder import RunFolder, RunFolderInUse

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
EXACT = ["--device", "cpu", "--dtype", "float32", "--log-interval", "1"]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def start_training(args: list, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


# ---------------------------------------------------------------- one writer per run folder


@pytest.mark.slow  # a real process holds the folder, then is killed
def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, corpus, exact_env):
    out = tmp_path / "run"
    holder = start_training(
        [corpus, *TINY, *EXACT, "--max-steps", "5000", "--save-interval", "2", "--out", out], exact_env
    )
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), "the first checkpoint")
        for second in (["--resume", "--out", out], [corpus, *TINY, "--out", out]):
            refused = run_cli("train", *second, env=exact_env)
            assert_one_line_error(refused, 1, str(out), f"PID {holder.pid}")
        assert holder.poll() is None  # the holder was not disturbed
    finally:
        holder.kill()
        holder.wait()
    saved = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    resumed = run_cli("train", "--resume", "--out", out, "--max-steps", str(saved + 2), env=exact_env)
    assert resumed.returncode == 0, resumed.stderr.decode()  # the kernel released the dead holder's lock
    assert sorted(losses(out)) == list(range(1, saved + 3))  # one line per step: no writer interleaved
    assert not temporaries(out)


def test_the_lock_names_its_holder_and_a_refused_new_folder_is_removed(tmp_path):
    folder = RunFolder(tmp_path / "new" / "run")
    with folder.writer_lock():
        assert (folder.path / ".lock").read_text().strip() == str(os.getpid())
        # flock conflicts between open files even within one process: a second open of the lock is refused
        second = RunFolder(folder.path).writer_lock()
        with pytest.raises(RunFolderInUse, match=rf"in use by another gpt2 train \(PID {os.getpid()}\)"), second:
            pass
    assert not (tmp_path / "new").exists()  # created for the lock, nothing written: gone again


@pytest.mark.slow  # a real process, signalled mid-run
def test_sigterm_saves_and_exits_143_then_resume_matches_an_uninterrupted_run(tmp_path, corpus, exact_env):
    common = [corpus, *TINY, *EXACT, "--save-interval", "1000", "--eval-interval", "1000"]
    out = tmp_path / "terminated"
    process = start_training([*common, "--max-steps", "400", "--out", out], exact_env)
    wait_for(lambda: logged_steps(out) >= 3, "three steps")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr.decode()
    assert f"gpt2 train --resume --out {out}" in stderr.decode()
    stopped = max(losses(out))
    resumed = run_cli("train", "--resume", "--out", out, "--max-steps", str(stopped + 2), env=exact_env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    straight = tmp_path / "straight"
    reference = [*common, "--schedule-steps", "400", "--max-steps", str(stopped + 2), "--out", straight]
    assert run_cli("train", *reference, env=exact_env).returncode == 0
    assert losses(out) == losses(straight)


# ---------------------------------------------------------------- caches that heal


def cached_tokens(corpus: Path, cache: Path, warnings: list[str] | None = None) -> np.ndarray:
    collected = warnings if warnings is not None else []
    return np.array(tokens_of(corpus, EncodeOptions(), cache, warn=collected.append))


def only_entry(cache: Path) -> Path:
    [entry] = (cache / "tokens").glob("*.bin")
    return entry


@pytest.mark.parametrize("damage", ["truncated", "header bit flipped"])
def test_a_damaged_cache_entry_is_rebuilt_with_one_warning(tmp_path, corpus, damage):
    cache = tmp_path / "cache"
    reference = cached_tokens(corpus, cache)
    entry = only_entry(cache)
    data = bytearray(entry.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[8] ^= 0x10  # the token count
    entry.write_bytes(bytes(data))
    warnings: list[str] = []
    assert np.array_equal(cached_tokens(corpus, cache, warnings), reference)
    assert len(warnings) == 1 and "damaged" in warnings[0] and str(corpus) in warnings[0]
    assert np.array_equal(np.array(read_shard(entry)), reference)  # healed on disk
    assert cached_tokens(corpus, cache, warnings).size and len(warnings) == 1  # and healthy from then on


def test_train_heals_a_truncated_entry(tmp_path, corpus, exact_env):
    args = ["train", corpus, *TINY, *EXACT, "--max-steps", "1"]
    assert run_cli(*args, "--out", tmp_path / "a", env=exact_env).returncode == 0
    entry = only_entry(tmp_path / "cache")
    entry.write_bytes(entry.read_bytes()[:-100])
    healed = run_cli(*args, "--out", tmp_path / "b", env=exact_env)
    assert healed.returncode == 0, healed.stderr.decode()
    assert healed.stderr.decode().count("gpt2: warning: token cache entry") == 1
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_cache_verify_finds_a_flipped_token_bit_and_the_entry_is_rebuilt(tmp_path, corpus):
    cache = tmp_path / "cache"
    env = {**os.environ, "GPT2_DATA__CACHE_DIR": str(cache)}
    reference = cached_tokens(corpus, cache)
    clean = run_cli("cache", "verify", "--json", env=env)
    assert clean.returncode == 0 and json.loads(clean.stdout)["entries"][0]["status"] == "ok"
    entry = only_entry(cache)
    with open(entry, "r+b") as handle:  # one bit in the middle of the tokens: invisible to the size/header check
        handle.seek(HEADER_BYTES + 1001)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0x01]))
    info = run_cli("cache", "info", "--json", env=env)
    assert json.loads(info.stdout)["entries"][0]["status"] == "ok"  # the cheap check cannot see it
    found = run_cli("cache", "verify", env=env)
    assert found.returncode == 1 and "checksum mismatch" in found.stdout.decode()
    assert found.stderr.decode().count("gpt2: warning:") == 1
    assert not entry.exists() and not checksum_path(entry).exists()
    assert np.array_equal(cached_tokens(corpus, cache), reference)
    cleared = run_cli("cache", "clear", "--json", env=env)
    assert json.loads(cleared.stdout)["removed_entries"] == 1 and not (cache / "tokens").exists()


def _fill_at_the_same_time(corpus: str, cache: str, barrier, results) -> None:  # runs in a forked child
    write, waited = ShardWriter.write, []

    def write_together(self, tokens):  # each process's first write waits for the other's: both are mid-entry at once
        if not waited:
            barrier.wait(timeout=60)
            waited.append(True)
        write(self, tokens)

    ShardWriter.write = write_together
    results.put(np.array(tokens_of(Path(corpus), EncodeOptions(), Path(cache))).tobytes())


def test_two_processes_filling_one_entry_both_get_correct_tokens(tmp_path, corpus):
    reference = cached_tokens(corpus, tmp_path / "reference")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    cache = tmp_path / "cache"
    children = [
        context.Process(target=_fill_at_the_same_time, args=(str(corpus), str(cache), barrier, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    outputs = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert all(np.array_equal(np.frombuffer(output, dtype=reference.dtype), reference) for output in outputs)
    assert np.array_equal(cached_tokens(corpus, cache), reference)
    assert not temporaries(cache)


# ---------------------------------------------------------------- a full disk mid-save


def failing_fsync(monkeypatch, fragment: str, code: int = errno.ENOSPC) -> None:
    """`os.fsync` fails with `code` for files whose path contains `fragment` (what a full disk reports)."""
    real = os.fsync

    def fsync(descriptor: int) -> None:
        if fragment in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(code, os.strerror(code))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


def failing_safetensors_save(monkeypatch, fragment: str) -> None:
    """safetensors' save writes half the file, then the disk is full."""
    from safetensors.torch import save_file

    import gpt2cli.training.run_folder

    def save(tensors, filename, metadata=None):
        if fragment in str(filename):
            save_file(tensors, filename, metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[: Path(filename).stat().st_size // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        save_file(tensors, filename, metadata)

    monkeypatch.setattr(gpt2cli.training.run_folder, "save_file", save)


CHECKPOINTED = [*TINY, *EXACT, "--save-interval", "2", "--eval-interval", "3", "--keep", "2", "--max-steps", "8"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 8-step run, checkpointed every 2 steps, that the runs with a fault are compared with."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    corpus, env = write_corpus(folder), exact_environment(folder)
    assert run_cli("train", corpus, *CHECKPOINTED, "--out", folder / "run", env=env).returncode == 0
    return corpus, env, losses(folder / "run")


@pytest.mark.parametrize("fault", [failing_fsync, failing_safetensors_save], ids=["fsync", "safetensors save"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_is_exact(
    tmp_path, uninterrupted, monkeypatch, fault
):
    corpus, env, expected = uninterrupted
    out = tmp_path / "full"
    with monkeypatch.context() as patch:
        fault(patch, ".step-000006.")
        result = run_cli("train", corpus, *CHECKPOINTED, "--out", out, env=env)
    last = result.stderr.decode().strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    assert last.startswith("gpt2: error: cannot write the checkpoint of step 6") and "ENOSPC" in last, last
    assert "step-000004 is still the latest checkpoint" in last
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not temporaries(out) and not (out / "checkpoints" / "step-000006").exists()
    assert load_model(out).config.n_layer == 2

    resumed = run_cli("train", "--resume", "--out", out, "--max-steps", "8", env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert losses(out) == expected  # bitwise, every step


def test_a_full_disk_in_tokenize_convert_and_the_cache_leaves_nothing(tmp_path, corpus, monkeypatch):
    failing_fsync(monkeypatch, str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    shard = tmp_path / "out" / "tokens.bin"
    assert_one_line_error(run_cli("tokenize", corpus, "-o", shard), 1, f"cannot write {shard}", "ENOSPC")
    from gpt2cli import save_model
    from gpt2cli.model.gpt2 import GPT2, GPT2Config

    source = save_model(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16)), tmp_path / "m.safetensors")
    for destination in ("m.safetensors", "hf", "m.bin"):
        result = run_cli("convert", source, tmp_path / "out" / destination)
        assert_one_line_error(result, 1, "cannot write", "No space left on device (ENOSPC)")
    with pytest.raises(Exception, match=r"cannot write the token cache entry.*ENOSPC"):
        cached_tokens(corpus, tmp_path / "out" / "cache")
    assert [path.name for path in (tmp_path / "out").rglob("*") if path.is_file()] == []


# ---------------------------------------------------------------- memory


def test_a_cpu_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, corpus, exact_env, monkeypatch):
    import gpt2cli.training.memory

    limit = (8 * 2**20, "the container's memory limit")
    monkeypatch.setattr(gpt2cli.training.memory, "memory_available", lambda: limit)
    out = tmp_path / "run"
    refused = run_cli("train", corpus, *TINY, *EXACT, "--batch-size", "64", "--out", out, env=exact_env)
    line = assert_one_line_error(
        refused,
        1,
        "needs about",
        "batch 64 × 32 tokens",
        "--batch-size",
        "--seq-len",
        "--dtype bfloat16",
        "--no-memory-check",
        "container",
    )
    assert "GiB" in line and not out.exists()
    forced = run_cli(
        "train", corpus, *TINY, *EXACT, "--max-steps", "1", "--no-memory-check", "--out", out, env=exact_env
    )
    assert forced.returncode == 0, forced.stderr.decode()


def test_the_limit_is_the_cgroups_where_set(tmp_path):
    from gpt2cli.training.memory import _cgroup_free

    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    root = tmp_path / "fs"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "step" / "memory.max").write_text("max\n")
    (root / "job" / "step" / "memory.current").write_text("100\n")
    assert _cgroup_free(proc, root) is None
    (root / "job" / "memory.max").write_text(f"{3 * 2**30}\n")  # set on the parent: it binds the child
    (root / "job" / "memory.current").write_text(f"{2**30}\n")
    assert _cgroup_free(proc, root)[0] == 2 * 2**30


def test_an_out_of_memory_in_the_first_step_is_one_line(tmp_path, corpus, exact_env, monkeypatch):
    from gpt2cli.training.trainer import Trainer

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "_train_step", out_of_memory)
    result = run_cli("train", corpus, *TINY, *EXACT, "--out", tmp_path / "run", env=exact_env)
    last = result.stderr.decode().strip().splitlines()[-1]  # after the run's start-up lines
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    assert last.startswith("gpt2: error: out of memory on cpu in the first step"), last
    assert "--batch-size" in last and "--parallel fsdp" in last
