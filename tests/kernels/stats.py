"""Statistics shared by the kernel tests: how far an exact sampler's empirical distribution may stray."""

from __future__ import annotations

import math

import torch


def tv_bound(outcomes: int, samples: int, delta: float = 1e-6) -> float:
    """Total variation an exact sampler's empirical distribution stays under, except with probability delta.

    E[TV] = 0.5 * sum_x E|p̂(x) - p(x)| <= 0.5 * sum_x sqrt(p(x)(1 - p(x)) / N) <= 0.5 * sqrt(K / N)
    (Jensen on each of the K outcomes, then Cauchy-Schwarz across them). TV is a function of N
    independent samples and changing one sample moves it by at most 1/N, so McDiarmid gives
    P(TV >= E[TV] + t) <= exp(-2 N t^2), i.e. t = sqrt(ln(1/delta) / (2N)).
    """
    return 0.5 * math.sqrt(outcomes / samples) + math.sqrt(math.log(1 / delta) / (2 * samples))


def total_variation(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """TV between the empirical distribution of integer `samples` and `probs` [outcomes]."""
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    return 0.5 * (counts / samples.numel() - probs.double()).abs().sum().item()
