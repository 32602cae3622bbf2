"""Adaptive draft length: how many tokens to draft for a sequence this step.

With per-token acceptance rate alpha, a block of k drafts yields on average
    E(k) = (1 - alpha^(k+1)) / (1 - alpha)
tokens (accepted drafts plus the recovered/bonus token) and costs
    T(k) = k * t_draft + t_verify(k + 1) + t_rtt
seconds. The policy picks the k in [0, k_max] that maximises E(k) / T(k); k = 0 is plain
decoding, so speculation switches itself off for a sequence whose drafts do not pay. The times
are measured as the engine runs (`CostModel`); alpha is tracked per sequence. While a sequence
is not drafting its alpha drifts back toward the prior, so it is retried now and then.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftLengthConfig:
    """Knobs of the policy; the defaults need no tuning."""

    k_max: int = 8  # longest draft block
    alpha_prior: float = 0.7  # acceptance assumed for a new sequence
    alpha_ema: float = 0.3  # weight of the latest step in the alpha estimate
    time_ema: float = 0.1  # weight of the latest measurement in the cost model
    recovery: float = 0.05  # per-step drift of an idle sequence's alpha back to the prior
    fixed_k: int | None = None  # draft exactly this many every step (no cost model): for tests/studies


class CostModel:
    """Measured draft step time, verify time per block size, and draft round-trip time."""

    def __init__(self, cfg: DraftLengthConfig, rtt_s: float = 0.0):
        self.cfg = cfg
        self.rtt_s = rtt_s
        self.draft_step_s: float | None = None
        self.verify_s: dict[int, float] = {}

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.cfg.time_ema * (new - old)

    def observe_draft(self, forwards: int, seconds: float) -> None:
        """A drafting call of `forwards` drafter forward passes took `seconds`."""
        if forwards > 0:
            self.draft_step_s = self._ema(self.draft_step_s, seconds / forwards)

    def observe_verify(self, n: int, seconds: float) -> None:
        """A verification forward with blocks of `n` positions took `seconds`."""
        self.verify_s[n] = self._ema(self.verify_s.get(n), seconds)

    def verify_time(self, n: int) -> float:
        """Estimated verify time for blocks of n positions (interpolated from measurements)."""
        if n in self.verify_s:
            return self.verify_s[n]
        known = sorted(self.verify_s)
        if not known:
            return 1.0
        if len(known) == 1:
            return self.verify_s[known[0]]  # optimistic until a second size is measured
        lo, hi = known[0], known[-1]
        if n < lo:
            return self.verify_s[lo]  # never extrapolate below a measurement: it could reach zero
        slope = max(0.0, (self.verify_s[hi] - self.verify_s[lo]) / (hi - lo))
        base = max(m for m in known if m < n)
        return self.verify_s[base] + slope * (n - base)

    def step_time(self, k: int) -> float:
        """T(k): seconds for one step drafting k tokens."""
        if k == 0:
            return self.verify_time(1)
        return k * (self.draft_step_s or 0.0) + self.verify_time(k + 1) + self.rtt_s


def expected_tokens(alpha: float, k: int) -> float:
    """E(k): mean tokens emitted by a step with k drafts at acceptance alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_draft_length(alpha: float, cost: CostModel, k_max: int) -> int:
    """The k in [0, k_max] with the most expected tokens per second."""
    rates = [expected_tokens(alpha, k) / cost.step_time(k) for k in range(k_max + 1)]
    return max(range(k_max + 1), key=rates.__getitem__)


class AcceptanceTracker:
    """alpha of one sequence: EMA of accepted / drafted over its steps."""

    def __init__(self, cfg: DraftLengthConfig):
        self.cfg = cfg
        self.alpha = cfg.alpha_prior

    def observe(self, drafted: int, accepted: int) -> None:
        """Fold in one verified block (or drift toward the prior when nothing was drafted)."""
        if drafted == 0:
            self.alpha += self.cfg.recovery * (self.cfg.alpha_prior - self.alpha)
            return
        self.alpha += self.cfg.alpha_ema * (accepted / drafted - self.alpha)
