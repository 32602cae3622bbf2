"""The draft-length policy: E(k), the measured cost model, and the k that maximises E(k) / T(k)."""

from __future__ import annotations

import pytest

from specserve.actors.engine.draft_length import (
    AcceptanceTracker, CostModel, DraftLengthConfig, best_draft_length, expected_tokens,
)

CFG = DraftLengthConfig()


def measured(draft_s: float, verify_s: dict[int, float], rtt_s: float = 0.0) -> CostModel:
    """A cost model that has seen one draft forward of `draft_s` and these verify times."""
    cost = CostModel(CFG, rtt_s)
    cost.observe_draft(1, draft_s)
    for n, seconds in verify_s.items():
        cost.observe_verify(n, seconds)
    return cost


# ---- E(k) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, k, tokens", [
    (0.0, 0, 1.0), (0.0, 5, 1.0),  # nothing accepted: only the recovered token
    (0.5, 1, 1.5), (0.5, 2, 1.75), (0.5, 3, 1.875),
    (0.8, 0, 1.0),  # no drafts: plain decoding emits one token
    (1.0, 4, 5.0),  # everything accepted: k drafts + the bonus token
])
def test_expected_tokens_is_the_sum_of_alpha_powers_up_to_k(alpha, k, tokens):
    assert expected_tokens(alpha, k) == pytest.approx(tokens)


def test_expected_tokens_is_continuous_as_alpha_reaches_one():
    assert expected_tokens(1 - 1e-9, 6) == pytest.approx(7.0, rel=1e-6)


def test_expected_tokens_with_a_first_and_a_later_rate():
    # 1 + a1 + a1 a2 + a1 a2^2: the first draft at a1, each later one at a2 after an accepted one
    assert expected_tokens((0.5, 0.8), 3) == pytest.approx(1 + 0.5 + 0.5 * 0.8 + 0.5 * 0.64)
    assert expected_tokens((0.5, 1.0), 4) == pytest.approx(3.0)
    assert expected_tokens((0.3, 0.9), 0) == 1.0
    assert expected_tokens((0.6, 0.6), 5) == pytest.approx(expected_tokens(0.6, 5))


# ---- the cost model -------------------------------------------------------------------------------


def test_draft_time_is_per_token_the_mean_of_the_first_samples_then_an_ema():
    cost = CostModel(CFG)
    cost.observe_draft(4, 2.0)
    assert cost.draft_step_s == pytest.approx(0.5)
    cost.observe_draft(1, 1.5)
    assert cost.draft_step_s == pytest.approx(1.0)  # the mean of two samples
    cost.observe_draft(0, 99.0)  # a call that asked for no draft says nothing about a draft's cost
    assert cost.draft_step_s == pytest.approx(1.0)
    n = round(1 / CFG.time_ema)
    for _ in range(n - 2):  # n samples of 1.0 in all: the mean stays 1.0
        cost.observe_draft(1, 1.0)
    cost.observe_draft(1, 2.0)  # past 1 / time_ema samples: the moving average's weight
    assert cost.draft_step_s == pytest.approx(1.0 + CFG.time_ema * (2.0 - 1.0))


def test_an_unlucky_first_verify_time_is_averaged_away_within_a_few_steps():
    cost = CostModel(CFG)
    cost.observe_verify(3, 0.030)  # a block size's first forward: one-off setup
    for _ in range(3):
        cost.observe_verify(3, 0.010)
    assert cost.verify_time(3) == pytest.approx(0.015)  # (30 + 3 x 10) / 4 ms


def test_verify_time_is_interpolated_between_measured_sizes_and_flat_outside():
    cost = measured(0.0, {2: 1.0, 6: 3.0})
    assert cost.verify_time(2) == pytest.approx(1.0)
    assert cost.verify_time(4) == pytest.approx(2.0)
    assert cost.verify_time(8) == pytest.approx(3.0)  # beyond the largest: flat (optimistic)
    assert measured(0.0, {5: 2.0}).verify_time(9) == pytest.approx(2.0)  # one size: flat
    assert CostModel(CFG).verify_time(3) == 1.0  # nothing measured yet


