"""Stop conditions end generation exactly where they should, even inside a verified block;
bad parameters are refused naming the field; seeded sampling is reproducible."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from specserve.actors.engine.draft_length import CostModel
from specserve.actors.engine.drafters import ModelDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.request import InvalidRequestError, make_params

from .tiny import always_drafting_engine, build_model, family_config, hf_greedy, runner

PROMPT, OTHER_PROMPT = [3, 41, 9, 60], [11, 12]  # ids valid in both the 96- and the 64-token vocab
K = 8  # the target drafts for itself, so every step is one block of K accepted drafts + a bonus


@pytest.fixture(scope="module")
def target():
    return build_model(family_config("llama"), seed=0)


@pytest.fixture(scope="module")
def greedy(target) -> list[int]:
    return hf_greedy(target, PROMPT, 20)


def self_drafting_engine(target, tokenizer=None, max_seq_len: int = 128) -> SpeculativeEngine:
    drafter = ModelDrafter(runner(target, max_seq_len=max_seq_len), confidence_threshold=0.0)
    return always_drafting_engine(runner(target, max_seq_len=max_seq_len), drafter, K, tokenizer)


def first_new_token_at_or_after(ids: list[int], start: int) -> int:
    """Index of the first token from `start` on that does not occur before it."""
    return next(j for j in range(start, len(ids)) if ids[j] not in ids[:j])


# ---- max_tokens and stop token ids ---------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 3, 7, 9, 10, 14])
def test_max_tokens_gives_exactly_that_many_tokens_with_finish_reason_length(target, greedy, max_tokens):
    result = self_drafting_engine(target).generate([PROMPT], make_params(max_tokens=max_tokens))[0]
    assert result.token_ids == greedy[:max_tokens]
    assert result.finish_reason == "length"


def test_a_stop_token_id_inside_a_block_ends_generation_right_after_its_first_occurrence(target, greedy):
    j = first_new_token_at_or_after(greedy, 2)
    assert j < K  # inside the first block
    engine = self_drafting_engine(target)
    stopped, other = engine.generate([PROMPT, OTHER_PROMPT], [make_params(max_tokens=20, stop_token_ids=[greedy[j]]),
                                                              make_params(max_tokens=20)])
    assert stopped.token_ids == greedy[: j + 1]
    assert stopped.finish_reason == "stop"
    assert stopped.stats.steps == 1  # it really stopped inside the first verified block
    assert other.token_ids == hf_greedy(target, OTHER_PROMPT, 20)  # its neighbour's stop left it alone


def test_the_config_eos_token_stops_generation_and_ignore_eos_goes_past_it(target, greedy):
    j = first_new_token_at_or_after(greedy, 3)
    verifier = runner(target)
    verifier.model.config.eos_token_id = greedy[j]
    engine = always_drafting_engine(verifier, ModelDrafter(runner(target), confidence_threshold=0.0), K)
    stopped = engine.generate([PROMPT], make_params(max_tokens=20))[0]
    assert (stopped.token_ids, stopped.finish_reason) == (greedy[: j + 1], "stop")
    ignored = engine.generate([PROMPT], make_params(max_tokens=20, ignore_eos=True))[0]
    assert (ignored.token_ids, ignored.finish_reason) == (greedy, "length")


# ---- stop strings: a tokenizer of 64 two-letter tokens, decoded by concatenation -------------------

LETTERS = "abcdefgh"


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {a + b: i for i, (a, b) in enumerate((a, b) for a in LETTERS for b in LETTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="aa"))
    tok.decoder = decoders.Fuse()  # "ab" "cd" -> "abcd": stop strings can straddle tokens
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def target64():
    return build_model(family_config("llama", vocab=64), seed=0)


def test_a_stop_string_across_two_tokens_cuts_the_text_before_it_and_the_tokens_after_it(target64, tokenizer):
    greedy = hf_greedy(target64, PROMPT, 20)
    text = tokenizer.decode(greedy)
    assert text == "".join(tokenizer.convert_ids_to_tokens(greedy))
    # the last letter of token j-1 and the first of token j, first occurring right there
    start = next(o for o in range(3, len(text) - 1, 2) if text.find(text[o : o + 2]) == o)
    j = (start + 1) // 2
    engine = self_drafting_engine(target64, tokenizer)
    result = engine.generate([PROMPT], make_params(max_tokens=20, stop=["zz", text[start : start + 2]]))[0]
    assert result.token_ids == greedy[: j + 1]
    assert result.text == text[:start]
    assert result.finish_reason == "stop"


def test_a_stop_token_id_is_left_out_of_the_text(target64, tokenizer):
    greedy = hf_greedy(target64, PROMPT, 20)
    j = first_new_token_at_or_after(greedy, 2)
    engine = self_drafting_engine(target64, tokenizer)
    result = engine.generate([PROMPT], make_params(max_tokens=20, stop_token_ids=[greedy[j]]))[0]
    assert result.token_ids == greedy[: j + 1]
    assert result.text == tokenizer.decode(greedy[:j])


# ---- parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(foo=1), "foo"),
])
def test_out_of_range_sampling_params_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        make_params(**kwargs)
    assert err.value.field == field


def test_an_empty_stop_string_is_refused_naming_the_stop_field():
    with pytest.raises(InvalidRequestError) as err:
        make_params(stop=["ok", ""])
    assert err.value.field == "stop"


@pytest.mark.parametrize("prompt, kwargs, field", [
    ([], dict(), "prompt"),
    ([1, 96], dict(), "prompt_token_ids"),  # vocab is 96
    ([1, -1], dict(), "prompt_token_ids"),
    ([1, 2], dict(stop_token_ids=[96]), "stop_token_ids"),
    ([1] * 5, dict(max_tokens=128 - K - 1 - 5 + 1), "max_tokens"),  # one over max_seq_len - k_max - 1
])
def test_impossible_requests_are_refused_naming_the_field_before_any_work(target, prompt, kwargs, field):
    engine = self_drafting_engine(target)
    with pytest.raises(InvalidRequestError) as err:
        engine.generate([PROMPT, prompt], make_params(**{"max_tokens": 10, **kwargs}))
    assert err.value.field == field
    assert not engine.seqs and engine.target.cache.num_free == engine.target.cfg.max_num_seqs


def test_the_longest_admitted_request_runs_to_completion_within_max_seq_len(target):
    engine = self_drafting_engine(target, max_seq_len=40)
    max_tokens = 40 - K - 1 - len(PROMPT)  # the largest the engine admits
    result = engine.generate([PROMPT], make_params(max_tokens=max_tokens))[0]
    assert result.token_ids == hf_greedy(target, PROMPT, max_tokens)


# ---- seeded sampling -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafter_model():
    return build_model(family_config("llama", layers=1), seed=1)


def sampling_engine(target, drafter_model, cost: CostModel | None = None) -> SpeculativeEngine:
    engine = always_drafting_engine(runner(target), ModelDrafter(runner(drafter_model), confidence_threshold=0.0), 4)
    if cost is not None:
        engine.cost = cost
    return engine


def sample(engine, seed: int, prompts=(PROMPT,), others=()) -> list[int]:
    params = [make_params(max_tokens=20, temperature=1.0, seed=seed)] + list(others)
    return engine.generate(list(prompts), params)[0].token_ids


def test_sampling_with_the_same_seed_repeats_and_with_another_seed_differs(target, drafter_model):
    engine = sampling_engine(target, drafter_model)
    first = sample(engine, seed=7)
    assert sample(engine, seed=7) == first
    assert sample(sampling_engine(target, drafter_model), seed=7) == first  # a fresh engine too
    assert sample(engine, seed=8) != first


def test_a_seeded_request_gives_the_same_tokens_whatever_else_is_in_the_batch(target, drafter_model):
    alone = sample(sampling_engine(target, drafter_model), seed=7)
    batched = sample(sampling_engine(target, drafter_model), seed=7, prompts=(PROMPT, OTHER_PROMPT),
                     others=[make_params(max_tokens=20)])
    assert batched == alone


class SlowDrafting(CostModel):
    """As measured on a machine where a draft forward costs ten verifications: k = 0."""

    def observe_draft(self, forwards: int, seconds: float) -> None:
        pass

    def observe_verify(self, n: int, seconds: float) -> None:
        pass

    def step_time(self, k: int, local: bool = False) -> float:
        return 1.0 + 10.0 * k

    def knows_plain(self) -> bool:
        return True


def test_a_seeded_request_gives_the_same_tokens_however_fast_drafting_is_measured_to_be(target, drafter_model):
    fast = sample(sampling_engine(target, drafter_model), seed=7)
    slow_engine = sampling_engine(target, drafter_model)
    slow_engine.cost = SlowDrafting(slow_engine.policy)
    assert sample(slow_engine, seed=7) == fast
