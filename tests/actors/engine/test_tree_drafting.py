"""Token-tree speculation: greedy output stays the target's own, trees are shaped per step within
their budget, and the caches after a tree step equal a fresh prefill of the accepted sequence."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.engine.request import make_params
from specserve.actors.engine.tree_drafting import TreeDrafter

from .tiny import build_model, family_config, hf_greedy, record_drafts, runner, tree_engine

NEW_TOKENS = 16
PROMPTS = [[7], [3, 41, 9, 88], [5, 6, 7, 5, 6, 7, 5, 6, 7], list(range(20, 34))]


@pytest.fixture(scope="module", params=["llama", "mistral", "gpt2"])
def family(request):
    target = build_model(family_config(request.param), seed=0)
    drafter = build_model(family_config(request.param, layers=1), seed=1)
    return target, drafter, [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("lean", [False, True], ids=["transformers", "lean"])
@pytest.mark.parametrize("depth,nodes", [(1, 3), (3, 6), (4, 12)])
def test_greedy_tree_output_equals_transformers_generate(family, depth, nodes, lean):
    target, drafter_model, want = family
    drafter = TreeDrafter(runner(drafter_model, lean=lean), branching=3)
    drafts = record_drafts(drafter)
    engine = tree_engine(target, drafter, depth, nodes, lean)
    assert [r.token_ids for r in engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))] == want
    assert max(len(d.tokens) for d in drafts) == nodes  # the budget was really used
    assert any(d.parents.count(-1) > 1 for d in drafts)  # and branched at the root


def first_branch(draft) -> int:
    """Length of the chain of first children from the root: the drafter's own argmax path."""
    depth, node = 0, -1
    while (node := next((i for i, par in enumerate(draft.parents) if par == node), None)) is not None:
        depth += 1
    return depth


def test_the_target_drafting_trees_for_itself_accepts_its_whole_argmax_branch(family):
    target, _, want = family
    drafter = TreeDrafter(runner(target), branching=2)
    drafts = record_drafts(drafter)
    engine = tree_engine(target, drafter, depth=4, nodes=8)
    [result] = engine.generate(PROMPTS[1:2], make_params(max_tokens=NEW_TOKENS))
    assert result.token_ids == want[1]
    assert result.stats.accepted == sum(first_branch(d) for d in drafts)
    assert max(first_branch(d) for d in drafts) >= 2


def test_trees_respect_budget_depth_branching_and_sibling_order():
    target = build_model(family_config("llama"), seed=0)
    # lookup=0: no prompt-lookup child beside the model's `branching` (see the lookup test below)
    drafter = TreeDrafter(runner(build_model(family_config("llama", layers=1), seed=1)), branching=2, lookup=0)
    drafts = record_drafts(drafter)
    engine = tree_engine(target, drafter, depth=3, nodes=7)
    engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
    shapes = set()
    for d in drafts:
        parents = d.parents
        assert len(d.tokens) <= 7
        depth = []
        for i, par in enumerate(parents):
            assert -1 <= par < i  # parents come first
            depth.append(1 if par < 0 else depth[par] + 1)
            siblings = [d.tokens[j] for j, q in enumerate(parents) if q == par]
            assert len(siblings) <= 2 and len(set(siblings)) == len(siblings)
        assert max(depth, default=0) <= 3
        shapes.add(tuple(parents))
    assert len(shapes) > 1  # shaped per step, not one fixed tree


