"""The distillation loop: with each KD loss, a tiny student trained on a fixed buffer of teacher
traffic ends with a much lower loss on that buffer than it started with."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.distill.buffer import ReplayBuffer
from specserve.actors.distill.losses import kd_loss
from specserve.actors.distill.records import batch_records
from specserve.actors.distill.trainer import distill_steps, supervised_logits

from ..engine.tiny import VOCAB
from .synthetic import teacher, teacher_records, tiny_llama

MAX_LEN = 32


@torch.no_grad()
def buffer_loss(model, records, kind) -> float:
    model.eval()
    batch = batch_records(records, VOCAB, MAX_LEN)
    return kd_loss(kind, batch.targets, supervised_logits(model, batch), batch.weights).item()


@pytest.fixture(scope="module")
def records():
    return teacher_records(teacher(seed=0), 64, seed=0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_kd_training_lowers_the_loss_on_the_buffer(kind, records):
    buf = ReplayBuffer(capacity=64, half_life_records=1e9, holdout_fraction=0.0)  # uniform replay
    for r in records:
        buf.add(r)
    student = tiny_llama(seed=1)
    before = buffer_loss(student, records, kind)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = distill_steps(student, optimizer, buf, steps=40, batch_size=16, kind=kind, vocab=VOCAB,
                           max_len=MAX_LEN, generator=torch.Generator().manual_seed(0))
    after = buffer_loss(student, records, kind)
    assert len(losses) == 40 and all(map(lambda x: x == x, losses))  # no NaN
    assert after < 0.7 * before, (kind, before, after)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_supervised_logits_equal_the_full_forward_at_the_supervised_positions(family, records):
    from ..engine.tiny import build_model, family_config

    model = build_model(family_config(family), seed=2)
    batch = batch_records(records[:8], VOCAB, MAX_LEN)
    full = model(input_ids=batch.input_ids).logits[batch.rows, batch.cols]
    assert len(batch.rows) > len(records[:8])  # several positions per row, not all of them
    torch.testing.assert_close(supervised_logits(model, batch), full, rtol=0, atol=1e-12)
