"""The Trainer and what it runs on, in-process: the plan (gradient accumulation, run length), the learning-rate
schedules and parameter groups, the batches (windows, the sampler, the held-out tail), and a tiny model's Trainer
prepared, resumed and refused on real tokenized text.

`gpt2 train` itself is tested in test_train_cli.py, the fused loss in test_loss.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2cli.data.inputs import hold_out_tail
from gpt2cli.errors import DataError, UsageError
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.runtime.devices import resolve_precision
from gpt2cli.settings.sections import load_settings
from gpt2cli.training.batches import Windows, WindowSampler
from gpt2cli.training.optim import Schedule, parameter_groups
from gpt2cli.training.plan import plan_run
from gpt2cli.training.setup import prepare_trainer

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}


def train_settings(**train):
    return load_settings(None, {"model": TINY_MODEL, "train": {"device": "cpu", "dtype": "float32", **train}}).train


# ---------------------------------------------------------------- the plan


def test_plan_derives_accumulation_steps_and_schedule_from_the_batch():
    config = GPT2Config(**TINY_MODEL)
    plan = plan_run(train_settings(batch_size=4, seq_len=16, total_batch_tokens=256, epochs=2.0), config, 100, 2)
    assert plan.seq_len == 16 and plan.grad_accum == 2  # 256 tokens = 4 sequences × 16 tokens × 2 processes × 2
    assert plan.windows_per_step == 16
    assert plan.total_steps == 13  # ceil(2 epochs × 100 windows / 16 windows per step)
    assert plan.schedule.total_steps == 13 and plan.schedule.warmup_steps == 0  # 5% of 13, rounded down
    assert plan.schedule.min_lr == pytest.approx(plan.schedule.lr / 10)
    by_tokens = plan_run(train_settings(batch_size=4, max_tokens=1000, schedule_steps=50, warmup_steps=3), config, 9)
    assert by_tokens.seq_len == 32 and by_tokens.tokens_per_step == 128 and by_tokens.total_steps == 8
    assert (by_tokens.schedule.total_steps, by_tokens.schedule.warmup_steps) == (50, 3)


def test_plan_refuses_what_cannot_run():
    config = GPT2Config(**TINY_MODEL)
    with pytest.raises(UsageError, match="longer than the model's block size 32"):
        plan_run(train_settings(seq_len=33), config, 100)
    with pytest.raises(UsageError, match=r"not a multiple of batch_size × seq_len × processes \(4 × 32 × 1 = 128\)"):
        plan_run(train_settings(batch_size=4, total_batch_tokens=200), config, 100)
    with pytest.raises(DataError, match="3 window"):
        plan_run(train_settings(batch_size=4), config, 3)


# ---------------------------------------------------------------- schedules and parameter groups


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    schedule = Schedule("cosine", lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert schedule.lr_at(0) == pytest.approx(0.1)
    assert schedule.lr_at(9) == pytest.approx(1.0)
    assert schedule.lr_at(10) == pytest.approx(1.0)
    assert schedule.lr_at(60) == pytest.approx(0.55)  # half-way: the mean of lr and min_lr
    assert schedule.lr_at(110) == pytest.approx(0.1)
    assert schedule.lr_at(500) == pytest.approx(0.1)


def test_linear_constant_and_wsd_schedules():
    linear = Schedule("linear", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100)
    assert [linear.lr_at(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    constant = Schedule("constant", lr=0.3, min_lr=0.0, warmup_steps=2, total_steps=100)
    assert [constant.lr_at(s) for s in (0, 1, 2, 99)] == pytest.approx([0.15, 0.3, 0.3, 0.3])
    wsd = Schedule("wsd", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100)
    assert [wsd.lr_at(s) for s in (0, 79, 80, 90, 100)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])


def test_weight_decay_only_on_two_dimensional_weights():
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=16, block_size=8))
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for group in (decay, no_decay) for p in group["params"]) == model.num_parameters()
    assert any(p is model.transformer.wte.weight for p in decay["params"])  # the tied embedding, once


# ---------------------------------------------------------------- batches


def test_sampler_draws_every_window_once_per_epoch_and_is_reproducible():
    sampler = WindowSampler(10, seed=7)
    first = np.concatenate([sampler.take(3) for _ in range(3)] + [sampler.take(1)])
    assert sorted(first.tolist()) == list(range(10))
    second = sampler.take(10)
    assert sorted(second.tolist()) == list(range(10)) and not np.array_equal(first, second)
    again = WindowSampler(10, seed=7)
    assert np.array_equal(again.take(10), first)
    assert sampler.state.epoch == 2 and sampler.state.cursor == 0


def test_windows_never_cross_segments_and_targets_are_shifted():
    segments = [np.arange(0, 10, dtype=np.uint16), np.arange(100, 107, dtype=np.uint16)]
    windows = Windows(segments, seq_len=3)
    assert len(windows) == 3 + 2  # (10 - 1) // 3 and (7 - 1) // 3
    inputs, targets = windows.batch(np.array([2, 3, 4]), torch.device("cpu"))
    assert inputs.tolist() == [[6, 7, 8], [100, 101, 102], [103, 104, 105]]
    assert targets.tolist() == [[7, 8, 9], [101, 102, 103], [104, 105, 106]]


def test_validation_is_held_out_from_the_end():
    train, val = hold_out_tail([np.arange(10), np.arange(10, 14)], 0.5)
    assert np.concatenate(train).tolist() == list(range(7))
    assert np.concatenate(val).tolist() == list(range(7, 14))


# ---------------------------------------------------------------- the Trainer on a tiny model


def make_trainer(tokens, out, **train):
    flags = {"model": TINY_MODEL, "train": {"device": "cpu", "dtype": "float32", "batch_size": 4, "out": str(out)}}
    flags["train"].update(train)
    settings = load_settings(None, flags)
    return prepare_trainer(settings, tokens, out, resolve_precision("float32", torch.device("cpu")))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_windows_are_built_once_and_shared(tmp_path, tokens, monkeypatch):
    import gpt2cli.training.setup as setup
    from gpt2cli.training.batches import Windows

    built = []

    class CountedWindows(Windows):
        def __init__(self, segments, seq_len):
            super().__init__(segments, seq_len)
            built.append(self)

    monkeypatch.setattr(setup, "Windows", CountedWindows)
    trainer = make_trainer(tokens, tmp_path / "run", max_steps=1)
    assert built == [trainer.train_windows, trainer.val_windows]  # one over the training data, one over validation
    assert trainer.sampler.count == len(trainer.train_windows)


def test_resume_in_process_continues_bit_for_bit(tmp_path, tokens, one_thread):
    common = {
        "max_steps": 6,
        "log_interval": 1,
        "eval_interval": 3,
        "save_interval": 3,
        "keep": 2,
        "lr": 1e-3,
        "schedule_steps": 6,
    }
    straight = tmp_path / "straight"
    make_trainer(tokens, straight, **common).run()
    resumed = tmp_path / "resumed"
    make_trainer(tokens, resumed, **{**common, "max_steps": 4}).run()  # saves at 3 and at 4
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")  # back to step 3: step 4 is logged again
    trainer = make_trainer(tokens, resumed, **{**common, "resume": True})
    assert trainer.progress.step == 3 and [r["step"] for r in metrics(resumed)] == [1, 2, 3]  # truncated
    trainer.run()
    assert metrics(straight) == [
        {**record, "elapsed_s": a["elapsed_s"], "train_s": a["train_s"], "tok_per_s": a["tok_per_s"]}
        for a, record in zip(metrics(straight), metrics(resumed), strict=True)
    ]


def test_a_refused_run_writes_nothing_and_settings_are_not_changed(tmp_path, tokens):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="no training state to resume"):
        make_trainer(tokens, out, resume=True)
    with pytest.raises(UsageError, match="block size"):
        make_trainer(tokens, out, seq_len=64)
    assert not out.exists()
    make_trainer(tokens, out, max_steps=2, schedule="constant").run()
    flags = {"model": TINY_MODEL, "train": {"device": "cpu", "dtype": "float32", "batch_size": 4, "resume": True}}
    settings = load_settings(None, flags)
    before = settings.model_dump()
    trainer = prepare_trainer(settings, tokens, out, resolve_precision("float32", torch.device("cpu")))
    assert settings.model_dump() == before  # the saved schedule is kept in a copy
    assert trainer.plan.schedule.total_steps == 2 and trainer.settings.train.schedule_steps == 2
