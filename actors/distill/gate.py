"""The publishing gate: a candidate drafter goes live only if it beats the live one.

Both are scored on the same held-out recent traffic (ReplayBuffer.holdout) by expected
acceptance, sum_x min(p(x), q(x)): the probability that speculative sampling keeps a token
the drafter samples from q where the target samples from p. It is measured at every verified
position a record holds (all k + 1, each counting once), with q the model's softmax at
temperature 1 and p the recorded top-k, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch

from specserve.actors.distill.losses import expected_acceptance
from specserve.actors.distill.records import TrafficRecord, batch_records
from specserve.actors.distill.trainer import supervised_logits


@torch.no_grad()
def score(model: torch.nn.Module, records: Sequence[TrafficRecord], vocab: int, device: torch.device | str,
          batch_size: int = 32, max_len: int = 512, teacher_temperature: float = 1.0) -> float:
    """Mean expected acceptance of `model` as a drafter over every verified position of `records`.

    The model runs in eval mode (its caller's mode is restored); rows longer than `max_len`
    lose their oldest context, as in training.
    """
    if not records:
        raise ValueError("no held-out records to score on")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    positions = 0
    for start in range(0, len(records), batch_size):
        batch = batch_records(records[start : start + batch_size], vocab, max_len,
                              teacher_temperature=teacher_temperature).to(device)
        q = torch.softmax(supervised_logits(model, batch).float(), dim=-1)  # [n, vocab]
        total += expected_acceptance(batch.targets, q).sum()
        positions += len(batch.rows)
    model.train(was_training)
    return total.item() / positions


@dataclass(frozen=True)
class GateResult:
    """One gate decision, for logs, metrics and the version's metadata."""

    candidate_score: float  # expected acceptance of the candidate on the held-out records
    live_score: float  # the same for the live version
    margin: float  # how much better the candidate had to be
    publish: bool  # candidate_score > live_score + margin


@dataclass(frozen=True)
class Gate:
    """Publish a candidate only when its score beats the live version's by more than `margin`.

    A margin > 0 keeps scoring noise on a small held-out set from churning versions.
    """

    margin: float = 0.0

    def decide(self, candidate_score: float, live_score: float) -> bool:
        """Whether the candidate should be published."""
        return candidate_score > live_score + self.margin

    def evaluate(self, candidate: torch.nn.Module, live: torch.nn.Module, records: Sequence[TrafficRecord],
                 vocab: int, device: torch.device | str, max_len: int = 512,
                 teacher_temperature: float = 1.0) -> GateResult:
        """Score both models on the same held-out `records` (p sharpened as in training) and decide."""
        cand = score(candidate, records, vocab, device, max_len=max_len, teacher_temperature=teacher_temperature)
        live_score = score(live, records, vocab, device, max_len=max_len, teacher_temperature=teacher_temperature)
        return GateResult(cand, live_score, self.margin, self.decide(cand, live_score))
