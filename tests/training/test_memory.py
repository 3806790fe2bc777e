"""The memory estimate follows the run: AdamW or Muon, every weight trained or LoRA's frozen base with adapters,
blocks kept or recomputed; and the CPU check refuses or allows by it. The estimate's error against real peaks is
measured in benchmarks/memory_estimate.py; here its arithmetic, and the refusal through the real CLI."""

from __future__ import annotations

import pytest
import torch

import gpt2cli.training.memory as memory
from conftest import assert_one_line_error, run_cli
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.training.memory import (
    ACTIVATION_WIDTHS,
    GIB,
    USABLE_SHARE,
    NotEnoughMemory,
    StepShape,
    TrainedParameters,
    block_matrix_count,
    check_training_memory,
    parameter_count,
    training_memory,
)

SMALL = GPT2Config(block_size=64, n_layer=2, n_head=2, n_embd=64)
GPT2_124M = GPT2Config.from_preset("gpt2")
GPT2_XL = GPT2Config.from_preset("gpt2-xl")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
EXACT = ["--device", "cpu", "--dtype", "float32", "--log-interval", "1"]


def lora_adapters(config: GPT2Config, rank: int) -> int:
    """A and B of rank `rank` on the four block matrices: (in + out) × rank each."""
    c = config.n_embd
    return config.n_layer * rank * ((c + 3 * c) + (c + c) + (c + 4 * c) + (4 * c + c))


