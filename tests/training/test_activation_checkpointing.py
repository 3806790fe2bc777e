"""Activation checkpointing (`--activation-checkpointing`): the same loss and gradients as keeping the activations,
in float32, eager and compiled, with dropout and with LoRA's frozen base. Through the CLI: test_lora.py's resume."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.model.lora import LoraSpec, add_adapters
from gpt2cli.runtime.compile import compile_blocks
from gpt2cli.training.loss import TrainingModel

TINY = GPT2Config(block_size=16, vocab_size=512, n_layer=2, n_head=2, n_embd=32)


def loss_and_gradients(model: GPT2, checkpointed: bool, compiled: bool = False):
    model = copy.deepcopy(model)
    model.set_activation_checkpointing(checkpointed)
    if compiled:
        compile_blocks(model.transformer.h)
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    torch.manual_seed(7)  # the dropout masks: the recomputation must draw the same ones
    loss = TrainingModel(model)(idx, targets)  # the eager loss kernel: only the blocks differ
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same(reference, checkpointed):
    torch.testing.assert_close(checkpointed[0], reference[0], rtol=0, atol=1e-6)
    assert reference[1].keys() == checkpointed[1].keys() and reference[1]
    for name, grad in reference[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_plain_loss_and_gradients(dropout):
    torch.manual_seed(0)
    model = GPT2(TINY).train()
    model.set_dropout(dropout)
    assert_same(loss_and_gradients(model, False), loss_and_gradients(model, True))


def test_checkpointing_with_lora_gives_the_adapters_their_gradients():
    # The blocks' input needs no gradient (frozen embeddings): the reentrant form would give the adapters none.
    torch.manual_seed(0)
    model = add_adapters(GPT2(TINY).train(), LoraSpec(rank=4))
    with torch.no_grad():  # B starts at zero; nonzero, every adapter has a gradient to compare
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0, 0.02)
    reference, checkpointed = loss_and_gradients(model, False), loss_and_gradients(model, True)
    assert all(name.endswith(("lora_a", "lora_b")) for name in reference[1])
    assert all(grad is not None and grad.abs().sum() > 0 for grad in checkpointed[1].values())
    assert_same(reference, checkpointed)


@pytest.mark.slow  # torch.compile
def test_checkpointing_composes_with_compile_and_lora_layers():
    # One compilation pair covers both: blocks holding LoRA layers, every parameter trained (all have gradients).
    torch.manual_seed(0)
    model = add_adapters(GPT2(TINY).train(), LoraSpec(rank=4, targets=("attn.c_attn", "mlp.c_fc"))).requires_grad_()
    with torch._dynamo.config.patch(recompile_limit=64):
        assert_same(loss_and_gradients(model, False, compiled=True), loss_and_gradients(model, True, compiled=True))