def test_a_block_never_costs_less_than_a_smaller_one_measured_dearer():
    # one unlucky step of 4 positions must not keep blocks of 3 and 4 off while 6 is cheap
    cost = measured(0.0, {1: 1.0, 2: 1.3, 4: 2.5, 6: 1.4})
    assert cost.verify_time(4) == pytest.approx(1.4) and cost.verify_time(3) == pytest.approx(1.35)
    assert cost.verify_time(2) == pytest.approx(1.3) and cost.verify_time(1) == pytest.approx(1.0)
    assert best_draft_length((0.6, 0.8), cost, 5) == 5


def test_step_time_adds_the_round_trip_only_when_drafting():
    cost = measured(0.1, {1: 1.0, 5: 1.0}, rtt_s=0.25)
    assert cost.step_time(0) == pytest.approx(1.0)
    assert cost.step_time(4) == pytest.approx(4 * 0.1 + 1.0 + 0.25)


def test_verify_time_of_a_block_smaller_than_any_measured_is_positive():
    # an engine that always drafted has never measured n = 1, which T(0) needs
    cost = measured(0.01, {3: 1.0, 5: 2.0})
    assert cost.verify_time(1) > 0
    best_draft_length(0.5, cost, 8)


# ---- the policy -----------------------------------------------------------------------------------


def test_expensive_drafts_and_low_acceptance_turn_drafting_off():
    cost = measured(1.0, {1: 1.0, 9: 1.2})
    assert best_draft_length(0.1, cost, 8) == 0


def test_cheap_drafts_and_high_acceptance_draft_the_longest_block():
    cost = measured(0.001, {1: 1.0, 9: 1.0})
    assert best_draft_length(0.9, cost, 8) == 8
    assert best_draft_length(0.9, cost, 3) == 3  # never past k_max


def test_the_best_draft_length_grows_with_alpha():
    cost = measured(0.2, {1: 1.0, 9: 1.4})
    ks = [best_draft_length(a / 100, cost, 8) for a in range(0, 100, 3)]
    assert ks == sorted(ks)
    assert ks[0] == 0 and ks[-1] >= 5


def test_a_sequence_whose_drafts_fail_stops_drafting_and_is_retried_later():
    cost = measured(0.2, {1: 1.0, 9: 1.4})
    tracker = AcceptanceTracker(CFG)
    assert tracker.alpha == CFG.alpha_prior and best_draft_length(tracker.alpha, cost, 8) > 0
    for _ in range(10):
        tracker.observe(4, 0)
    assert best_draft_length(tracker.alpha, cost, 8) == 0
    idle = 0
    while best_draft_length(tracker.alpha, cost, 8) == 0:
        tracker.observe(0, 0, speculation_off=True)  # while off, alpha drifts back toward the prior
        idle += 1
        assert idle < 200
    assert tracker.alpha < CFG.alpha_prior


def test_acceptance_tracker_counts_accept_trials_up_to_the_first_rejection():
    tracker = AcceptanceTracker(CFG, prior_weight=2.0)
    tracker.observe(4, 4)  # four successes
    assert tracker.alpha == pytest.approx((4 + 2 * CFG.alpha_prior) / (4 + 2))
    tracker.observe(5, 1)  # one success, then one failure; the three drafts after it untested
    keep = 1 - CFG.alpha_ema
    assert tracker.alpha == pytest.approx((keep * 4 + 1 + 2 * CFG.alpha_prior) / (keep * 4 + 2 + 2))
    successes, trials = keep * 4 + 1, keep * 4 + 2
    tracker.observe(0, 0)  # asked, but the drafter offered nothing: drafting paid for, nothing gained
    assert tracker.alpha == pytest.approx((keep * successes + 2 * CFG.alpha_prior) / (keep * trials + 1 + 2))
    before = tracker.alpha
    tracker.observe(0, 0, speculation_off=True)  # not asked: drifts back toward the prior
    assert CFG.alpha_prior > tracker.alpha > before