def test_full_adamw_is_sixteen_bytes_a_parameter_and_two_more_under_autocast():
    parameters = parameter_count(SMALL)
    assert parameters == GPT2(SMALL).num_parameters()
    float32 = training_memory(StepShape(SMALL, batch_size=2, seq_len=64))
    bf16 = training_memory(StepShape(SMALL, batch_size=2, seq_len=64, compute_bytes=2, dtype_name="bfloat16"))
    assert float32.state_bytes == 16 * parameters and bf16.state_bytes == 18 * parameters
    assert float32.state_label == "weights, gradients and AdamW"
    ddp = training_memory(StepShape(SMALL, batch_size=2, seq_len=64, ddp=True))
    assert ddp.state_bytes == 20 * parameters  # DDP's gradient buckets
    sharded = training_memory(StepShape(SMALL, batch_size=2, seq_len=64, shards=4))
    assert sharded.state_bytes == -(-16 * parameters // 4)


def test_muon_keeps_one_moment_for_the_block_matrices():
    adamw = training_memory(StepShape(GPT2_124M, 1, 1024))
    muon = training_memory(StepShape(GPT2_124M, 1, 1024, optimizer="muon"))
    assert adamw.state_bytes - muon.state_bytes == 4 * block_matrix_count(GPT2_124M)
    assert block_matrix_count(GPT2_124M) == 12 * 12 * 768 * 768  # 85M of the 124M parameters
    assert muon.activation_bytes == adamw.activation_bytes
    assert muon.state_label == "weights, gradients and Muon and AdamW"


def test_lora_holds_the_base_in_its_dtype_and_trains_the_adapters_only():
    adapters = lora_adapters(GPT2_XL, 16)
    shape = StepShape(
        GPT2_XL, 1, 1024, 2, "bfloat16", parameters=TrainedParameters.adapters(GPT2_XL, adapters, base_bytes=2)
    )
    estimate = training_memory(shape)
    # The bf16 base (no autocast copy: it is already 16-bit) and 18 bytes per adapter weight; no head gradient.
    assert estimate.state_bytes == 2 * parameter_count(GPT2_XL) + 18 * adapters
    full_activations = training_memory(StepShape(GPT2_XL, 1, 1024, 2)).activation_bytes
    assert full_activations - estimate.activation_bytes == GPT2_XL.vocab_size * GPT2_XL.n_embd * 4
    full = training_memory(StepShape(GPT2_XL, 1, 1024, 2, "bfloat16"))
    assert full.state_bytes > 8 * estimate.state_bytes
    assert estimate.state_label.startswith("frozen 16-bit base")
    # A float32 base under autocast gets its 16-bit copies.
    float32_base = TrainedParameters.adapters(GPT2_XL, adapters, base_bytes=4)
    assert training_memory(StepShape(GPT2_XL, 1, 1024, 2, parameters=float32_base)).state_bytes == (
        6 * parameter_count(GPT2_XL) + 18 * adapters
    )
    # Half 16-bit, half float32 (3 bytes on average): copies of the float32 half only.
    mixed = TrainedParameters(adapters, frozen=1000, frozen_bytes=3)
    assert training_memory(StepShape(GPT2_XL, 1, 1024, 2, parameters=mixed)).state_bytes == 18 * adapters + 4000


def test_checkpointing_keeps_one_block_and_the_block_inputs():
    plain = training_memory(StepShape(GPT2_124M, 8, 1024))
    recomputed = training_memory(StepShape(GPT2_124M, 8, 1024, activation_checkpointing=True))
    tokens, c, layers = 8 * 1024, GPT2_124M.n_embd, GPT2_124M.n_layer
    saved = tokens * (layers - 1) * ACTIVATION_WIDTHS * c * 4 - tokens * layers * c * 4
    assert plain.activation_bytes - recomputed.activation_bytes == saved
    assert recomputed.state_bytes == plain.state_bytes
    # The bar: at least 40% less activation memory for the 124M shape at 1024 positions.
    assert recomputed.activation_bytes <= 0.6 * plain.activation_bytes


def test_the_parameters_are_read_off_a_built_model():
    model = GPT2(SMALL)
    assert TrainedParameters.of_model(model) == TrainedParameters.full(SMALL)
    assert TrainedParameters.of_model(model, "muon") == TrainedParameters.full(SMALL, "muon")
    # A LoRA-like model: the base frozen, its blocks in bf16 and the rest in float32 (the tied embedding once), a
    # float32 adapter trained.
    model.requires_grad_(False).transformer.h.to(torch.bfloat16)
    model.transformer.h[0].attn.adapter = torch.nn.Linear(64, 4, bias=False)
    read = TrainedParameters.of_model(model)
    in_blocks = sum(parameter.numel() for parameter in model.transformer.h.parameters()) - 256
    total = parameter_count(SMALL)
    frozen_bytes = (2 * in_blocks + 4 * (total - in_blocks)) / total
    assert read == TrainedParameters(256, frozen=total, frozen_bytes=frozen_bytes, head_trained=False)


def test_the_check_allows_lora_and_refuses_full_fine_tuning_of_gpt2_xl_on_24_gib(monkeypatch):
    monkeypatch.setattr(memory, "memory_available", lambda: (24 * GIB, "available memory (MemAvailable)"))
    monkeypatch.setattr(memory, "local_processes", lambda: 1)
    lora = TrainedParameters.adapters(GPT2_XL, lora_adapters(GPT2_XL, 16), base_bytes=2)
    check_training_memory(StepShape(GPT2_XL, 1, 1024, 2, "bfloat16", parameters=lora), already_resident=0)
    with pytest.raises(NotEnoughMemory) as refused:
        check_training_memory(
            StepShape(GPT2_XL, 1, 1024, 2, "bfloat16"), remedies=("train adapters only with --lora-rank 16",)
        )
    message = str(refused.value)
    assert "weights, gradients and AdamW 26" in message and "bfloat16" in message
    assert message.endswith("; or train adapters only with --lora-rank 16; --no-memory-check runs it anyway")


def test_muon_fits_where_adamw_does_not(monkeypatch):
    adamw = training_memory(StepShape(GPT2_124M, 1, 256)).total_bytes
    muon = training_memory(StepShape(GPT2_124M, 1, 256, optimizer="muon")).total_bytes
    between = (adamw + muon) / 2 / USABLE_SHARE
    monkeypatch.setattr(memory, "memory_available", lambda: (int(between), "available memory (MemAvailable)"))
    monkeypatch.setattr(memory, "local_processes", lambda: 1)
    check_training_memory(StepShape(GPT2_124M, 1, 256, optimizer="muon"))
    with pytest.raises(NotEnoughMemory, match="weights, gradients and AdamW"):
        check_training_memory(StepShape(GPT2_124M, 1, 256))


def test_the_cli_refusal_names_the_runs_optimizer(tmp_path, corpus, exact_env, monkeypatch):
    monkeypatch.setattr(memory, "memory_available", lambda: (8 * 2**20, "the container's memory limit"))
    out = tmp_path / "run"
    refused = run_cli("train", corpus, *TINY, *EXACT, "--optimizer", "muon", "--out", out, env=exact_env)
    assert_one_line_error(refused, 1, "needs about", "weights, gradients and Muon and AdamW", "--no-memory-check")
    assert not out.exists()


def test_the_remedies_offered_are_the_flags_that_would_help():
    from gpt2cli.settings.sections import TrainSettings
    from gpt2cli.training.memory import memory_remedies

    class WithBoth(TrainSettings):  # the settings as they are once LoRA and checkpointing are in
        lora_rank: int | None = None
        activation_checkpointing: bool = False

    full = StepShape(GPT2_124M, 1, 1024)
    lora = StepShape(GPT2_124M, 1, 1024, parameters=TrainedParameters.adapters(GPT2_124M, 1000, 2))
    recomputed = StepShape(GPT2_124M, 1, 1024, activation_checkpointing=True)
    assert memory_remedies(WithBoth(init_from="base.safetensors"), full) == (
        "train adapters only with --lora-rank 16",
        "--activation-checkpointing",
    )
    assert memory_remedies(WithBoth(), full) == ("--activation-checkpointing",)  # from scratch: no base to adapt
    assert memory_remedies(WithBoth(init_from="base.safetensors"), lora) == ("--activation-checkpointing",)
    assert memory_remedies(WithBoth(init_from="base.safetensors"), recomputed) == (
        "train adapters only with --lora-rank 16",
    )
