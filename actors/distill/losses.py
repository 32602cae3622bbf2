"""Knowledge-distillation losses between the target distribution p and the draft distribution q.

p comes from traffic records: the target's top-k at a position, renormalised, zeros outside
(records.dense_targets). q is the drafter's softmax; the functions take the drafter's logits
(log-probabilities work too: log_softmax leaves them unchanged). All return one loss per
position and are computed in float32. As in Online Speculative Decoding (Liu et al. 2023):
forward KL(p || q), reverse KL(q || p) and the generalised JSD between them.

Zeros in p: 0 * log 0 is taken as 0 everywhere, so p's zeros never produce NaN or inf.
Logits must be finite (a model's are): log q is then finite even where q underflows to 0,
which keeps every q * log q term and its gradient finite.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossKind = Literal["fkl", "rkl", "jsd"]

# Reverse KL needs p(x) > 0 wherever q(x) > 0, but a top-k record has p = 0 outside its top k.
# Restricting q to p's support would give a finite loss that never notices the draft's mass
# outside the top k (and so never pushes it back). Instead we compare the two on k + 1 buckets:
# each top-k token, and "everything else". The target's mass in that tail bucket was not
# recorded (the row is renormalised), so it is floored at TAIL_EPS; the top-k mass is scaled
# by (1 - TAIL_EPS) to keep p a distribution. The result is a true KL between two bucket
# distributions: finite, >= 0, ~0 when q matches p on the top k, and at most about
# log(1 / TAIL_EPS) ~ 14 nats per position, so its gradients stay bounded. Inside the tail q
# is free: the target there is unknown.
TAIL_EPS = 1e-6


def forward_kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position: mass-covering, finite for any top-k p.  # [n]

    p: [n, vocab] target probabilities; logits: [n, vocab] drafter logits.
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    support = p > 0
    return torch.where(support, torch.xlogy(p, p) - p * log_q, 0.0).sum(dim=-1)


def reverse_kl(p: torch.Tensor, logits: torch.Tensor, tail_eps: float = TAIL_EPS) -> torch.Tensor:
    """KL(q || p) per position on the top-k + tail buckets (see TAIL_EPS): mode-seeking.  # [n]

    p: [n, vocab] target probabilities; logits: [n, vocab] drafter logits.
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    q = log_q.exp()
    support = p > 0
    log_p = torch.log(torch.where(support, p, 1.0)) + math.log1p(-tail_eps)  # [n, vocab], finite
    on_support = torch.where(support, q * (log_q - log_p), 0.0).sum(dim=-1)  # [n]
    q_tail = torch.where(support, 0.0, q).sum(dim=-1)  # [n] draft mass outside the top k
    # the clamp only guards log(0) when there is no tail; q_tail * log(...) is 0 there anyway
    tail = q_tail * (torch.log(q_tail.clamp_min(1e-30)) - math.log(tail_eps))
    return on_support + tail


def jsd(p: torch.Tensor, logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per position, in [0, log 2] for beta = 0.5.  # [n]

    beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q; m > 0
    wherever p or q is, so it is finite for any top-k p. p: [n, vocab]; logits: [n, vocab].
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta} must lie strictly between 0 and 1")
    log_q = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    support = p > 0
    log_p = torch.log(torch.where(support, p, 1.0))  # finite; only used where p > 0
    log_m = torch.logaddexp(torch.where(support, log_p + math.log(beta), -math.inf),
                            log_q + math.log1p(-beta))  # [n, vocab]
    kl_p = torch.where(support, p * (log_p - log_m), 0.0).sum(dim=-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return beta * kl_p + (1.0 - beta) * kl_q


_LOSSES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd}


def kd_loss(kind: LossKind, p: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the per-position `kind` loss: a scalar to backpropagate.

    p: [n, vocab] target probabilities; logits: [n, vocab] drafter logits; weights: [n].
    """
    if kind not in _LOSSES:
        raise ValueError(f"unknown KD loss {kind!r}; one of {sorted(_LOSSES)}")
    per_position = _LOSSES[kind](p, logits)  # [n]
    weights = weights.to(per_position)
    return (per_position * weights).sum() / weights.sum()


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Probability that speculative sampling accepts a token drafted from q: sum_x min(p, q).  # [n]

    p, q: [n, vocab] probabilities. With a top-k p this is the acceptance against the
    truncated target, which ranks two drafters the same way as long as both see the same p.
    """
    return torch.minimum(p, q).sum(dim=-1)