def test_verify_times_are_kept_per_batch_size_so_a_full_batch_turns_speculation_down():
    cost = CostModel(CFG)
    cost.observe_draft(1, 0.001)
    cost.use_batch(1)  # one sequence: a 5-token block costs about what 1 token costs
    for n, seconds in {1: 1.0, 5: 1.1}.items():
        cost.observe_verify(n, seconds)
    cost.use_batch(32)  # a full batch: compute-bound, 5 tokens cost 5x
    for n, seconds in {1: 1.0, 5: 5.0}.items():
        cost.observe_verify(n, seconds)
    assert best_draft_length(0.6, cost, 4) == 0
    cost.use_batch(1)
    assert best_draft_length(0.6, cost, 4) == 4
    cost.use_batch(20)  # same bucket as 32
    assert cost.verify_time(5) == pytest.approx(5.0)


def test_a_new_batch_bucket_does_not_draft_until_it_has_timed_a_step_without_drafts():
    cost = measured(0.001, {1: 1.0, 5: 1.1})  # bucket 1: drafting pays
    assert best_draft_length(0.9, cost, 4) == 4
    cost.use_batch(16)
    assert best_draft_length(0.9, cost, 4) == 0  # nothing timed at this batch yet
    cost.observe_verify(1, 3.0)
    assert best_draft_length(0.9, cost, 4) > 0


def test_an_unmeasured_block_size_costs_the_relative_price_it_has_in_the_nearest_smaller_batch():
    cost = CostModel(CFG)
    cost.use_batch(4)
    for n, seconds in {1: 1.0, 5: 2.0}.items():
        cost.observe_verify(n, seconds)
    cost.use_batch(32)
    cost.observe_verify(1, 3.0)
    assert cost.verify_time(5) == pytest.approx(6.0)  # twice the one-token step, as at batch 4
    assert cost.verify_time(3) == pytest.approx(3.0 * 1.5)  # batch 4 interpolates 1.5x
    cost.observe_verify(5, 9.0)  # measured here: the measurement wins
    assert cost.verify_time(5) == pytest.approx(9.0)
    cost.use_batch(1)  # nothing smaller to go by: flat, the optimistic guess
    cost.observe_verify(1, 0.5)
    assert cost.verify_time(5) == pytest.approx(0.5)


def test_draft_and_round_trip_times_are_kept_per_batch_and_borrowed_from_a_smaller_batch():
    cost = CostModel(CFG, rtt_s=0.002)
    assert cost.rtt_s == pytest.approx(0.002)  # the configured guess until measured
    cost.observe_draft(1, 0.001)
    cost.observe_rtt(0.003)
    cost.use_batch(32)
    assert cost.draft_step_s == pytest.approx(0.001) and cost.rtt_s == pytest.approx(0.003)  # borrowed
    cost.observe_draft(1, 0.010)
    cost.observe_rtt(0.0)
    assert cost.draft_step_s == pytest.approx(0.010) and cost.rtt_s == 0.0
    cost.use_batch(1)
    assert cost.draft_step_s == pytest.approx(0.001) and cost.rtt_s == pytest.approx(0.003)


