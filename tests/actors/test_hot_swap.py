"""Hot swap of drafter weights: in-flight sequences continue, nothing fails, output unchanged."""

from __future__ import annotations

import threading

import pytest

from specserve.actors.engine.drafters import ModelDrafter, NgramDrafter
from specserve.actors.engine.request import make_params
from specserve.actors.engine.tap import TapConfig, TrafficTap

from .drafting import DraftServerThread
from .engine.tiny import always_drafting_engine, build_model, family_config, hf_greedy, runner
from .test_remote_drafting import over_the_wire

NEW_TOKENS = 24
PROMPTS = [[7], [3, 41, 9, 88], [5, 6, 7, 5, 6, 7, 5, 6, 7], list(range(20, 34))]


@pytest.fixture(scope="module")
def models():
    target = build_model(family_config("llama"), seed=0)
    drafters = [build_model(family_config("llama", layers=1), seed=s) for s in (1, 2)]
    return target, drafters, [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]


def test_swapping_weights_mid_generation_keeps_the_output_and_tags_new_drafts(models):
    target, (first, second), want = models
    drafter = ModelDrafter(runner(first), confidence_threshold=0.0)
    drafter.weight_version = "v0"
    engine = always_drafting_engine(runner(target), drafter, 3)
    engine.tap = TrafficTap(TapConfig(enabled=True))
    ids = [engine.add_request(p, make_params(max_tokens=NEW_TOKENS)) for p in PROMPTS]
    done = {}

    def step():
        for out in engine.step():
            if out.finish_reason:
                done[out.seq_id] = engine.seqs[out.seq_id].generated
                engine.release(out.seq_id)

    for _ in range(3):
        step()
    drafter.swap_weights(second.state_dict(), "v1")
    versions_before = {r.drafter_version for r in engine.tap.drain()}
    while engine.seqs:
        step()
    assert [done[i] for i in ids] == want
    assert versions_before == {"v0"} and {r.drafter_version for r in engine.tap.drain()} == {"v1"}


def test_weights_that_do_not_fit_are_refused_and_the_old_ones_keep_serving(models):
    target, (first, _), _ = models
    drafter = ModelDrafter(runner(first), confidence_threshold=0.0)
    other = build_model(family_config("llama", layers=2), seed=3)
    with pytest.raises(ValueError, match="do not fit"):
        drafter.swap_weights(other.state_dict(), "bad")
    assert drafter.weight_version == ""
    with pytest.raises(ValueError, match="no weights"):
        NgramDrafter().swap_weights({}, "v1")


def test_hot_swaps_under_load_over_the_wire_fail_nothing_and_change_no_output(models):
    target, (first, second), want = models
    server = DraftServerThread(ModelDrafter(runner(first, max_num_seqs=8), confidence_threshold=0.0), "v0",
                               pipelined=True)
    with over_the_wire(target, server, k_max=3) as (engine, pool):
        out = {}
        worker = threading.Thread(target=lambda: out.update(
            results=engine.generate(PROMPTS * 2, make_params(max_tokens=NEW_TOKENS))))
        worker.start()
        for i, model in enumerate([second, first, second]):  # three swaps while requests run
            server.worker.swap_weights(model.state_dict(), f"v{i + 1}")
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert [r.token_ids for r in out["results"]] == want * 2
        assert server.worker.weight_version == "v3"
        assert sum(r.stats.accepted for r in out["results"]) > 0
