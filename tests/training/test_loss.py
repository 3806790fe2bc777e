"""The fused training loss (training/loss.py) against plain cross-entropy: the per-block kernels, values and
gradients in float32, bfloat16 and float16, ignored targets, the training forward, and the tied embedding's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.training.loss import (
    TrainingModel,
    cross_entropy_block,
    cross_entropy_block_for_compile,
    fused_linear_cross_entropy,
)


@pytest.mark.parametrize("kernel", [cross_entropy_block, cross_entropy_block_for_compile])
def test_block_kernels_match_the_definition_on_hand_made_logits(kernel):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    targets = torch.tensor([0, 2])
    loss, probs = kernel(logits, targets, torch.tensor([1.0, 0.5]))
    expected = -torch.log_softmax(logits, -1)[[0, 1], [0, 2]] * torch.tensor([1.0, 0.5])
    torch.testing.assert_close(loss, expected.sum())
    torch.testing.assert_close(probs, torch.softmax(logits, -1) * torch.tensor([[1.0], [0.5]]))
    loss_ignored, probs_ignored = kernel(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss_ignored, -torch.log_softmax(logits, -1)[0, 0])
    assert torch.count_nonzero(probs_ignored[1]) == 0


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # torch.compile
@pytest.mark.parametrize("rows", [5, 3000])  # one block, and several blocks for a 50257-word vocabulary
def test_fused_loss_and_gradients_equal_the_plain_ones(rows, compiled, recwarn):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 16, generator=generator, requires_grad=True)
    weight = (torch.randn(50257, 16, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, 50257, (rows,), generator=generator)
    targets[::4] = -1
    targets[1::4] = 7  # one word that is the target of many rows: its gradient row sums them
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1)
    plain_grads = torch.autograd.grad(plain * 3.0, (hidden, weight))  # an upstream gradient other than 1
    fused = fused_linear_cross_entropy(hidden, weight, targets, compiled=compiled)
    fused_grads = torch.autograd.grad(fused * 3.0, (hidden, weight))
    torch.testing.assert_close(fused, plain)
    for ours, reference in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-7)
    assert not [w for w in recwarn if "compiled loss kernel unavailable" in str(w.message)]  # no silent fallback


def test_fused_loss_in_bfloat16_stays_close_to_float32():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=generator, requires_grad=True)
    weight = (torch.randn(50257, 32, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, 50257, (64,), generator=generator)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    reference_grads = torch.autograd.grad(reference, (hidden, weight))
    fused = fused_linear_cross_entropy(hidden, weight, targets, compute_dtype=torch.bfloat16)
    grads = torch.autograd.grad(fused, (hidden, weight))
    assert fused.dtype == torch.float32 and abs(fused.item() - reference.item()) < 0.02
    for ours, exact in zip(grads, reference_grads, strict=True):
        assert ours.dtype == torch.float32
        assert ((ours - exact).norm() / exact.norm()).item() < 0.01


def test_fused_loss_with_every_target_ignored_is_zero_with_zero_gradients():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(50257, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.full((4,), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_fused_loss_in_float16_keeps_the_gradients_of_many_rows():
    """The mean's 1/count is applied in float32: in fp16, softmax / count would underflow to zero."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2048, 16, generator=generator, requires_grad=True)
    weight = (torch.randn(50257, 16, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, 50257, (2048,), generator=generator)
    exact = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), targets)
    exact_grads = torch.autograd.grad(exact, (hidden, weight))
    fused = fused_linear_cross_entropy(hidden, weight, targets, compute_dtype=torch.float16)
    grads = torch.autograd.grad(fused, (hidden, weight))
    assert abs(fused.item() - exact.item()) < 1e-2
    for ours, reference in zip(grads, exact_grads, strict=True):
        assert ((ours.double() - reference).norm() / reference.norm()).item() < 3e-3


def test_fused_loss_backward_twice_with_retained_graph_and_no_rows():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50257, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.arange(6))
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    empty = fused_linear_cross_entropy(hidden[:0], weight, torch.arange(0))
    assert empty.item() == 0.0


def test_training_forward_gives_the_same_loss_without_logits():
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx, idx)
    fused = TrainingModel(model)(idx, idx)
    assert logits is not None
    torch.testing.assert_close(fused, loss)
    assert math.isfinite(fused.item())


def test_tied_embedding_gradient_is_added_into_the_fused_loss_gradient():
    """The training forward (tied embedding + fused loss) gives the tied weight the same gradient as the plain one,
    also when the weight gets other gradients in the same backward (a second forward, a penalty term)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (2, 16))
    idx[1, :8] = idx[0, 3]  # repeated tokens: their embedding rows add up
    other = torch.randint(0, 50257, (1, 16))
    weight = model.transformer.wte.weight

    trained = TrainingModel(model)

    def weight_gradient(fused, objective):
        model.zero_grad(set_to_none=True)
        forward = trained if fused else (lambda tokens, targets: model(tokens, targets)[1])
        objective(lambda tokens: forward(tokens, tokens.roll(1, dims=1))).backward()
        return weight.grad.clone()

    objectives = [
        lambda loss: loss(idx),
        lambda loss: loss(idx) + 0.5 * loss(other),
        lambda loss: loss(idx) + 1e-3 * weight.square().sum(),
    ]
    for objective in objectives:
        torch.testing.assert_close(
            weight_gradient(False, objective), weight_gradient(True, objective), rtol=1e-4, atol=1e-7
        )


def test_tied_embedding_alone_gives_the_ordinary_embedding_gradient():
    from gpt2cli.training.loss import TiedGradient, tied_embedding

    weight = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([[1, 2, 2], [9, 1, 0]])
    upstream = torch.randn(2, 3, 4)
    (ours,) = torch.autograd.grad(tied_embedding(idx, weight, TiedGradient()), weight, upstream)
    (plain,) = torch.autograd.grad(torch.nn.functional.embedding(idx, weight), weight, upstream)
    torch.testing.assert_close(ours, plain)
