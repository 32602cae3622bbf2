"""Every supported model family end to end: logits equal transformers' own forward (float32 and
float64, through transformers' modules and, where it covers the family, the lean forward), greedy
speculation equals transformers' `generate` with a model drafter, the n-gram drafter and token
trees; checkpoints load from shards with tied or untied embeddings; generation_config.json's
EOS list stops generation; an unsupported model_type is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BloomConfig, GenerationConfig

from specserve.actors.engine import lean
from specserve.actors.engine.drafters import ModelDrafter, NgramDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.request import make_params
from specserve.actors.engine.runner import SUPPORTED_MODEL_TYPES, ModelRunner, RunnerConfig
from specserve.actors.engine.tree_drafting import TreeDrafter

from .tiny import (ALL_FAMILIES, VOCAB, WINDOW, always_drafting_engine, build_model, clone, family_config, hf_greedy,
                   record_draft_lengths, reference_logits, runner, tree_engine)

SEQ_LEN = 24  # four windows of WINDOW tokens
CHUNKS = (5, 1, WINDOW + 3, 9)  # a prefill, one decode step, blocks longer than the window
NEW_TOKENS = 12
PROMPTS = [[7], [5, 6, 7, 5, 6, 7, 5, 6, 7], list(range(20, 34))]  # the repetitive one feeds the n-gram drafter
# transformers' eager attention (Gemma 2's reference: its sdpa path cannot soft-cap) softmaxes in float32
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
ATOL_EAGER_F64 = 1e-6


def sequence(n: int = SEQ_LEN, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def jitter_norms(model, seed: int):
    """Move every norm weight off its init (ones, or zeros in Gemma's 1 + w), so a norm applied to
    the wrong tensor, or not at all, shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.add_(torch.rand(param.shape, generator=gen, dtype=param.dtype) - 0.5)
    return model


def family_model(family: str, layers: int = 2, seed: int = 0, **overrides):
    """A float64 transformers model of `family` with jittered norms."""
    return jitter_norms(build_model(family_config(family, layers=layers, **overrides), seed), seed + 100)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family(request):
    """(family, target, a one-layer drafter of the family on the same vocabulary)."""
    return request.param, family_model(request.param), family_model(request.param, layers=1, seed=1)


def typed_runner(model, dtype: torch.dtype, lean_path: bool) -> ModelRunner:
    """A runner of `dtype` over a copy of `model`."""
    cfg = RunnerConfig(max_num_seqs=2, max_seq_len=64, dtype=dtype, lean=lean_path)
    return ModelRunner(clone(model, attn="eager").to(dtype), cfg)


def chunked_logits(r: ModelRunner, seq: list[int]) -> torch.Tensor:
    """Logits of `seq` fed as CHUNKS, one forward each, on a fresh slot.  # [len(seq), vocab]"""
    slot, start, out = r.add_sequence(), 0, []
    for size in CHUNKS:
        out.append(r.forward([slot], torch.tensor([seq[start : start + size]]))[0])
        start += size
    return torch.cat(out)


def max_logit_diff(model, dtype: torch.dtype, lean_path: bool) -> float:
    """Largest |runner - transformers| logit over SEQ_LEN tokens, both in `dtype`."""
    seq = sequence()
    want = reference_logits(clone(model, attn=model.config._attn_implementation).to(dtype), seq)
    return float((chunked_logits(typed_runner(model, dtype, lean_path), seq) - want).abs().max())


# ---- logits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lean_path", [False, True], ids=["transformers", "lean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_logits_over_a_sequence_longer_than_the_window_equal_transformers_forward(family, dtype, lean_path):
    name, target, _ = family
    eager = target.config._attn_implementation == "eager"
    atol = ATOL_EAGER_F64 if eager and dtype == torch.float64 else ATOL[dtype]
    assert max_logit_diff(target, dtype, lean_path) < atol


@pytest.mark.parametrize("family_name", ALL_FAMILIES)
def test_the_lean_path_engages_exactly_for_its_families_and_the_rest_take_transformers_modules(family_name):
    r = runner(family_model(family_name), lean=True)
    assert (r.lean is not None) == (family_name in lean.LEAN_MODEL_TYPES)


def rope_model(rope: dict):
    return family_model("llama", rope_parameters={"rope_theta": 10000.0, **rope})


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
], ids=lambda rope: rope["rope_type"])
@pytest.mark.parametrize("lean_path", [False, True], ids=["transformers", "lean"])
def test_llama_rope_scaling_gives_transformers_logits(rope, lean_path):
    model, seq = rope_model(rope), sequence()
    assert (reference_logits(model, seq) - reference_logits(family_model("llama"), seq)).abs().max() > 1e-5  # bites (vs 1e-10)
    r = runner(model, lean=lean_path)
    assert (r.lean is not None) == lean_path
    torch.testing.assert_close(chunked_logits(r, seq), reference_logits(model, seq), atol=1e-10, rtol=0)


