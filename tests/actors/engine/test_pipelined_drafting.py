"""Pipelined drafting: work done ahead while a draft is verified is exactly the work done later."""

from __future__ import annotations

import copy

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


# -- drafts for rejection outcomes (the speculation cache's other outcomes) ----------------------

def branching(model, outcomes: int = 3) -> ModelDrafter:
    """A drafter that drafts for rejection outcomes wherever they fit: every chance counts, the
    verdict is a second away and a forward costs a millisecond."""
    d = fresh(model)
    d.branch_min_prob, d.forward_s = 0.0, 0.001
    return d


def pushing(d: ModelDrafter, seq_id: int, outcomes: int = 3) -> None:
    st = d.seqs[seq_id]
    st.push, st.push_outcomes, st.verdict_s = True, outcomes, 1.0


def work_ahead(d: ModelDrafter) -> list:
    pushes = []
    while d.has_ahead_work():
        d.draft_ahead()
        pushes += d.take_pushes()
    return pushes


@pytest.mark.parametrize("params", [make_params(), make_params(temperature=1.0, top_k=20, seed=5)],
                         ids=["greedy", "sampled"])
def test_a_draft_pushed_for_a_rejection_equals_the_draft_made_after_that_verdict(model, params):
    ahead, plain = branching(model), fresh(model)
    for d in (ahead, plain):
        d.start(0, PROMPT, params)
    pushing(ahead, 0)
    first = ahead.propose([DraftRequest(0, 4)])[0]
    assert plain.propose([DraftRequest(0, 4)])[0].tokens == first.tokens
    pushes = work_ahead(ahead)
    base = len(PROMPT)
    # the whole draft accepted (then the guess), and two first rejections, each pushed complete
    keys = {(length, last) for _, length, last, _ in pushes}
    assert (base + 5, ahead.seqs[0].guess) in keys
    branches = ahead.seqs[0].branches
    assert len(branches) == 2 and all(b.done for b in branches)
    assert {(base + b.j + 1, b.token) for b in branches} <= keys
    assert all(b.token != first.tokens[b.j] for b in branches)
    b = branches[0]  # drafted first: the KV cache row holds the other one now
    for d in (ahead, plain):  # the verdict that branch was drafted for
        d.verdict(0, b.j, b.token)
    assert ahead.branch_hits == 1
    # the later push for a key replaces the earlier (half of k)
    pushed = [dr for _, length, last, dr in pushes if (length, last) == (base + b.j + 1, b.token)][-1]
    ahead.took(0, pushed.tokens, 4)  # the verifier takes it from its cache
    want = plain.propose([DraftRequest(0, 4)])[0]
    assert pushed.tokens == want.tokens
    if not params.greedy:
        assert pushed.q_ids.tolist() == want.q_ids.tolist()
        assert torch.allclose(pushed.q_probs, want.q_probs, atol=1e-6)
    for d in (ahead, plain):  # and drafting goes on from the same state, cache and all
        d.verdict(0, 1, 7 if want.tokens[1] != 7 else 8)
    assert ahead.propose([DraftRequest(0, 4)])[0].tokens == plain.propose([DraftRequest(0, 4)])[0].tokens


@pytest.mark.parametrize("verdict", ["all-accepted", "other-rejection", "later-branch"])
def test_after_drafting_rejection_outcomes_any_verdict_drafts_on_correctly(model, verdict):
    """Drafts for rejection outcomes overwrite the KV cache row past the rejection: whatever the
    verdict, the next draft is the one a drafter that never drafted ahead makes."""
    ahead, plain = branching(model), fresh(model)
    for d in (ahead, plain):
        d.start(0, PROMPT, make_params())
    pushing(ahead, 0)
    first = ahead.propose([DraftRequest(0, 4)])[0]
    plain.propose([DraftRequest(0, 4)])
    work_ahead(ahead)
    st = ahead.seqs[0]
    assert st.kv_branch is st.branches[-1]
    if verdict == "all-accepted":
        args = (len(first.tokens), st.guess)
    elif verdict == "later-branch":  # the branch drafted first: its tokens are no longer cached
        args = (st.branches[0].j, st.branches[0].token)
    else:  # a rejection at the last position with a token no branch expected
        taken = {b.token for b in st.branches if b.j == 3}
        args = (3, next(t for t in range(VOCAB) if t != first.tokens[3] and t not in taken))
    for d in (ahead, plain):
        d.verdict(0, *args)
    for _ in range(3):
        got, want = ahead.propose([DraftRequest(0, 4)])[0], plain.propose([DraftRequest(0, 4)])[0]
        assert got.tokens == want.tokens
        work_ahead(ahead)
        for d in (ahead, plain):
            d.verdict(0, 2, (want.tokens[2] + 1) % VOCAB)


def test_drafts_for_rejections_through_a_whole_generation_keep_output_equal_to_the_target(model):
    target = build_model(family_config("llama"), seed=0)
    want = hf_greedy(target, PROMPT, 24)
    # the target with its weights jittered: a drafter that agrees often, and where it does not,
    # often has the target's token second
    near = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in near.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * w.std().nan_to_num(0.0) * 0.1)
    drafter = branching(near)
    propose = drafter.propose

    def propose_then_work_ahead(reqs):  # as a draft server does while the verifier verifies
        drafts = propose(reqs)
        for r in reqs:
            pushing(drafter, r.seq_id)
        work_ahead(drafter)
        return drafts
    drafter.propose = propose_then_work_ahead
    engine = always_drafting_engine(runner(target), drafter, 4)
    seq = engine.add_request(PROMPT, make_params(max_tokens=24))
    out = []
    while engine.seqs:
        for o in engine.step():
            out.extend(o.new_tokens)
            if o.finish_reason:
                engine.release(seq)
    assert out == want
    assert drafter.branch_pushes > 0 and drafter.ahead_hits > 0 and drafter.branch_hits > 0


def test_rejection_outcomes_are_covered_only_where_they_fit_before_the_verdict(model):
    d = branching(model)
    d.start(0, PROMPT, make_params())
    pushing(d, 0)
    d.seqs[0].verdict_s = 0.003  # three forwards: not even half of k = 4 for one rejection
    d.propose([DraftRequest(0, 4)])
    work_ahead(d)
    assert d.seqs[0].branches == [] and d.branch_pushes == 0
    d.verdict(0, 0, 5)
    d.seqs[0].verdict_s = 1.0
    pushing(d, 0, outcomes=1)  # only the whole draft accepted
    d.propose([DraftRequest(0, 4)])
    work_ahead(d)
    assert not d.seqs[0].branches and d.branch_pushes == 0


def test_rejection_outcomes_the_drafter_finds_unlikely_are_not_drafted(model):
    d = branching(model)
    d.branch_min_prob = 1.0  # no outcome is that likely
    d.start(0, PROMPT, make_params())
    pushing(d, 0)
    d.propose([DraftRequest(0, 4)])
    work_ahead(d)
    assert d.seqs[0].branches == []
