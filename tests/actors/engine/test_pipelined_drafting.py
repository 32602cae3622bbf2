"""Pipelined drafting: work done ahead while a draft is verified is exactly the work done later."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.engine.drafters import DraftRequest, ModelDrafter
from specserve.actors.engine.request import make_params

from .tiny import VOCAB, always_drafting_engine, build_model, family_config, hf_greedy, runner

PROMPT = [3, 41, 9, 88, 12]


@pytest.fixture(scope="module")
def model():
    return build_model(family_config("llama", layers=1), seed=1)


def fresh(model) -> ModelDrafter:
    return ModelDrafter(runner(model), confidence_threshold=0.0)


@pytest.mark.parametrize("params", [make_params(), make_params(temperature=1.0, top_k=20, seed=5)],
                         ids=["greedy", "sampled"])
def test_a_confirmed_ahead_draft_equals_the_draft_made_after_the_verdict(model, params):
    ahead, plain = fresh(model), fresh(model)
    for d in (ahead, plain):
        d.start(0, PROMPT, params)
    first = ahead.propose([DraftRequest(0, 3)])[0]
    assert plain.propose([DraftRequest(0, 3)])[0].tokens == first.tokens
    while ahead.has_ahead_work():
        ahead.draft_ahead()
    guess = ahead.seqs[0].guess
    for d in (ahead, plain):  # the verifier accepts everything and emits the guessed token
        d.verdict(0, len(first.tokens), guess)
    got, want = ahead.propose([DraftRequest(0, 3)])[0], plain.propose([DraftRequest(0, 3)])[0]
    assert ahead.ahead_hits == 1
    assert got.tokens == want.tokens and len(got.tokens) == 3
    assert got.forwards == 0 < want.forwards  # no forward pass left to do after the verdict
    if not params.greedy:
        assert got.q_ids.tolist() == want.q_ids.tolist()
        assert torch.allclose(got.q_probs, want.q_probs, atol=1e-6)


def test_a_rejecting_verdict_discards_ahead_work_and_drafting_goes_on_correctly(model):
    ahead, plain = fresh(model), fresh(model)
    for d in (ahead, plain):
        d.start(0, PROMPT, make_params())
    first = ahead.propose([DraftRequest(0, 4)])[0]
    plain.propose([DraftRequest(0, 4)])
    while ahead.has_ahead_work():
        ahead.draft_ahead()
    wrong = (ahead.seqs[0].guess + 1) % 96
    for d in (ahead, plain):  # one draft accepted, then a token the drafter did not guess
        d.verdict(0, 1, wrong)
    assert ahead.ahead_misses == 1 and ahead.ahead_hits == 0
    assert ahead.propose([DraftRequest(0, 4)])[0].tokens == plain.propose([DraftRequest(0, 4)])[0].tokens
    assert ahead.seqs[0].context == plain.seqs[0].context == PROMPT + first.tokens[:1] + [wrong]


def test_ahead_drafting_taken_in_part_keeps_the_cache_consistent(model):
    """k shrinks after drafting ahead: the unused ahead tokens must not leak into later drafts."""
    target = build_model(family_config("llama"), seed=0)
    want = hf_greedy(target, PROMPT, 20)
    drafter = fresh(model)
    engine = always_drafting_engine(runner(target), drafter, 4)
    seq = engine.add_request(PROMPT, make_params(max_tokens=20))
    out, ks = [], iter([4, 1, 3, 2, 4, 1] * 10)
    while engine.seqs:
        while drafter.has_ahead_work():
            drafter.draft_ahead()
        engine.policy = type(engine.policy)(k_max=next(ks), alpha_ema=0.0)
        for o in engine.step():
            out.extend(o.new_tokens)
            if o.finish_reason:
                engine.release(seq)
    assert out == want


@pytest.mark.parametrize("prompt, follows", [(list(range(VOCAB)), True), (PROMPT, None)], ids=["every-token", "some"])
def test_no_drafting_ahead_past_a_point_where_the_verifiers_lookup_will_draft(model, prompt, follows):
    # ahead_lookup = 1: the verifier drafts by lookup wherever the last token occurred before
    d = ModelDrafter(runner(model), confidence_threshold=0.0, ahead_lookup=1)
    d.start(0, prompt, make_params())
    first = d.propose([DraftRequest(0, 3)])[0]
    d.draft_ahead()  # the guessed next token
    st = d.seqs[0]
    assert first.tokens and st.guess is not None
    assert st.ahead_done == (st.guess in prompt)  # the context's tokens; drafts are not looked at
    if follows is not None:
        assert st.ahead_done == follows  # every token occurred before: lookup always drafts
    assert d.has_ahead_work() == (not st.ahead_done)


def test_drafting_ahead_that_verdicts_rarely_confirm_is_only_explored_now_and_then(model):
    from specserve.actors.engine.drafters import AHEAD_EXPLORE_EVERY

    drafter = ModelDrafter(runner(model), confidence_threshold=0.0, ahead_min_hit_rate=0.5)
    drafter.start(0, PROMPT, make_params())
    worked_ahead = []
    for _ in range(4 * AHEAD_EXPLORE_EVERY):
        drafter.propose([DraftRequest(0, 2)])
        worked_ahead.append(drafter.has_ahead_work())
        while drafter.has_ahead_work():
            drafter.draft_ahead()
        st = drafter.seqs[0]
        wrong = None if st.guess is None else (st.guess + 1) % VOCAB
        drafter.verdict(0, 0, 7 if wrong is None else wrong)  # never the guessed token: every trial a miss
    assert drafter.ahead_hit_rate < 0.5
    first_off = worked_ahead.index(False)
    assert 0 < first_off < AHEAD_EXPLORE_EVERY  # a few misses turn it off ...
    later = worked_ahead[first_off:]
    assert 0 < sum(later) <= len(later) // AHEAD_EXPLORE_EVERY + 1  # ... but for one draft in 16


def test_drafting_ahead_that_verdicts_confirm_stays_on(model):
    drafter = ModelDrafter(runner(model), confidence_threshold=0.0, ahead_min_hit_rate=0.5)
    drafter.start(0, PROMPT, make_params())
    for _ in range(40):
        draft = drafter.propose([DraftRequest(0, 2)])[0]
        assert drafter.has_ahead_work()
        while drafter.has_ahead_work():
            drafter.draft_ahead()
        drafter.verdict(0, len(draft.tokens), drafter.seqs[0].guess)  # the whole draft, then the guess
    assert drafter.ahead_hits >= 39 and drafter.ahead_hit_rate > 0.9
