"""LeanForward: engaged where it should be, equal to transformers' modules, and it follows weight
swaps. Logits against transformers' own forward for every chain and tree case run in
test_runner.py with `lean` on; greedy trees in test_tree_drafting.py; greedy chains below."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.engine import lean
from specserve.actors.engine.drafters import ModelDrafter
from specserve.actors.engine.request import make_params

from .tiny import (FAMILIES, always_drafting_engine, build_model, family_config, hf_greedy, reference_logits,
                   runner)

ATOL = 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lean_path_runs_for_llama_qwen2_and_mistral_and_not_for_gpt2(family):
    r = runner(build_model(family_config(family), seed=0), lean=True)
    assert (r.lean is not None) == (family != "gpt2")
    assert lean.supports(r.model) == (family != "gpt2")


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_a_llama_with_biases_the_lean_path_lacks_takes_transformers_modules_and_keeps_its_logits(bias):
    # attention_bias also puts a bias on o_proj, mlp_bias on gate/up/down: the fused weights have none
    model = build_model(family_config("llama", **{bias: True}), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)  # zero-initialised, they would change nothing
    r = runner(model, lean=True)
    assert r.lean is None and not lean.supports(r.model)
    seq = list(range(10, 30))
    torch.testing.assert_close(r.forward([r.add_sequence()], torch.tensor([seq]))[0], reference_logits(model, seq),
                               atol=ATOL, rtol=0)


def test_a_runner_without_lean_never_builds_it():
    assert runner(build_model(family_config("llama"), seed=0)).lean is None


def test_lean_and_transformers_forwards_can_take_turns_on_one_sequence():
    # both paths write the same cache: a sequence may move between them (trees take transformers' path)
    model = build_model(family_config("qwen2"), seed=3)
    r = runner(model, lean=True)
    slot = r.add_sequence()
    seq = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks, start = [], 0
    for size, via_lean in ((5, True), (3, False), (1, True), (4, False), (7, True)):
        r_lean = r.lean
        r.lean = r_lean if via_lean else None
        chunks.append(r.forward([slot], torch.tensor([seq[start : start + size]]))[0])
        r.lean = r_lean
        start += size
    torch.testing.assert_close(torch.cat(chunks), reference_logits(model, seq), atol=ATOL, rtol=0)


def test_after_the_weights_change_the_lean_path_computes_with_the_new_ones():
    old, new = (build_model(family_config("llama"), seed=s) for s in (0, 1))
    r = runner(old, lean=True)
    drafter = ModelDrafter(r, confidence_threshold=0.0)
    drafter.swap_weights(new.state_dict(), "v1")  # the hot swap path: load_state_dict + weights_changed
    slot = r.add_sequence()
    seq = list(range(10, 22))
    torch.testing.assert_close(r.forward([slot], torch.tensor([seq]))[0], reference_logits(new, seq),
                               atol=ATOL, rtol=0)


def test_weights_changed_in_place_without_telling_the_runner_would_be_missed():
    # the reason swap_weights calls weights_changed: the lean path holds fused copies
    old, new = (build_model(family_config("llama"), seed=s) for s in (0, 1))
    r = runner(old, lean=True)
    r.model.load_state_dict(new.state_dict())
    slot = r.add_sequence()
    seq = list(range(10, 22))
    stale = r.forward([slot], torch.tensor([seq]))[0]
    assert not torch.allclose(stale, reference_logits(new, seq), atol=1e-3)
    r.weights_changed()
    r.truncate(slot, 0)
    torch.testing.assert_close(r.forward([slot], torch.tensor([seq]))[0], reference_logits(new, seq),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_speculation_with_lean_target_and_drafter_equals_transformers_generate(family):
    target = build_model(family_config(family), seed=0)
    drafter_model = build_model(family_config(family, layers=1), seed=1)
    prompts = [[7], [3, 41, 9, 88], list(range(20, 34))]
    want = [hf_greedy(target, p, 16) for p in prompts]
    for k_max in (1, 3, 8):
        drafter = ModelDrafter(runner(drafter_model, lean=True), confidence_threshold=0.0)
        engine = always_drafting_engine(runner(target, lean=True), drafter, k_max)
        results = engine.generate(prompts, make_params(max_tokens=16))
        assert [r.token_ids for r in results] == want
        assert sum(r.stats.drafted for r in results) > 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_float32_blocks_of_three_rows_and_more_take_the_blocked_product_and_match_transformers():
    # float64 (the other tests) never takes oneDNN; float32, the serving dtype, does from 3 rows on
    from specserve.actors.engine.runner import ModelRunner, RunnerConfig

    model = build_model(family_config("llama"), seed=5).float()
    r = ModelRunner(build_model(family_config("llama"), seed=5).float(),
                    RunnerConfig(max_num_seqs=3, max_seq_len=128, dtype=torch.float32, lean=True))
    linears = [r.lean.lm_head] + [w for layer in r.lean.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert all(w.blocked is not None for w in linears)
    taken = []
    blocked_call = lean._Linear.__call__

    def spy(self, x):
        taken.append((x.numel() // x.shape[-1], x.numel() >= lean._Linear.ROWS_BLOCKED * x.shape[-1]))
        return blocked_call(self, x)

    seq = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    slot = r.add_sequence()
    chunks, start = [], 0
    lean._Linear.__call__ = spy
    try:
        for size in (9, 1, 2, 3, 5, 1, 4, 7, 8):
            chunks.append(r.forward([slot], torch.tensor([seq[start : start + size]]))[0])
            start += size
    finally:
        lean._Linear.__call__ = blocked_call
    assert {rows for rows, blocked in taken if blocked} >= {3, 4, 5, 7, 8, 9}
    assert {rows for rows, blocked in taken if not blocked} == {1, 2}
    torch.testing.assert_close(torch.cat(chunks), reference_logits(model, seq[:start]), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_float32_greedy_speculation_through_the_blocked_product_equals_transformers_generate():
    from specserve.actors.engine.runner import ModelRunner, RunnerConfig

    cfg = RunnerConfig(max_num_seqs=4, max_seq_len=128, dtype=torch.float32, lean=True)
    target = build_model(family_config("llama"), seed=0).float()
    prompts = [[7], [3, 41, 9, 88], list(range(20, 34))]
    want = [hf_greedy(target, p, 16) for p in prompts]
    for k_max in (2, 4, 8):
        drafter = ModelDrafter(ModelRunner(build_model(family_config("llama", layers=1), seed=1).float(), cfg),
                               confidence_threshold=0.0)
        engine = always_drafting_engine(ModelRunner(build_model(family_config("llama"), seed=0).float(), cfg),
                                        drafter, k_max)
        results = engine.generate(prompts, make_params(max_tokens=16))
        assert [r.token_ids for r in results] == want
        assert sum(r.stats.drafted for r in results) > 0