def test_drafter_cache_after_tree_verdicts_equals_a_fresh_prefill():
    """The accepted path is compacted into place in the drafter's cache (and the rest dropped)."""
    target = build_model(family_config("llama"), seed=0)
    drafter = TreeDrafter(runner(target), branching=3)  # the target as drafter: long accepted paths
    engine = tree_engine(target, drafter, depth=3, nodes=9)
    seq = engine.add_request([3, 41, 9, 88], make_params(max_tokens=40))
    for _ in range(3):
        base = len(drafter.seqs[seq].context)
        engine.step()
        st = drafter.seqs[seq]
        # the accepted path's nodes the drafter had fed (all but, at most, the last one) stay in
        # the cache: only what follows them is fed again
        accepted = len(st.context) - base - 1
        assert accepted >= 1 and base + accepted - 1 <= st.fed <= base + accepted
        fresh = runner(target)
        slot = fresh.add_sequence()
        fresh.forward([slot], torch.tensor([st.context[: st.fed]]))
        for layer in range(len(fresh.cache.keys)):
            got = drafter.runner.cache.keys[layer][st.slot, : st.fed]
            torch.testing.assert_close(got, fresh.cache.keys[layer][slot, : st.fed], rtol=0, atol=1e-12)
            got = drafter.runner.cache.values[layer][st.slot, : st.fed]
            torch.testing.assert_close(got, fresh.cache.values[layer][slot, : st.fed], rtol=0, atol=1e-12)


def test_target_cache_after_tree_steps_equals_a_fresh_prefill():
    target = build_model(family_config("llama"), seed=0)
    drafter = TreeDrafter(runner(build_model(family_config("llama", layers=1), seed=1)), branching=3)
    engine = tree_engine(target, drafter, depth=3, nodes=9)
    prompt = [3, 41, 9, 88]
    seq_id = engine.add_request(prompt, make_params(max_tokens=14))
    for _ in range(4):
        engine.step()
    seq = engine.seqs[seq_id]
    cached = prompt + seq.generated[:-1]  # the pending token is not cached yet
    assert engine.target.length(seq.slot) == len(cached)
    fresh = runner(target)
    slot = fresh.add_sequence()
    fresh.forward([slot], torch.tensor([cached]))
    for layer in range(len(fresh.cache.keys)):
        torch.testing.assert_close(engine.target.cache.keys[layer][seq.slot, : len(cached)],
                                   fresh.cache.keys[layer][slot, : len(cached)], rtol=0, atol=1e-12)


def test_prompt_lookup_branches_join_greedy_trees_get_taken_and_keep_the_output_the_targets():
    target = build_model(family_config("llama"), seed=0)
    prompts = [[5, 6, 7, 8] * 6, [9, 3, 9, 3, 9, 3, 40, 41, 42, 9, 3], [11, 12, 13, 14, 15, 11, 12, 13]]
    want = [hf_greedy(target, p, 24) for p in prompts]
    accepted = {}
    for lookup in (0, 6):
        drafter = TreeDrafter(runner(build_model(family_config("llama", layers=1), seed=1)), branching=2,
                              lookup=lookup)
        drafts = record_drafts(drafter)
        engine = tree_engine(target, drafter, depth=6, nodes=8)
        results = engine.generate(prompts, make_params(max_tokens=24))
        assert [r.token_ids for r in results] == want
        for d in drafts:
            assert len(d.tokens) <= 8 and all(-1 <= par < i for i, par in enumerate(d.parents or []))
        accepted[lookup] = sum(r.stats.accepted for r in results)
    cal = drafter.lookup_calibration
    assert sum(cal.trials[(r,)] for r in (0, 1)) > 0  # lookup nodes were verified
    assert sum(cal.hits[(r,)] for r in (0, 1)) > 0  # and taken
    assert accepted[6] > accepted[0]


def test_sampled_trees_have_no_lookup_branch():
    # sampled verification needs siblings drawn from q in order; a lookup token was not
    target = build_model(family_config("llama"), seed=0)
    drafter = TreeDrafter(runner(build_model(family_config("llama", layers=1), seed=1)), branching=2, lookup=6)
    engine = tree_engine(target, drafter, depth=4, nodes=8)
    engine.generate([[5, 6, 7, 8] * 6], make_params(max_tokens=16, temperature=1.0, seed=3))
    assert sum(drafter.lookup_calibration.trials.values()) == 0
