"""The distiller's replay buffer: recent traffic for training, the newest for the gate.

Bounded: beyond `capacity` the oldest record is dropped (and counted). Sampling favours recent
traffic: a record's weight halves every `half_life_records` records that arrived after it.
Age is counted in records, not seconds, because what makes a record stale is how much newer
traffic there is to learn from (a quiet hour changes nothing), and it keeps sampling
deterministic under a fixed generator.

Held-out rule: the newest ceil(holdout_fraction * len) records are the gate's held-out set
and are never sampled for training. A record only ever leaves that window (each new record
pushes every rank up by one while the window grows by at most one), so every record the gate
scores on has been held out since it arrived: no candidate and no live version trained on it.
"""

from __future__ import annotations

import collections
import math

import torch

from specserve.actors.distill.records import TrafficRecord


class ReplayBuffer:
    """Bounded record store with recency-weighted sampling and a held-out newest slice."""

    def __init__(self, capacity: int, half_life_records: float, holdout_fraction: float = 0.1):
        if capacity < 1 or half_life_records <= 0 or not 0.0 <= holdout_fraction < 1.0:
            raise ValueError("need capacity >= 1, half_life_records > 0 and 0 <= holdout_fraction < 1")
        self.capacity = capacity
        self.half_life_records = half_life_records
        self.holdout_fraction = holdout_fraction
        self.dropped = 0  # records pushed out by newer ones when full
        self._records: collections.deque[TrafficRecord] = collections.deque()

    def add(self, record: TrafficRecord) -> None:
        """Keep `record` as the newest; drops the oldest when full."""
        if len(self._records) >= self.capacity:
            self._records.popleft()
            self.dropped += 1
        self._records.append(record)

    def holdout(self) -> list[TrafficRecord]:
        """The newest records, oldest first: the gate's held-out set (never sampled)."""
        n = self._holdout_size()
        return list(self._records)[len(self._records) - n:] if n else []

    def train_records(self) -> list[TrafficRecord]:
        """Every record training may sample, oldest first (all but the held-out ones)."""
        return list(self._records)[: len(self._records) - self._holdout_size()]

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[TrafficRecord]:
        """n training records drawn with replacement, weighted by recency (see module doc)."""
        pool = self.train_records()
        if not pool:
            raise ValueError("no training records in the buffer yet")
        picks = torch.multinomial(recency_weights(len(pool), self.half_life_records), n, replacement=True,
                                  generator=generator)
        return [pool[i] for i in picks.tolist()]

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use."""
        return len(self._records) / self.capacity

    def __len__(self) -> int:
        return len(self._records)

    def _holdout_size(self) -> int:
        return math.ceil(self.holdout_fraction * len(self._records))


def recency_weights(n: int, half_life: float) -> torch.Tensor:
    """Sampling weights of n records, oldest first: the newest 1, halving every `half_life`.  # [n]"""
    age = torch.arange(n - 1, -1, -1, dtype=torch.float64)  # records that arrived after each one
    return torch.exp2(-age / half_life)
