"""The traffic tap: what the verifier saw, kept for online distillation of the drafter.

The verifier already computes the target's distribution at every drafted position, so the
teacher signal for the drafter is free. After a step verifies a sequence's chain draft (or
its plain step, a block of no drafts and one verified position), the engine offers the tap a
record: the context the block followed, the draft tokens, the target's
top-k probabilities at each verified position, how many drafts were accepted and which drafter
version proposed them (specserve.actors.distill.records.TrafficRecord).

Served traffic is user data, so the tap is off unless configured, samples a fraction of the
blocks, holds at most `capacity` records for at most `max_age_s` seconds, and never logs token
ids or text. It never blocks or slows the engine beyond one batched top-k per step: records
go into a bounded deque (the oldest is dropped, and counted, when it is full) that a consumer
drains from another thread.
"""

from __future__ import annotations

import array
import collections
import random
import threading
import time
from dataclasses import dataclass

import torch

from specserve.actors.distill.records import TrafficRecord


@dataclass(frozen=True)
class TapConfig:
    """What the tap keeps (defaults: off)."""

    enabled: bool = False
    sample_rate: float = 1.0  # fraction of verified blocks recorded
    top_k: int = 16  # target probabilities kept per verified position
    capacity: int = 4096  # records held until drained; beyond, the oldest are dropped
    max_age_s: float = 600.0  # records older than this are dropped undrained (retention)
    max_context: int = 512  # context tokens kept per record (the most recent ones)


@dataclass
class TapStats:
    """Counters for metrics and `distill status`."""

    offered: int = 0  # verified blocks the tap saw
    recorded: int = 0  # records kept
    sampled_out: int = 0  # blocks skipped by sample_rate
    dropped: int = 0  # records dropped because the tap was full
    expired: int = 0  # records dropped by retention
    drained: int = 0  # records handed to the consumer


class TrafficTap:
    """Bounded, sampled, thread-safe record store between the engine and the distiller."""

    def __init__(self, cfg: TapConfig = TapConfig(), seed: int | None = None):
        self.cfg = cfg
        self.stats = TapStats()
        self._records: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def wants(self) -> bool:
        """Whether the next verified block should be recorded (decided before any work)."""
        if not self.cfg.enabled:
            return False
        self.stats.offered += 1
        if self._rng.random() >= self.cfg.sample_rate:
            self.stats.sampled_out += 1
            return False
        return True

    def put(self, record: TrafficRecord) -> None:
        """Keep a record; drops the oldest when full. O(1), never blocks for long."""
        with self._lock:
            if len(self._records) >= self.cfg.capacity:
                self._records.popleft()
                self.stats.dropped += 1
            self._records.append(record)
            self.stats.recorded += 1

    def drain(self, max_records: int | None = None) -> list[TrafficRecord]:
        """Take up to `max_records` records, oldest first, after dropping expired ones."""
        now = time.time()
        with self._lock:
            while self._records and now - self._records[0].created_s > self.cfg.max_age_s:
                self._records.popleft()
                self.stats.expired += 1
            n = len(self._records) if max_records is None else min(max_records, len(self._records))
            out = [self._records.popleft() for _ in range(n)]
            self.stats.drained += len(out)
        return out

    def lose(self, n: int) -> None:
        """Count `n` drained records that never reached the distiller as dropped."""
        with self._lock:
            self.stats.dropped += n

    def __len__(self) -> int:
        return len(self._records)


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[list, list]:
    """The target's top-k (ids, probs) at each position of each row, as nested lists.

    logits: [rows, n, vocab]; probabilities at temperature 1 (the teacher's distribution).
    """
    probs, ids = torch.topk(torch.softmax(logits.float(), dim=-1), min(k, logits.shape[-1]), dim=-1)
    return ids.tolist(), probs.tolist()


def make_record(context: list[int], draft: list[int], ids: list, probs: list, accepted: int, version: str,
                max_context: int) -> TrafficRecord:
    """A TrafficRecord for one verified chain block (ids/probs: k+1 rows of top-k)."""
    n = len(draft) + 1
    # an int32 array, not a tuple of ints: a tenth of the memory in the tap, the hub and the buffer
    return TrafficRecord(array.array("i", context[-max_context:]), tuple(draft), tuple(tuple(r) for r in ids[:n]),
                         tuple(tuple(r) for r in probs[:n]), accepted, version, time.time())
