"""The gate: scores expected acceptance at the right positions, rises when a student learns the
teacher, and publishes only a candidate better than the live version."""

from __future__ import annotations

import types

import pytest
import torch

from specserve.actors.distill.buffer import ReplayBuffer
from specserve.actors.distill.gate import Gate, GateResult, score
from specserve.actors.distill.records import TrafficRecord
from specserve.actors.distill.trainer import distill_steps

from ..engine.tiny import VOCAB
from .synthetic import teacher, teacher_records, tiny_llama


class NextIdModel(torch.nn.Module):
    """A 'drafter' that predicts token t + 1 after token t with probability 1/2 (rest uniform),
    shaped as a transformers causal LM: base model hidden states, then the output projection."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def base_model(self, input_ids):  # the hidden state at t is token t itself
        return types.SimpleNamespace(last_hidden_state=input_ids.unsqueeze(-1))  # [b, L, 1]

    def get_output_embeddings(self):
        def project(hidden):  # [n, 1] -> [n, vocab]
            q = torch.full((hidden.shape[0], self.vocab), 0.5 / (self.vocab - 1))
            q.scatter_(-1, (hidden + 1) % self.vocab, 0.5)
            return q.log()
        return project


def test_the_score_is_the_mean_overlap_at_every_verified_position():
    v = 10
    # positions follow the pending 4, then d_1 = 7, then d_2 = 2: the drafter puts 1/2 on 5, 8, 3
    a = TrafficRecord((1, 4), (7, 2), ((5, 0), (6, 8), (3,) * 2), ((1.0, 0.0), (0.5, 0.5), (0.5, 0.5)), 1, "v0", 0)
    # one position after the pending 9: the drafter puts 1/2 on 0, the target has 0 and 1 at 1/2
    b = TrafficRecord((9,), (), ((0, 1),), ((0.5, 0.5),), 0, "v0", 0)
    low = 0.5 / 9  # the drafter's mass on any other token
    overlaps = [0.5 + 0.0, 0.5 + low, 0.5 + 0.0, 0.5 + low]  # min(p, q) summed at each position
    assert score(NextIdModel(v), [a, b], v, "cpu", batch_size=1) == pytest.approx(sum(overlaps) / 4)


@pytest.fixture(scope="module")
def traffic():
    """Teacher traffic: a buffer to train on and separate held-out records for the gate."""
    t = teacher(seed=0)
    buf = ReplayBuffer(capacity=256, half_life_records=1e9, holdout_fraction=0.0)
    for r in teacher_records(t, 128, seed=1):
        buf.add(r)
    return buf, teacher_records(t, 48, seed=2)


def trained(buf: ReplayBuffer, seed: int) -> torch.nn.Module:
    student = tiny_llama(seed=seed)
    distill_steps(student, torch.optim.Adam(student.parameters(), lr=1e-2), buf, steps=50, batch_size=16,
                  kind="fkl", vocab=VOCAB, max_len=32, generator=torch.Generator().manual_seed(0))
    return student


@pytest.fixture(scope="module")
def students(traffic):
    buf, _ = traffic
    return tiny_llama(seed=1), trained(buf, seed=1)


def test_a_student_trained_toward_the_teacher_scores_higher_on_held_out_traffic(traffic, students):
    _, held_out = traffic
    untrained, student = students
    before, after = score(untrained, held_out, VOCAB, "cpu"), score(student, held_out, VOCAB, "cpu")
    assert after > before + 0.1, (before, after)


def test_the_gate_publishes_a_better_candidate(traffic, students):
    _, held_out = traffic
    live, candidate = students
    result = Gate().evaluate(candidate, live, held_out, VOCAB, "cpu")
    assert isinstance(result, GateResult) and result.publish
    assert result.candidate_score > result.live_score


def test_the_gate_rejects_a_worse_candidate(traffic, students):
    _, held_out = traffic
    _, live = students
    worse = tiny_llama(seed=1)
    worse.load_state_dict(live.state_dict())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in worse.parameters():
            w.add_(torch.randn(w.shape, generator=gen))
    result = Gate().evaluate(worse, live, held_out, VOCAB, "cpu")
    assert not result.publish and result.candidate_score < result.live_score


def test_the_gate_rejects_a_candidate_distilled_from_another_teacher(traffic, students):
    _, held_out = traffic
    _, live = students
    elsewhere = ReplayBuffer(capacity=256, half_life_records=1e9, holdout_fraction=0.0)
    for r in teacher_records(teacher(seed=5), 128, seed=1):
        elsewhere.add(r)
    result = Gate().evaluate(trained(elsewhere, seed=1), live, held_out, VOCAB, "cpu")
    assert not result.publish and result.candidate_score < result.live_score


def test_the_gate_needs_the_candidate_to_beat_the_live_score_by_the_margin():
    gate = Gate(margin=0.05)
    assert gate.decide(0.60, 0.50)
    assert not gate.decide(0.54, 0.50)
    assert not Gate().decide(0.50, 0.50)