def test_llama_dynamic_rope_within_its_original_context_gives_transformers_logits():
    # past max_position_embeddings dynamic NTK rescales by the longest position of each forward, so
    # its keys depend on how the sequence was chunked (in transformers' own cached decoding too)
    model, seq = rope_model({"rope_type": "dynamic", "factor": 2.0}), sequence()
    r = runner(model, lean=True)
    assert r.lean is None  # not a static table: transformers' modules
    torch.testing.assert_close(chunked_logits(r, seq), reference_logits(model, seq), atol=1e-10, rtol=0)


FEATURES = [  # (family, override that removes the feature): guards the tests above
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=1000)),
    ("gemma3_text", dict(sliding_window=1000)),
    ("qwen3", dict(sliding_window=1000)),
    ("qwen3_moe", dict(sliding_window=1000)),
    ("mixtral", dict(sliding_window=1000)),
    ("phi3", dict(sliding_window=1000)),
]


@pytest.mark.parametrize("family_name,without", FEATURES, ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_the_sliding_windows_and_soft_caps_of_the_test_models_really_change_the_logits(family_name, without):
    seq = sequence()
    diff = reference_logits(family_model(family_name), seq) - reference_logits(family_model(family_name, **without), seq)
    assert diff.abs().max() > 1e-2  # ignored by both sides, the logit tests above would prove nothing


# ---- greedy speculation --------------------------------------------------------------------------


def test_greedy_speculation_with_a_model_drafter_equals_transformers_generate(family):
    name, target, drafter_model = family
    want = [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]
    drafter = ModelDrafter(runner(drafter_model, lean=True), confidence_threshold=0.0)
    lengths = record_draft_lengths(drafter)
    engine = always_drafting_engine(runner(target, lean=True), drafter, k_max=4)
    assert [r.token_ids for r in engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))] == want
    assert max(lengths) == 4


def test_greedy_speculation_with_the_ngram_drafter_equals_transformers_generate(family):
    name, target, _ = family
    want = [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]
    drafter = NgramDrafter()
    lengths = record_draft_lengths(drafter)
    engine = always_drafting_engine(runner(target), drafter, k_max=4)
    assert [r.token_ids for r in engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))] == want
    assert max(lengths) > 0


@pytest.mark.parametrize("family_name", ["gemma2", "qwen3", "mixtral"])
def test_greedy_token_trees_equal_transformers_generate(family_name):
    target, drafter_model = family_model(family_name), family_model(family_name, layers=1, seed=1)
    want = [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]
    drafter = TreeDrafter(runner(drafter_model, lean=True), branching=3)
    engine = tree_engine(target, drafter, depth=3, nodes=6, lean=True)
    results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == want
    assert sum(r.stats.drafted for r in results) > 0


# ---- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name,tied", [("qwen3", False), ("qwen3", True), ("gemma2", True)])
def test_a_sharded_checkpoint_loads_with_its_tied_or_untied_embeddings(tmp_path, family_name, tied):
    model = family_model(family_name, tie_word_embeddings=tied).float()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    r = ModelRunner.from_pretrained(tmp_path, RunnerConfig(max_num_seqs=1, max_seq_len=64))
    head, embed = r.model.lm_head.weight, r.model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == tied
    seq = sequence()
    torch.testing.assert_close(chunked_logits(r, seq), reference_logits(model, seq), atol=1e-5, rtol=0)


def test_the_eos_list_of_generation_config_ends_generation(tmp_path):
    model = family_model("qwen3").float()
    prompt = PROMPTS[2]
    want = hf_greedy(model, prompt, NEW_TOKENS)
    stop_at = next(i for i in range(3, NEW_TOKENS) if want[i] not in want[:i])  # first new token from the 4th on
    eos = [t for t in range(VOCAB) if t not in want][:1] + [want[stop_at]]  # one never produced, one that is
    model.generation_config = GenerationConfig(eos_token_id=eos)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == eos
    assert json.loads((tmp_path / "config.json").read_text()).get("eos_token_id") is None
    target = ModelRunner.from_pretrained(tmp_path, RunnerConfig(max_num_seqs=1, max_seq_len=64))
    engine = SpeculativeEngine(target, None, NgramDrafter())
    assert engine.eos_ids == set(eos)
    [result] = engine.generate([prompt], make_params(max_tokens=NEW_TOKENS))
    assert result.token_ids == want[: stop_at + 1] and result.finish_reason == "stop"


def test_a_checkpoint_of_an_unsupported_family_is_refused_naming_its_model_type(tmp_path):
    BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'bloom'.*supported: llama, qwen2") as err:
        ModelRunner.from_pretrained(tmp_path)
    assert all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)
    from transformers import AutoModelForCausalLM

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="'bloom'"):
        ModelRunner(bloom)  # a model built in memory is checked too


def test_a_bidirectional_gemma3_embedding_model_is_refused():
    config = family_config("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="bidirectional"):
        ModelRunner(build_model(config, seed=0))
