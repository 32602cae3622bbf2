"""The traffic tap: records hold the target's probabilities and the accept lengths; the tap is
off by default, samples, stays bounded and forgets old records."""

from __future__ import annotations

import time

import torch

from specserve.actors.distill.records import TrafficRecord
from specserve.actors.engine.drafters import ModelDrafter
from specserve.actors.engine.request import make_params
from specserve.actors.engine.tap import TapConfig, TrafficTap

from .tiny import always_drafting_engine, build_model, clone, family_config, reference_logits, runner

PROMPT = [3, 41, 9, 88, 5]


def tapped_engine(tap: TrafficTap | None, target, drafter_model):
    engine = always_drafting_engine(runner(target), ModelDrafter(runner(drafter_model), confidence_threshold=0.0), 3)
    engine.tap = tap
    return engine


def models():
    """A target with peaked distributions (a random tiny model is nearly uniform, so any noise
    would flip its argmax) and a drafter that often agrees with it: the target with noise on its
    output projection."""
    target = build_model(family_config("llama"), seed=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(30.0)
    drafter = clone(target)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head = drafter.lm_head.weight
        head.add_(NOISE * head.std() * torch.randn(head.shape, generator=gen, dtype=head.dtype))
    return target, drafter


NOISE = 0.3  # relative to the projection's spread: some drafts accepted, some rejected


def test_records_hold_the_targets_top_k_probabilities_and_the_accept_lengths():
    target, drafter = models()
    tap = TrafficTap(TapConfig(enabled=True, top_k=8))
    [result] = tapped_engine(tap, target, drafter).generate([PROMPT], make_params(max_tokens=16))
    records = tap.drain()
    assert result.stats.steps - 1 <= len(records) <= result.stats.steps  # every step that drafted
    assert sum(r.accepted for r in records) == result.stats.accepted
    assert any(0 < r.accepted < len(r.draft) for r in records)  # a mix of accepts and rejects
    for r in records:
        assert list(r.context[: len(PROMPT)]) == PROMPT
        # the target over context + draft: position len(context) - 1 verifies d_1, and so on
        p = torch.softmax(reference_logits(target, list(r.context) + list(r.draft))[len(r.context) - 1:], -1)
        top = torch.topk(p.float(), 8)
        assert [list(row) for row in r.target_ids] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(r.target_probs), top.values, atol=1e-5, rtol=0)
        agree = 0
        while agree < len(r.draft) and r.draft[agree] == int(p[agree].argmax()):
            agree += 1
        assert r.accepted == agree


def test_the_tap_is_off_by_default_and_changes_no_output():
    target, drafter = models()
    tap = TrafficTap()
    with_tap = tapped_engine(tap, target, drafter).generate([PROMPT], make_params(max_tokens=12))
    without = tapped_engine(None, target, drafter).generate([PROMPT], make_params(max_tokens=12))
    assert with_tap[0].token_ids == without[0].token_ids
    assert len(tap) == 0 and tap.stats.offered == 0


def record(i: int, age_s: float = 0.0) -> TrafficRecord:
    return TrafficRecord((1, 2, i), (4,), ((4, 5), (6, 7)), ((0.6, 0.4), (0.9, 0.1)), 1, "v0", time.time() - age_s)


def test_the_tap_samples_a_fraction_of_the_blocks():
    tap = TrafficTap(TapConfig(enabled=True, sample_rate=0.25), seed=0)
    wanted = sum(tap.wants() for _ in range(4000))
    assert 800 < wanted < 1200 and tap.stats.sampled_out == 4000 - wanted


def test_a_full_tap_drops_the_oldest_records_and_counts_them():
    tap = TrafficTap(TapConfig(enabled=True, capacity=10))
    for i in range(25):
        tap.put(record(i))
    assert len(tap) == 10 and tap.stats.dropped == 15
    assert [r.context[-1] for r in tap.drain()] == list(range(15, 25))


def test_records_older_than_the_retention_are_never_handed_out():
    tap = TrafficTap(TapConfig(enabled=True, max_age_s=60))
    tap.put(record(0, age_s=120))
    tap.put(record(1))
    assert [r.context[-1] for r in tap.drain()] == [1] and tap.stats.expired == 1