def test_one_slow_round_trip_does_not_price_drafting_out_but_a_lasting_change_does():
    from specserve.actors.engine.draft_length import RTT_WINDOW

    cost = measured(0.001, {1: 0.010, 3: 0.012})
    cost.observe_rtt(0.030)  # the bucket's first sample is from the far end of the tail
    assert cost.rtt_s == pytest.approx(0.030) and best_draft_length(0.8, cost, 2) == 0
    cost.observe_rtt(0.002)
    cost.observe_rtt(0.002)
    assert cost.rtt_s == pytest.approx(0.002) and best_draft_length(0.8, cost, 2) == 2
    for _ in range(RTT_WINDOW - 3):
        cost.observe_rtt(0.002)
    for _ in range(RTT_WINDOW // 2):
        cost.observe_rtt(0.030)
    assert cost.rtt_s == pytest.approx(0.002)  # slow in less than half of the window
    cost.observe_rtt(0.030)
    assert cost.rtt_s == pytest.approx(0.030)  # the round trip really got slower


def test_blocks_grow_one_size_at_a_time_past_the_longest_timed_block():
    cost = measured(0.0001, {1: 1.0})  # drafting looks free: the policy would take k_max at once
    assert best_draft_length(0.9, cost, 8) == 1
    cost.observe_verify(2, 1.0)
    assert best_draft_length(0.9, cost, 8) == 2
    cost.observe_verify(3, 1.0)
    assert best_draft_length(0.9, cost, 8) == 3
    cost.observe_verify(3, 1e6)  # and a size that turned out dear is not gone past
    assert best_draft_length(0.9, cost, 8) < 3


def test_the_tracker_tells_a_blocks_first_draft_from_the_later_ones():
    tracker = AcceptanceTracker(CFG, prior_weight=1e-9, ema=0.0)
    for _ in range(50):  # all-or-nothing blocks of 4: half rejected at once, half kept whole
        tracker.observe(4, 0)
        tracker.observe(4, 4)
    first, later = tracker.rates
    assert first == pytest.approx(0.5) and later == pytest.approx(1.0)
    assert tracker.alpha == pytest.approx(200 / 250)  # one rate would say 0.8 for every draft
    tracker.observe(0, 0)  # asked, nothing drafted: a failed first draft
    assert tracker.rates[0] < first and tracker.rates[1] == pytest.approx(1.0)


def test_drafting_climbs_to_long_blocks_that_pay_when_one_draft_alone_does_not():
    # 2 to 9 positions cost about what 2 cost (a verifier bound by weight reads), drafts are cheap,
    # and a drafter's first draft is right half the time, its later ones 85%
    cost = measured(0.2, {1: 1.0, 2: 1.35})
    rates = (0.5, 0.85)
    assert expected_tokens(rates, 1) / cost.step_time(1) < 1.0  # one draft: worse than none
    assert best_draft_length(rates, cost, 8) == 2  # one size past the longest timed, toward the best
    for n in range(3, 10):
        cost.observe_verify(n, 1.35 + 0.01 * n)
    assert best_draft_length(rates, cost, 8) >= 4
    assert best_draft_length(0.5, cost, 8) <= 1  # with one rate for every draft it would not draft


def test_a_tracker_starts_from_the_pooled_acceptance_of_other_sequences():
    pooled = AcceptanceTracker(CFG, ema=0.02)
    fresh = AcceptanceTracker(CFG, prior=pooled)
    assert fresh.alpha == pytest.approx(CFG.alpha_prior)  # nothing pooled yet: the configured prior
    for _ in range(40):
        pooled.observe(4, 1)  # other sequences: 1 of 2 tested tokens accepted per block
    assert pooled.alpha == pytest.approx(0.5, abs=0.05)
    assert fresh.alpha == pytest.approx(pooled.alpha)
    fresh.observe(3, 3)  # its own blocks still count, on top of that prior
    assert fresh.alpha > pooled.alpha


def test_a_batch_shares_one_draft_length_chosen_for_its_total_expected_tokens():
    cost = measured(0.1, {1: 1.0, 2: 1.3, 3: 1.6, 4: 1.9, 5: 2.2})
    alone_good = best_draft_length(0.9, cost, 4)
    alone_bad = best_draft_length(0.1, cost, 4)
    assert alone_good > 0 and alone_bad == 0
    # three sequences the drafter cannot predict outweigh one it predicts well
    assert best_draft_length([0.9, 0.1, 0.1, 0.1], cost, 4) == 0
    assert best_draft_length([0.9, 0.9, 0.9, 0.1], cost, 4) > 0


# ---- probing while speculation is off ------------------------------------------------------------


class SwitchableCost(CostModel):
    """Measured like the real model, except that drafting pays only while `pays` is set."""

    pays = False

    def step_time(self, k: int, local: bool = False) -> float:
        return 1.0 if self.pays or k == 0 else 100.0


def probing_engine(drafter, steps: int) -> tuple:
    """An engine over one long request whose drafting never pays (only probes draft), run for
    `steps` steps; returns it and the steps (counted from 0) in which the drafter was asked."""
    from specserve.actors.engine.engine import SpeculativeEngine
    from specserve.actors.engine.request import make_params

    from .tiny import build_model, family_config, runner

    policy = DraftLengthConfig(k_max=2, probe_every=4, probe_max=16)
    engine = SpeculativeEngine(runner(build_model(family_config("llama"), seed=0), max_seq_len=256), None,
                               drafter, policy=policy)
    engine.cost = SwitchableCost(policy)
    drafting_steps: list[int] = []
    propose = engine.drafter.propose

    def recording(reqs):
        drafting_steps.append(engine.timing.verify_steps)
        return propose(reqs)

    engine.drafter.propose = recording
    engine.add_request([5, 6, 7], make_params(max_tokens=200, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    return engine, drafting_steps


def test_probes_back_off_while_drafting_does_not_pay_and_come_back_once_it_does():
    from specserve.actors.engine.drafters import NgramDrafter

    engine, drafting_steps = probing_engine(NgramDrafter(), 80)
    # every 4th, then 8th, then 16th step is a probe (steps counted from 0, one verify each)
    assert drafting_steps == [3, 11, 27, 43, 59, 75]
    engine.cost.pays = True
    engine.step()  # the cost model turns drafting on: the interval is back to probe_every
    engine.cost.pays = False
    start = engine.timing.verify_steps
    for _ in range(10):
        engine.step()
    assert drafting_steps[-2:] == [80, start + 3]


def test_a_probe_that_got_no_drafts_at_all_is_retried_on_the_next_step():
    from specserve.actors.engine.drafters import NgramDrafter

    class Starting(NgramDrafter):
        """Like a remote drafter: a sequence's first request only starts it (nothing drafted)."""

        def __init__(self):
            super().__init__()
            self.started: set[int] = set()

        def propose(self, reqs):
            drafts = super().propose(reqs)
            for r, d in zip(reqs, drafts):
                if r.seq_id not in self.started:
                    self.started.add(r.seq_id)
                    d.tokens, d.requested = [], 0
            return drafts

    engine, drafting_steps = probing_engine(Starting(), 30)
    # the probe at step 3 only started the sequence: probed again at step 4, then 8 steps later
    assert drafting_steps == [3, 4, 12, 28]
    assert engine.timing.probes == 3


def test_a_draft_that_first_feeds_the_steps_the_drafter_sat_out_is_no_cost_sample():
    from specserve.actors.engine.drafters import DraftRequest, ModelDrafter
    from specserve.actors.engine.engine import SpeculativeEngine
    from specserve.actors.engine.request import make_params

    from .tiny import build_model, family_config, runner

    drafter = ModelDrafter(runner(build_model(family_config("llama", layers=1), seed=1)), confidence_threshold=0.0)
    drafter.start(0, [5, 6, 7], make_params(max_tokens=50))
    assert not drafter.propose([DraftRequest(0, 2)])[0].catch_up  # the prompt's last token: a normal feed
    drafter.verdict(0, 0, 9)
    assert not drafter.propose([DraftRequest(0, 2)])[0].catch_up
    for token in (10, 11, 12):  # steps with speculation off: verdicts, no drafts
        drafter.propose([DraftRequest(0, 0)])
        drafter.verdict(0, 0, token)
    assert drafter.propose([DraftRequest(0, 2)])[0].catch_up

    # the engine takes no draft-time sample from such a call
    policy = DraftLengthConfig(k_max=2, probe_every=4, probe_max=4)
    engine = SpeculativeEngine(runner(build_model(family_config("llama"), seed=0), max_seq_len=256), None,
                               ModelDrafter(runner(build_model(family_config("llama", layers=1), seed=1)),
                                            confidence_threshold=0.0), policy=policy)
    engine.cost = SwitchableCost(policy)  # drafting never pays: only probes draft, after 4 steps off
    samples: list[float] = []
    engine.cost.observe_draft = lambda forwards, seconds: samples.append(seconds)
    engine.add_request([5, 6, 7], make_params(max_tokens=40, ignore_eos=True))
    for _ in range(20):
        engine.step()
    assert engine.timing.probes >= 3 and samples == []


def test_probe_intervals_must_be_ordered():
    with pytest.raises(ValueError, match="probe_every"):
        DraftLengthConfig(probe_every=64, probe_max=32)


@pytest.mark.parametrize("alpha, drafts", [(0.03, False), (0.2, True)])
def test_drafting_must_promise_more_than_the_noise_of_the_timings(alpha, drafts):
    # one draft: a block of 2 positions at 1.0 s against a plain step at 1.0 s and no draft cost,
    # so the step yields 1 + alpha tokens for the same time; min_gain = 5% stands between them
    cost = measured(0.0, {1: 1.0, 2: 1.0})
    assert (best_draft_length(alpha, cost, 1) == 1) == drafts
