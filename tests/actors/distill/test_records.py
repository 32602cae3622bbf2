"""Records -> training batches: targets land on the columns that predict them, weights follow the
accept length, truncation keeps the supervised columns."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.distill.records import TrafficRecord, batch_records, dense_targets, position_weights, sharpen

V = 10


def rec(context, draft, ids, probs, accepted) -> TrafficRecord:
    return TrafficRecord(tuple(context), tuple(draft), tuple(map(tuple, ids)), tuple(map(tuple, probs)), accepted,
                         "v0", 0.0)


# context 5 6 7 (7 pending), drafts 8 9, first draft accepted, the second rejected
A = rec([5, 6, 7], [8, 9], [[1, 2], [3, 4], [5, 6]], [[0.5, 0.25], [0.4, 0.0], [0.6, 0.2]], accepted=1)
# context 2 (pending), one draft 3, accepted: position 1 is the bonus position
B = rec([2], [3], [[4, 1], [0, 9]], [[0.9, 0.1], [0.7, 0.1]], accepted=1)


def test_dense_targets_renormalise_the_top_k_and_are_zero_elsewhere():
    dense = dense_targets(A, V)
    expected = torch.zeros(3, V)
    expected[0, 1], expected[0, 2] = 2 / 3, 1 / 3
    expected[1, 3] = 1.0
    expected[2, 5], expected[2, 6] = 0.75, 0.25
    torch.testing.assert_close(dense, expected)


def test_a_batch_supervises_the_pending_token_and_each_draft_column_with_its_position():
    batch = batch_records([A, B], V, max_len=16)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [2, 3, 0, 0, 0]]  # right-padded with 0
    assert batch.rows.tolist() == [0, 0, 0, 1, 1]
    # column 2 (the pending 7) predicts position 0, column 3 (d_1 = 8) position 1, column 4 position 2
    assert batch.cols.tolist() == [2, 3, 4, 0, 1]
    torch.testing.assert_close(batch.targets, torch.cat([dense_targets(A, V), dense_targets(B, V)]))
    # A: position 0 accepted, position 1 first rejected, position 2 past the rejection; B: accepted + bonus
    assert batch.weights.tolist() == [1.0, 3.0, 1.0, 1.0, 1.0]


def test_long_rows_lose_their_oldest_context_and_keep_every_supervised_column():
    batch = batch_records([A], V, max_len=3)
    assert batch.input_ids.tolist() == [[7, 8, 9]]
    assert batch.cols.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="max_len"):
        batch_records([A], V, max_len=2)


def test_position_weights_emphasise_only_the_first_rejected_position():
    assert position_weights(4, 0, rejected_weight=5.0, after_rejection_weight=0.5) == [5.0, 0.5, 0.5, 0.5, 0.5]
    assert position_weights(4, 2, rejected_weight=5.0) == [1.0, 1.0, 5.0, 1.0, 1.0]
    assert position_weights(4, 4, rejected_weight=5.0) == [1.0] * 5  # all accepted: nothing rejected


def test_malformed_records_are_refused_at_the_batch():
    short = rec([1], [2, 3], [[1], [2]], [[1.0], [1.0]], accepted=0)  # 2 drafts need 3 target rows
    outside = rec([1], [2], [[1], [V]], [[1.0], [1.0]], accepted=0)
    for bad in (short, outside):
        with pytest.raises(ValueError):
            batch_records([bad], V, max_len=8)


def test_sharpened_targets_keep_their_support_and_move_mass_to_the_argmax():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.9]])
    assert sharpen(p, 1.0) is p
    half = sharpen(p, 0.5)  # p^2 renormalised
    torch.testing.assert_close(half[0], torch.tensor([25.0, 9.0, 4.0, 0.0]) / 38.0)
    assert ((half > 0) == (p > 0)).all() and torch.allclose(half.sum(-1), torch.ones(2))
    cold = sharpen(p, 0.01)
    torch.testing.assert_close(cold, torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)
    assert batch_records([A], V, max_len=16, teacher_temperature=0.5).targets.max(-1).values.min() > \
        batch_records([A], V, max_len=16).targets.max(-1).values.min()
