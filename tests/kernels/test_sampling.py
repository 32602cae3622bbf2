"""sampling_probs matches transformers' warpers; sample_from is an exact sampler; top-m round-trips."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specserve.kernels.sampling import sample_from, sampling_probs, sparse_to_dense, truncate_top_m

from .stats import total_variation, tv_bound

VOCAB = 12


def tied_logits(batch: int, seed: int) -> torch.Tensor:
    """Logits on a coarse grid, so most rows hold ties, often at the top-k / top-p boundary."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (batch, VOCAB), generator=gen).float() * 0.75


def transformers_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What `generate` samples from: the warpers it adds, in its order, then softmax."""
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k != 0:  # generate adds no top-k warper for 0, and the warper rejects it
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


def ours(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """sampling_probs with per-row parameters (scalars are broadcast to every row)."""
    batch = logits.shape[0]
    return sampling_probs(
        logits,
        torch.as_tensor(temperature, dtype=torch.float32).expand(batch),
        torch.as_tensor(top_k, dtype=torch.int64).expand(batch),
        torch.as_tensor(top_p, dtype=torch.float64).expand(batch),
    )


def assert_same_distribution(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # the filtered support must agree exactly; values only to float rounding
    assert torch.equal(actual == 0, expected == 0), "different tokens filtered out"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),  # everything off: plain softmax
    (0.7, 0, 1.0),
    (1.3, 3, 1.0),
    (1.0, 1, 1.0),  # top-1 keeps every token tied for the max
    (1.0, VOCAB, 1.0),
    (1.0, VOCAB + 5, 1.0),  # k beyond the vocabulary is clamped
    (1.0, 0, 0.9),
    (0.5, 0, 0.3),
    (2.0, 5, 0.8),
    (0.8, 4, 0.5),
    (1.0, 2, 0.05),  # top-p below the top token's mass keeps only the top token(s)
]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_sampling_probs_equals_transformers_warpers(temperature, top_k, top_p):
    logits = tied_logits(batch=64, seed=0)
    expected = transformers_probs(logits, temperature, top_k, top_p)
    assert_same_distribution(ours(logits, temperature, top_k, top_p), expected)


def test_sampling_probs_applies_each_rows_own_parameters():
    logits = tied_logits(batch=3 * len(SETTINGS), seed=1)
    per_row = [SETTINGS[i % len(SETTINGS)] for i in range(logits.shape[0])]
    temperature, top_k, top_p = (list(column) for column in zip(*per_row))
    actual = ours(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(per_row):
        assert_same_distribution(actual[row : row + 1], transformers_probs(logits[row : row + 1], t, k, p))


def test_sampling_probs_filters_are_not_vacuous():
    # guards the comparison above: these settings must actually remove tokens
    logits = tied_logits(batch=64, seed=0)
    assert (ours(logits, 1.0, 3, 1.0) == 0).any()
    assert (ours(logits, 1.0, 0, 0.5) == 0).any()
    assert not (ours(logits, 1.0, 0, 1.0) == 0).any()


def test_sample_from_matches_probs_within_tv_bound():
    probs = torch.tensor([0.30, 0.05, 0.0, 0.20, 0.01, 0.14, 0.25, 0.05])
    samples = 100_000
    gen = torch.Generator().manual_seed(2)
    noise = torch.empty(samples, probs.numel()).exponential_(generator=gen)  # [N, vocab] Exp(1)
    tokens = sample_from(probs.expand(samples, -1), noise)  # [N]
    # tv_bound: an exact sampler exceeds it with probability below 1e-6 (derivation in stats.py)
    assert total_variation(tokens, probs) < tv_bound(probs.numel(), samples)


def test_sample_from_never_samples_a_zero_probability_token():
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(20_000, 6, generator=gen)
    probs[:, 2] = 0.0
    probs[::2, 4] = 0.0
    noise = torch.empty_like(probs).exponential_(generator=gen)
    tokens = sample_from(probs / probs.sum(-1, keepdim=True), noise)
    assert not (tokens == 2).any()
    assert not (tokens[::2] == 4).any()


def test_sample_from_samples_unnormalised_weights_like_their_normalisation():
    # verify_sampled relies on this: argmax(r / E) samples from r / sum(r)
    gen = torch.Generator().manual_seed(4)
    weights = torch.rand(1000, 7, generator=gen)
    noise = torch.empty_like(weights).exponential_(generator=gen)
    normalised = weights / weights.sum(-1, keepdim=True)
    assert torch.equal(sample_from(weights * 3.7, noise), sample_from(normalised, noise))


def test_truncate_top_m_keeps_the_m_largest_renormalised():
    probs = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.5, 0.0, 0.2, 0.0, 0.3]])
    ids, top = truncate_top_m(probs, 3)
    assert ids.dtype == torch.int64 and top.dtype == torch.float32
    assert ids.tolist() == [[1, 3, 4], [0, 4, 2]]
    expected = torch.tensor([[0.4, 0.3, 0.15], [0.5, 0.3, 0.2]]) / torch.tensor([[0.85], [1.0]])
    torch.testing.assert_close(top, expected)


def test_truncate_top_m_gives_zero_mass_outside_the_support():
    probs = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0]])
    ids, top = truncate_top_m(probs, 4)
    assert ids[0, :2].tolist() == [1, 3]
    torch.testing.assert_close(top, torch.tensor([[0.7, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(sparse_to_dense(ids, top, 5), probs)


def test_truncate_top_m_caps_m_at_the_vocabulary():
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    ids, top = truncate_top_m(probs, 10)
    assert ids.shape == (1, 3)
    torch.testing.assert_close(sparse_to_dense(ids, top, 3), probs)


def test_sparse_to_dense_round_trips_truncate_top_m():
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(4, 3, 9, generator=gen), dim=-1)  # [batch, k, vocab]
    ids, top = truncate_top_m(probs, 4)
    dense = sparse_to_dense(ids, top, 9)  # [batch, k, vocab]
    # dense is probs restricted to its top 4 and renormalised
    kept = probs.topk(4, dim=-1).values[..., -1:]
    expected = torch.where(probs >= kept, probs, 0.0)
    torch.testing.assert_close(dense, expected / expected.sum(-1, keepdim=True))
    assert torch.equal(dense.gather(-1, ids), top)


def test_top_p_drops_a_tied_token_once_the_rest_reach_top_p():
    # five equally likely tokens: four of them already hold 0.8, so top_p=0.8 keeps four, as transformers does
    logits = torch.zeros(1, 5)
    expected = transformers_probs(logits, 1.0, 0, 0.8)
    assert (expected > 0).sum() == 4
    assert_same_distribution(ours(logits, 1.0, 0, 0.8), expected)
