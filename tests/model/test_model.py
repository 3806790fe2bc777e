"""The model against transformers' GPT2LMHeadModel, the reference implementation."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2cli import GPT2, GPT2Config, load_model
from gpt2cli.errors import ConfigError, UsageError
from gpt2cli.model.presets import PRESETS


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layer=2, n_head=4, n_embd=64, n_positions=64),  # the standard small shape
        dict(n_layer=3, n_head=5, n_embd=80, n_positions=48),  # odd head count and width
    ],
    ids=["small", "odd"],
)
def test_logits_match_transformers(hf_model_factory, shape):
    reference, folder = hf_model_factory(**shape)
    ours = load_model(folder)
    idx = torch.randint(0, 50257, (3, shape["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected)


def test_loss_matches_transformers_and_ignores_minus_one(hf_model_factory):
    reference, folder = hf_model_factory()
    ours = load_model(folder)
    generator = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50257, (2, 32), generator=generator)
    targets = torch.randint(0, 50257, (2, 32), generator=generator)
    targets[0, :10] = -1
    with torch.no_grad():
        _, loss = ours(idx, targets)
        logits = reference(idx).logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)


def test_presets_have_the_published_sizes():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = GPT2(GPT2Config.from_preset(name)).num_parameters()
    assert counts["gpt2"] == 124_439_808
    assert counts["gpt2-medium"] == 354_823_168
    assert counts["gpt2-large"] == 774_030_080
    assert counts["gpt2-xl"] == 1_557_611_200


def test_init_scales_residual_projections_and_ties_embeddings():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=8, n_head=4, n_embd=256, block_size=64)
    model = GPT2(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.count_nonzero(block.mlp.c_fc.bias) == 0


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.5))
    idx = torch.randint(0, 50257, (1, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_shapes_that_cannot_work_are_clear_errors():
    with pytest.raises(ConfigError, match="divisible by n_head"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        GPT2Config.from_preset("gpt3")
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=8))
    with pytest.raises(UsageError, match="longer than the block size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(UsageError, match="batch, time"):
        model(torch.zeros(9, dtype=torch.long))


@pytest.mark.slow  # torch.compile
def test_compiled_cpu_attention_matches_sdpa_in_value_and_gradients():
    """The compiled bf16 training path (attention.py): SDPA's output, and gradients as close to float64 as SDPA's."""
    from gpt2cli.model.attention import causal_attention, compiled_cpu_attention_applies

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 64, generator=generator) for _ in range(3))
    q, k, v = (q * 3.0).to(torch.bfloat16), (k * 3.0).to(torch.bfloat16), v.to(torch.bfloat16)  # scores up to ~40
    grad_out = torch.randn(2, 3, 40, 64, generator=generator).to(torch.bfloat16)

    def gradients(attention, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(grad_out.to(dtype))
        return out, [t.grad for t in inputs]

    sdpa = lambda *t: torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)  # noqa: E731
    _, exact_grads = gradients(sdpa, torch.float64)
    sdpa_out, sdpa_grads = gradients(sdpa, torch.bfloat16)
    for attention in (causal_attention, torch.compile(causal_attention)):
        out, grads = gradients(attention, torch.bfloat16)
        assert torch.equal(out, sdpa_out)  # the same kernel
        for ours, theirs, exact in zip(grads, sdpa_grads, exact_grads, strict=True):
            error = ((ours.double() - exact).norm() / exact.norm()).item()
            assert error < 2 * ((theirs.double() - exact).norm() / exact.norm()).item() + 1e-3
    assert not compiled_cpu_attention_applies(q.requires_grad_(), 0.0)  # eager: SDPA's own backward is faster


@pytest.mark.slow  # torch.compile
def test_a_compiled_block_trains_like_the_eager_one_in_bfloat16():
    torch.manual_seed(0)
    block = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=16)).transformer.h[0]
    x = torch.randn(2, 16, 32)

    def query_key_value_gradient(module):  # the projection whose gradient flows through the attention's backward
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x.clone().requires_grad_())
        out.float().square().mean().backward()
        return block.attn.c_attn.weight.grad.clone()

    eager = query_key_value_gradient(block)
    compiled = query_key_value_gradient(torch.compile(block))
    for ours, reference in zip(compiled.chunk(3), eager.chunk(3), strict=True):  # the query, key and value rows
        assert ((ours - reference).norm() / reference.norm()).item() < 2e-2
