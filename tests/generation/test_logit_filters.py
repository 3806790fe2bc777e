"""The logit filters with each row's own options (the server's batch): the same distributions as one row at a time,
and sampling by inverse CDF with one draw per row."""

from __future__ import annotations

import pytest
import torch

from gpt2cli.generation.logit_filters import (
    choose_next,
    choose_next_per_row,
    filtered_logits,
    filtered_logits_per_row,
    pick_by_inverse_cdf,
)
from gpt2cli.generation.records import SamplingOptions

ROWS = [
    SamplingOptions(temperature=0.0),
    SamplingOptions(temperature=0.0, repetition_penalty=1.3),
    SamplingOptions(temperature=0.7, top_k=5),
    SamplingOptions(temperature=1.2, top_p=0.6, repetition_penalty=1.5),
    SamplingOptions(temperature=1.0, min_p=0.2, top_k=40),
    SamplingOptions(temperature=0.9, top_k=None, top_p=1.0, min_p=0.0),
]
HISTORIES = [[5, 6, 7], [1, 2, 2, 9, 3], [4], [8, 8, 0, 31], [], [12, 13]]


def padded(histories: list[list[int]], width: int, fallback: int = 0) -> torch.Tensor:
    """The engine's layout: each row's tokens, then its first token repeated (any row token works; a row without
    tokens, here only where its penalty is 1, gets `fallback`)."""
    rows = [(h + [h[0] if h else fallback] * width)[:width] for h in histories]
    return torch.tensor(rows)


def test_each_row_is_filtered_as_it_would_be_alone():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), 64) * 3
    batched = filtered_logits_per_row(logits, padded(HISTORIES, 8), ROWS)
    for row, (options, history) in enumerate(zip(ROWS, HISTORIES, strict=True)):
        alone = filtered_logits(logits[row : row + 1], torch.tensor([history], dtype=torch.long), options)
        torch.testing.assert_close(batched[row : row + 1], alone, msg=f"row {row}")


def test_without_sampling_rows_or_penalties_the_logits_pass_through():
    logits = torch.randn(3, 10)
    greedy = [SamplingOptions(temperature=0.0)] * 3
    assert torch.equal(filtered_logits_per_row(logits, torch.zeros(3, 0, dtype=torch.long), greedy), logits)


def test_inverse_cdf_picks_the_token_whose_interval_holds_the_draw():
    probabilities = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 5)
    uniforms = torch.tensor([0.0, 0.05, 0.1, 0.69, 0.999])
    assert pick_by_inverse_cdf(probabilities, uniforms).tolist() == [0, 0, 2, 2, 3]  # token 1 has no interval


def test_inverse_cdf_never_picks_an_impossible_token():
    probabilities = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    for draw in (0.0, 0.5, 1 - 2**-24, 1.0):  # 1.0 lies outside [0, 1): rounding may get there
        picked = pick_by_inverse_cdf(probabilities, torch.full((2,), draw))
        assert probabilities.gather(1, picked[:, None]).min() > 0, draw


def test_evenly_spread_draws_follow_the_probabilities():
    probabilities = torch.softmax(torch.randn(1, 50), dim=-1).expand(20_000, 50)
    uniforms = (torch.arange(20_000) + 0.5) / 20_000
    counts = torch.bincount(pick_by_inverse_cdf(probabilities, uniforms), minlength=50) / 20_000
    torch.testing.assert_close(counts, probabilities[0], atol=1e-4, rtol=0)


def test_greedy_rows_are_choose_next_and_a_sampled_row_depends_on_its_own_draw_only():
    torch.manual_seed(1)
    logits = torch.randn(len(ROWS), 64) * 3
    history = padded(HISTORIES, 8)
    uniforms = torch.rand(len(ROWS))
    chosen = choose_next_per_row(logits, history, ROWS, uniforms)
    for row in (0, 1):
        alone = choose_next(logits[row : row + 1], torch.tensor([HISTORIES[row]]), ROWS[row], None)
        assert chosen[row] == alone[0]
    assert torch.equal(choose_next_per_row(logits[:2], history[:2], ROWS[:2], None), chosen[:2])  # greedy: no draws
    # Row 2 beside other neighbours (reversed, other logits and draws) chooses the same with the same draw.
    others = torch.randn(len(ROWS), 64)
    others[3] = logits[2]
    order = [5, 4, 3, 2, 1, 0]
    moved = choose_next_per_row(others, history[order], [ROWS[i] for i in order], uniforms.flip(0))
    assert moved[3] == chosen[2]


@pytest.mark.parametrize("penalty", [1.0, 1.4])
def test_a_batch_of_one_samples_from_the_filtered_distribution(penalty):
    options = SamplingOptions(temperature=0.8, top_k=10, repetition_penalty=penalty)
    logits = torch.randn(1, 30)
    allowed = torch.isfinite(filtered_logits(logits, torch.tensor([[3, 4]]), options))[0]
    picks = {int(choose_next_per_row(logits, torch.tensor([[3, 4]]), [options], torch.rand(1))) for _ in range(200)}
    assert picks <= set(allowed.nonzero()[:, 0].tolist()) and len(picks) > 1
