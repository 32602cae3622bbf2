"""KD losses: zero exactly when q matches p, positive otherwise, finite with top-k p (values and
gradients), equal to reference formulas; expected acceptance against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from specserve.actors.distill.losses import expected_acceptance, forward_kl, jsd, kd_loss, reverse_kl

N, V, TOP = 6, 32, 4
LOSSES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd}


def dense_p(seed: int) -> torch.Tensor:
    """Full-support target rows.  # [N, V]"""
    return torch.softmax(torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


def top_k_p(seed: int) -> torch.Tensor:
    """Renormalised top-TOP target rows, zeros elsewhere (what records give).  # [N, V]"""
    p = dense_p(seed)
    vals, ids = torch.topk(p, TOP, dim=-1)
    sparse = torch.zeros_like(p).scatter_(1, ids, vals)
    return sparse / sparse.sum(-1, keepdim=True)


def logits_of(p: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is p; p's zeros become a finite logit far below the rest."""
    return torch.where(p > 0, p.clamp_min(1e-30).log(), -1e4)


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_each_loss_is_zero_when_q_equals_p(kind):
    p = dense_p(0)
    torch.testing.assert_close(LOSSES[kind](p, logits_of(p)), torch.zeros(N), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_each_loss_is_zero_when_q_is_p_on_its_top_k_support(kind):
    p = top_k_p(0)
    torch.testing.assert_close(LOSSES[kind](p, logits_of(p)), torch.zeros(N), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_each_loss_is_positive_with_finite_gradients_when_q_differs_from_top_k_p(kind):
    p = top_k_p(1)
    logits = random_logits(2).requires_grad_()
    loss = LOSSES[kind](p, logits)
    assert torch.isfinite(loss).all() and (loss > 1e-3).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_forward_and_reverse_kl_match_the_textbook_formulas_on_full_support():
    p, logits = dense_p(3), random_logits(4)
    log_q = torch.log_softmax(logits, -1)
    q = log_q.exp()
    torch.testing.assert_close(forward_kl(p, logits), (p * (p.log() - log_q)).sum(-1))
    # no tail bucket on full support; the only change is the top-k scale log(1 - eps) ~ 1e-6
    torch.testing.assert_close(reverse_kl(p, logits), (q * (log_q - p.log())).sum(-1), atol=1e-5, rtol=1e-5)


def test_jsd_is_symmetric_at_half_and_bounded_by_log_two():
    p, q = dense_p(5), dense_p(6)
    torch.testing.assert_close(jsd(p, q.log()), jsd(q, p.log()))
    disjoint_p = torch.zeros(1, V).index_fill_(1, torch.tensor([0]), 1.0)
    disjoint_q = torch.zeros(1, V).index_fill_(1, torch.tensor([1]), 1.0)
    torch.testing.assert_close(jsd(disjoint_p, logits_of(disjoint_q)), torch.tensor([math.log(2)]))


def test_reverse_kl_penalises_draft_mass_outside_the_top_k():
    p = top_k_p(7)
    inside = logits_of(p)
    outside = inside.clone()
    outside[p == 0] = inside[p > 0].max()  # the draft now puts most of its mass off the top k
    on_support, off_support = reverse_kl(p, inside), reverse_kl(p, outside)
    assert torch.isfinite(off_support).all()
    assert (off_support > on_support + 1.0).all()
    # bounded: never more than the tail floor's log(1 / eps) per position
    assert (off_support < math.log(1e6) + 1).all()


def test_kd_loss_is_the_weighted_mean_of_the_per_position_losses():
    p, logits = top_k_p(8), random_logits(9)
    per = jsd(p, logits)
    weights = torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(kd_loss("jsd", p, logits, weights), (per[0] + 3 * per[2]) / 4)
    with pytest.raises(ValueError):
        kd_loss("kl", p, logits, weights)


def test_expected_acceptance_is_one_for_identical_distributions_and_the_overlap_otherwise():
    p = dense_p(10)
    torch.testing.assert_close(expected_acceptance(p, p), torch.ones(N))
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    q = torch.tensor([[0.2, 0.2, 0.2, 0.4]])
    torch.testing.assert_close(expected_acceptance(p, q), torch.tensor([0.6]))
