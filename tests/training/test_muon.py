"""`--optimizer muon` (torch.optim.Muon on the blocks' matrices, AdamW on the rest) and `train_s` in metrics.jsonl."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, write_corpus
from gpt2cli.errors import CheckpointError, UsageError
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.devices import resolve_precision
from gpt2cli.runtime.distributed import World
from gpt2cli.settings.sections import load_settings
from gpt2cli.training.optim import MuonWithAdamW, Schedule, build_muon
from gpt2cli.training.setup import prepare_trainer, resolve_settings
from gpt2cli.training.trainer import Trainer

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


def make_trainer(tokens, out, world: World | None = None, **train) -> Trainer:
    defaults = {"device": "cpu", "dtype": "float32", "batch_size": 4, "out": str(out), "optimizer": "muon"}
    settings = load_settings(None, {"model": TINY_MODEL, "train": {**defaults, **train}})
    return prepare_trainer(settings, tokens, out, resolve_precision("float32", torch.device("cpu")), world)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_muon_holds_exactly_the_blocks_matrices_and_adamw_the_rest():
    model = GPT2(GPT2Config(**TINY_MODEL))
    optimizer = build_muon(model, 1e-3, 0.02, "original", 0.1, (0.9, 0.95), torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    names = {id(parameter): name for name, parameter in model.named_parameters()}

    def held(inner: torch.optim.Optimizer) -> list[str]:
        return [names[id(parameter)] for group in inner.param_groups for parameter in group["params"]]

    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sorted(held(muon)) == sorted(
        f"transformer.h.{layer}.{matrix}.weight"
        for layer in range(2)
        for matrix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    rest = held(adamw)
    assert rest.count("transformer.wte.weight") == 1  # the embedding tied to the output head, once
    assert sorted(rest) == sorted(name for name in names.values() if name not in held(muon))
    decayed = {names[id(parameter)] for parameter in adamw.param_groups[0]["params"]}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}  # biases and gains are not decayed
    # The schedule sets every group's lr from the AdamW one; Muon's groups keep their own peak.
    assert muon.param_groups[0]["lr_ratio"] == pytest.approx(20.0)


def test_a_short_muon_run_learns_and_logs_its_training_time(tmp_path, tokens):
    out = tmp_path / "run"
    summary = make_trainer(tokens, out, max_steps=12, lr=1e-2, muon_lr=0.05, log_interval=1, eval_interval=6).run()
    records = metrics(out)
    losses = [record["loss"] for record in records]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.5
    assert summary.val_loss < 10.0
    train_s = [record["train_s"] for record in records]
    assert all(later > earlier for earlier, later in itertools.pairwise(train_s))
    assert summary.train_s == train_s[-1] <= summary.elapsed_s


def test_train_s_leaves_out_evaluation_time(tmp_path, tokens, monkeypatch):
    evaluate = Trainer.evaluate

    def slow_evaluation(self: Trainer) -> float:
        time.sleep(0.5)
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluation)
    out = tmp_path / "run"
    make_trainer(tokens, out, max_steps=4, log_interval=1, eval_interval=1, optimizer="adamw").run()
    last = metrics(out)[-1]
    # A record's elapsed_s is taken before that step's evaluation: steps 1-3's three evaluations, none counted
    assert last["elapsed_s"] - last["train_s"] >= 3 * 0.5


def test_muon_resume_continues_bit_for_bit(tmp_path, tokens, one_thread):
    common = {"max_steps": 6, "log_interval": 1, "eval_interval": 3, "save_interval": 3, "schedule_steps": 6}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    make_trainer(tokens, straight, **common).run()
    make_trainer(tokens, resumed, **{**common, "max_steps": 3}).run()
    trainer = make_trainer(tokens, resumed, **{**common, "resume": True})
    assert isinstance(trainer.optimizer, MuonWithAdamW) and trainer.progress.train_s > 0
    trainer.run()
    saved = json.loads((straight / "checkpoints" / "step-000006" / "state.json").read_text())
    assert "train_s" in saved
    timing = ("elapsed_s", "train_s", "tok_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics(resumed)] == [
        {k: v for k, v in r.items() if k not in timing} for r in metrics(straight)
    ]
    # train_s carries on from the checkpoint rather than restarting at zero
    assert metrics(resumed)[3]["train_s"] > metrics(resumed)[2]["train_s"]


def test_resuming_an_adamw_run_with_muon_is_refused(tmp_path, tokens):
    out = tmp_path / "run"
    make_trainer(tokens, out, max_steps=2, optimizer="adamw").run()
    with pytest.raises(CheckpointError, match=r"no moments .*another --optimizer"):
        make_trainer(tokens, out, max_steps=4, resume=True)


def test_a_default_run_saved_before_muon_resumes_with_adamw(tmp_path):
    """A run folder from before the default run used Muon: its config.toml has no optimizer keys. Resuming reads the
    run's own settings without laying today's default-run profile over them."""
    (tmp_path / "config.toml").write_text(
        '[data]\npaths = []\n\n[train]\nlr = 0.001\nschedule = "cosine"\nmax_steps = 600\nweight_decay = 0.1\n'
    )
    settings = resolve_settings(None, {"train": {"resume": True, "out": str(tmp_path)}})
    assert settings.data.paths == []  # the bundled corpus
    assert (settings.train.optimizer, settings.train.schedule, settings.train.lr) == ("adamw", "cosine", 0.001)
    assert (settings.train.weight_decay, settings.train.decay_fraction) == (0.1, 0.2)
    fresh = resolve_settings(None, {"train": {"out": str(tmp_path / "new")}})
    assert (fresh.train.optimizer, fresh.train.schedule) == ("muon", "wsd")  # a new default run takes the profile


def test_muon_under_fsdp_is_refused_before_anything_is_written(tmp_path, tokens):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="--parallel fsdp"):
        make_trainer(tokens, out, World(rank=0, world_size=2), max_steps=2, parallel="fsdp")
    assert not out.exists()


def test_wsd_decays_over_its_decay_fraction():
    wsd = Schedule("wsd", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100, decay_fraction=0.5)
    assert [wsd.lr_at(step) for step in (0, 49, 50, 75, 100)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])


def test_bad_optimizer_and_a_torch_without_muon_exit_2_with_one_line(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    result = run_cli("train", corpus, "--optimizer", "sgd", "--out", tmp_path / "bad")
    assert result.returncode == 2 and b"sgd" in result.stderr
    monkeypatch.delattr(torch.optim, "Muon")
    result = run_cli(
        "train",
        corpus,
        "--optimizer",
        "muon",
        "--device",
        "cpu",
        "--out",
        tmp_path / "old-torch",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "32",
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        f"gpt2: error: --optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}"
    ]
    assert not (tmp_path / "old-torch").exists()


@pytest.mark.slow
def test_muon_under_ddp_matches_one_process(tmp_path, exact_env):
    corpus = write_corpus(tmp_path)
    common = [
        "train",
        corpus,
        "--optimizer",
        "muon",
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "32",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--log-interval",
        "1",
        "--eval-interval",
        "3",
        "--max-steps",
        "6",
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_cli(*common, "--batch-size", "4", "--out", single, env=exact_env).returncode == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gpt2cli"]
    result = subprocess.run(
        [*launcher, *map(str, common), "--batch-size", "2", "--out", str(double)],
        capture_output=True,
        env=exact_env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    # Gradients are averaged across the ranks before the step: Muon orthogonalises the same whole matrices.
    for key in ("loss", "val_loss"):
        expected = [record[key] for record in metrics(single) if key in record]
        assert [record[key] for record in metrics(double) if key in record] == pytest.approx(expected, rel=1e-4)
