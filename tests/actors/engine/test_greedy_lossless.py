"""Greedy speculative decoding is token-identical to transformers' own greedy generate.

For every family: a tiny random target and a different tiny random drafter of the same vocabulary,
every draft length 1..8, the n-gram drafter, the model drafter with prompt lookup, the target
drafting for itself (every draft must be accepted), and continuous batching of more prompts of
mixed lengths than there are cache slots.
"""

from __future__ import annotations

import pytest

from specserve.actors.engine.drafters import ModelDrafter, NgramDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.request import make_params

from .tiny import (FAMILIES, always_drafting_engine, build_model, family_config, hf_greedy,
                   record_draft_lengths, runner)

NEW_TOKENS = 16
PROMPTS = [[7], [3, 41, 9, 88], [5, 6, 7, 5, 6, 7, 5, 6, 7], list(range(20, 34))]  # lengths 1, 4, 9, 14


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(target, drafter, greedy continuation of each prompt by transformers' generate)."""
    target = build_model(family_config(request.param), seed=0)
    drafter = build_model(family_config(request.param, layers=1), seed=1)
    return target, drafter, [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]


def tokens(results) -> list[list[int]]:
    return [r.token_ids for r in results]


@pytest.mark.parametrize("k_max", range(1, 9))
def test_greedy_output_equals_transformers_generate_for_every_draft_length(family, k_max):
    target, drafter_model, want = family
    drafter = ModelDrafter(runner(drafter_model), confidence_threshold=0.0)
    lengths = record_draft_lengths(drafter)
    engine = always_drafting_engine(runner(target), drafter, k_max)
    assert tokens(engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))) == want
    assert max(lengths) == k_max  # the drafts really were k_max long


def test_the_target_drafting_for_itself_has_every_draft_accepted(family):
    target, _, want = family
    engine = always_drafting_engine(runner(target), ModelDrafter(runner(target), confidence_threshold=0.0), 4)
    results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
    assert tokens(results) == want
    for r in results:
        # blocks of 4 accepted drafts + 1 bonus token: 5 + 5 + 5, then 1 token (no room to draft)
        assert (r.stats.drafted, r.stats.accepted, r.stats.steps) == (12, 12, 4)


def test_greedy_output_with_the_ngram_drafter_equals_transformers_generate(family):
    target, _, want = family
    drafter = NgramDrafter()
    lengths = record_draft_lengths(drafter)
    engine = always_drafting_engine(runner(target), drafter, 4)
    assert tokens(engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))) == want
    assert max(lengths) > 0  # the repetitive prompt gives the n-gram lookup something to draft


def test_greedy_output_with_prompt_lookup_in_the_model_drafter_equals_transformers_generate(family):
    target, drafter_model, want = family
    drafter = ModelDrafter(runner(drafter_model), confidence_threshold=0.0, lookup_min_n=1)
    forwards = []  # drafter model forwards behind each draft
    propose = drafter.propose

    def counting_propose(reqs):
        drafts = propose(reqs)
        forwards.extend(d.forwards for d in drafts)
        return drafts

    drafter.propose = counting_propose
    engine = always_drafting_engine(runner(target), drafter, 4)
    assert tokens(engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))) == want
    assert drafter.lookup_drafts > 0 and any(forwards)  # both lookup and the model drafted


def test_continuous_batching_of_more_prompts_than_slots_equals_transformers_generate(family):
    # the real engine (measured costs, adaptive k), 2 slots for 4 prompts finishing at different times
    target, drafter_model, want = family
    max_tokens = [NEW_TOKENS, 5, 11, 8]
    drafter = ModelDrafter(runner(drafter_model, max_num_seqs=2), confidence_threshold=0.0)
    engine = SpeculativeEngine(runner(target, max_num_seqs=2), None, drafter)
    results = engine.generate(PROMPTS, [make_params(max_tokens=m) for m in max_tokens])
    assert tokens(results) == [w[:m] for w, m in zip(want, max_tokens)]
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert sum(r.stats.drafted for r in results) > 0
    assert engine.target.cache.num_free == 2 and drafter.runner.cache.num_free == 2  # all slots back


def test_a_long_prompt_admitted_late_beside_a_long_running_sequence_decodes_correctly():
    target = build_model(family_config("llama"), seed=0)
    drafter_model = build_model(family_config("llama", layers=1), seed=1)
    prompts = [[1, 2, 3, 4, 5], list(range(10)), [i % 90 for i in range(100)]]
    max_tokens = [95, 100, 5]  # each within max_seq_len - k_max - 1 = 119
    drafter = ModelDrafter(runner(drafter_model, max_num_seqs=2, max_seq_len=128), confidence_threshold=0.0)
    engine = always_drafting_engine(runner(target, max_num_seqs=2, max_seq_len=128), drafter, 8)
    results = engine.generate(prompts, [make_params(max_tokens=m) for m in max_tokens])
    assert tokens(results) == [hf_greedy(target, p, m) for p, m in zip(prompts, max_tokens)]
