"""Replay buffer: bounded with drops counted, sampling favours recent records, the newest are held
out and never sampled."""

from __future__ import annotations

import collections

import pytest
import torch

from specserve.actors.distill.buffer import ReplayBuffer
from specserve.actors.distill.records import TrafficRecord


def record(i: int) -> TrafficRecord:
    return TrafficRecord((i,), (1,), ((1,), (2,)), ((1.0,), (1.0,)), 1, "v0", float(i))


def filled(n: int, **kwargs) -> ReplayBuffer:
    buf = ReplayBuffer(**kwargs)
    for i in range(n):
        buf.add(record(i))
    return buf


def test_a_full_buffer_drops_the_oldest_records_and_counts_them():
    buf = filled(25, capacity=10, half_life_records=5, holdout_fraction=0.0)
    assert len(buf) == 10 and buf.dropped == 15 and buf.fill == 1.0
    assert [r.context[0] for r in buf.train_records()] == list(range(15, 25))
    assert filled(4, capacity=10, half_life_records=5).fill == 0.4


def test_sampling_favours_recent_records():
    buf = filled(100, capacity=100, half_life_records=10, holdout_fraction=0.0)
    picks = collections.Counter(r.context[0] for r in buf.sample(4000, torch.Generator().manual_seed(0)))
    newest, oldest = sum(picks[i] for i in range(90, 100)), sum(picks[i] for i in range(10))
    # the newest half-life holds ~half the weight; the oldest ten ~2^-9 of it
    assert 1700 < newest < 2300
    assert oldest < 20
    assert picks[99] > picks[89] > picks[79]


def test_the_newest_records_are_held_out_and_never_sampled():
    buf = filled(50, capacity=40, half_life_records=1000, holdout_fraction=0.2)
    assert [r.context[0] for r in buf.holdout()] == list(range(42, 50))  # newest 8 of 40
    sampled = {r.context[0] for r in buf.sample(2000, torch.Generator().manual_seed(1))}
    assert sampled == set(range(10, 42))  # every training record, no held-out one


def test_a_record_once_out_of_the_holdout_never_returns_to_it():
    buf = ReplayBuffer(capacity=30, half_life_records=5, holdout_fraction=0.25)
    trained_on: set[int] = set()
    for i in range(60):
        buf.add(record(i))
        held = {r.context[0] for r in buf.holdout()}
        assert not held & trained_on
        trained_on |= {r.context[0] for r in buf.train_records()}


def test_sampling_an_empty_training_pool_is_an_error():
    with pytest.raises(ValueError):
        filled(1, capacity=10, half_life_records=5, holdout_fraction=0.5).sample(1)
