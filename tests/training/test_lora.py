"""LoRA fine-tuning (`--lora-rank`) through the real CLI and the core API: only the adapters train, the saved model is
the merged plain GPT-2 (equal to base + adapters, loadable by transformers), resume is exact and refuses a changed
base, and bad settings exit 2. DDP with LoRA against one process: test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, cli_env, run_cli
from gpt2cli import load_model, save_model
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.model.lora import LoraSpec, add_adapters, load_adapter_state
from gpt2cli.model.lora_targets import TARGETS, adapter_parameter_count, frozen_base_bytes, resolve_targets
from gpt2cli.runtime.devices import Precision
from gpt2cli.training.lora import LoraRun, fingerprint

SHAPE = GPT2Config(block_size=32, n_layer=2, n_head=2, n_embd=32)
EXACT = ["--device", "cpu", "--dtype", "float32", "--log-interval", "1", "--batch-size", "4", "--no-compile"]


def write_base(path, seed: int = 0):
    torch.manual_seed(seed)
    return save_model(GPT2(SHAPE), path)


@pytest.fixture
def base(tmp_path):
    return write_base(tmp_path / "base.safetensors")


@pytest.fixture
def env(tmp_path):
    return cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))


def train(*args, env):
    result = run_cli("train", *args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_saved_model_is_base_plus_adapters_merged_and_loads_in_transformers(
    tmp_path, corpus, env, hf_model_factory
):
    from transformers import GPT2LMHeadModel

    _, base = hf_model_factory(n_layer=2, n_head=2, n_embd=32, n_positions=32)  # a transformers folder as the base
    out = tmp_path / "run"
    lora = ["--init-from", base, "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "c_attn,mlp.c_proj"]
    # Muon here (AdamW in the resume test): it updates the adapter matrices, and nothing else has state.
    train(corpus, *lora, *EXACT, "--max-steps", "3", "--optimizer", "muon", "--save-adapters", "--out", out, env=env)
    checkpoint = out / "checkpoints" / "step-000003"
    assert {path.name for path in checkpoint.iterdir()} == {
        "adapters.safetensors",
        "optimizer.safetensors",
        "state.json",
    }
    adapters = load_file(out / "adapters.safetensors")
    moments = load_file(checkpoint / "optimizer.safetensors")
    assert set(adapters) == {f"transformer.h.{i}.{t}.lora_{m}" for i in (0, 1) for t in TARGETS[::3] for m in "ab"}
    assert {name.rsplit(".", 1)[0] for name in moments} == set(adapters)  # only the adapters were optimised
    assert {name.rsplit(".", 1)[1] for name in moments} == {"momentum_buffer"}  # by Muon
    assert all(adapters[name].abs().max() > 0 for name in adapters)  # B moved away from zero
    record = json.loads((checkpoint / "state.json").read_text())["lora"]
    assert record == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "targets": ["attn.c_attn", "mlp.c_proj"],
        "base": str(base),
        "base_sha256": fingerprint(base),
    }

    unmerged = add_adapters(load_model(base), LoraSpec(4, 8.0, 0.0, ("attn.c_attn", "mlp.c_proj")))
    load_adapter_state(unmerged, adapters)
    merged = load_model(out)
    assert not any("lora" in name for name in merged.state_dict())  # a plain GPT-2
    base_weights = load_model(base).state_dict()
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.bias"):
        assert torch.equal(merged.state_dict()[name], base_weights[name]), name  # frozen, untargeted
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unmerged(idx)[0]
        torch.testing.assert_close(merged(idx)[0], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits, expected, rtol=0, atol=1e-5)


def test_resume_is_exact_and_refuses_a_changed_base(tmp_path, corpus, base, exact_env):
    env = exact_env
    common = [corpus, "--init-from", base, "--lora-rank", "2", "--lora-dropout", "0.1", *EXACT, "--lr", "1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # Activation checkpointing on one side only: it changes nothing of the computed run either.
    train(*common, "--max-steps", "6", "--activation-checkpointing", "--out", straight, env=env)
    train(*common, "--max-steps", "3", "--schedule-steps", "6", "--out", split, env=env)
    train("--resume", "--out", split, "--max-steps", "6", env=env)
    assert losses(split) == pytest.approx(losses(straight), rel=0, abs=1e-6)
    assert len(losses(split)) == 6
    for name, tensor in load_file(straight / "checkpoints" / "step-000006" / "adapters.safetensors").items():
        reference = load_file(split / "checkpoints" / "step-000006" / "adapters.safetensors")[name]
        torch.testing.assert_close(tensor, reference, rtol=0, atol=1e-6)
    assert not (split / "adapters.safetensors").exists()  # kept only with --save-adapters

    write_base(base, seed=1)  # the same shape, other weights: the adapters no longer belong to it
    result = run_cli("train", "--resume", "--out", split, "--max-steps", "8", env=env)
    assert_one_line_error(result, 2, "changed since the run started")
    result = run_cli("train", "--resume", "--out", split, "--max-steps", "8", "--lora-rank", "3", env=env)
    assert_one_line_error(result, 2, "rank 2", "rank 3")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--lora-rank", "0"], "train.lora_rank"),
        (["--lora-rank", "-2"], "train.lora_rank"),
        (["--lora-rank", "4", "--lora-targets", "attn.c_q"], "unknown target 'attn.c_q'"),
        (["--lora-rank", "4", "--lora-targets", "c_proj"], "'c_proj' is ambiguous"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "train.lora_alpha"),
        (["--lora-rank", "4", "--lora-dropout", "1"], "train.lora_dropout"),
        (["--lora-rank", "64"], "between 1 and the model's width 32"),
    ],
)
def test_bad_lora_settings_exit_2_and_write_nothing(tmp_path, corpus, base, env, flags, fragment):
    out = tmp_path / "run"
    result = run_cli("train", corpus, "--init-from", base, *flags, *EXACT, "--max-steps", "1", "--out", out, env=env)
    assert_one_line_error(result, 2, fragment)
    assert not out.exists()


def test_lora_needs_a_base_and_adapters_need_lora(tmp_path, corpus, env):
    assert_one_line_error(run_cli("train", corpus, "--lora-rank", "4", env=env), 2, "lora_rank needs init_from")
    assert_one_line_error(run_cli("train", corpus, "--save-adapters", env=env), 2, "save_adapters needs lora_rank")


def test_a_bf16_run_holds_the_frozen_matrices_in_bf16_and_trains_float32_adapters(base):
    run = LoraRun(LoraSpec(rank=4), base, fingerprint(base))
    model = run.build_model(torch.device("cpu"), Precision(torch.device("cpu"), torch.bfloat16), None)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained == {name for name in model.state_dict() if name.endswith(("lora_a", "lora_b"))}
    assert sum(model.get_parameter(name).numel() for name in trained) == adapter_parameter_count(SHAPE, 4)
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    assert dtypes["transformer.h.0.attn.c_attn.weight"] == dtypes["transformer.h.1.mlp.c_proj.weight"] == torch.bfloat16
    assert dtypes["transformer.wte.weight"] == dtypes["transformer.h.0.attn.c_attn.bias"] == torch.float32
    assert all(dtypes[name] == torch.float32 for name in trained)
    frozen = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in trained)
    assert frozen - 4 * SHAPE.vocab_size * SHAPE.n_embd == frozen_base_bytes(SHAPE, 2)  # lm_head is wte, counted once
    idx = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        plain = load_model(base)(idx)[0]
        torch.testing.assert_close(model(idx)[0], plain)  # B is zero: the base's own output, in the same precision


def test_targets_resolve_to_full_paths():
    assert resolve_targets(["c_fc", "attn.c_proj", "c_attn"]) == ("attn.c_attn", "attn.c_proj", "mlp.c_fc")
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_targets(["c_proj"])


def test_fsdp_is_refused_under_torchrun_and_one_process_has_nothing_to_shard():
    from gpt2cli.errors import UsageError
    from gpt2cli.runtime.distributed import World
    from gpt2cli.settings.sections import load_settings
    from gpt2cli.training.setup import _check_lora

    settings = load_settings(None, {"train": {"init_from": "base", "lora_rank": 4, "parallel": "fsdp"}})
    with pytest.raises(UsageError, match="--lora-rank does not support --parallel fsdp"):
        _check_lora(settings, World(rank=1, world_size=2))
    _check_lora(settings, World())
