"""The suffix index against a brute-force reference, its memory bound, and drafting from traffic.

The reference scans every indexed stream for every occurrence of every suffix: what the hashed
n-gram tables must reproduce exactly (match length, continuation counts, the chosen token, the
draft, and the number of entries held). Small vocabularies make matches long and frequent.
"""

from __future__ import annotations

import math
import random

import pytest

from specserve.actors.engine.drafters import NgramDrafter
from specserve.actors.engine.request import make_params
from specserve.actors.engine.suffix import SuffixConfig, SuffixIndex

from .tiny import always_drafting_engine, build_model, family_config, hf_greedy, runner


class Reference:
    """Brute force: streams of (token, order) where order is the indexing order (recency)."""

    def __init__(self, cfg: SuffixConfig):
        self.cfg = cfg
        self.own: dict[int, list[int]] = {}
        self.own_order: dict[int, list[int]] = {}
        self.finished: list[tuple[list[int], list[int]]] = []
        self.clock = 0

    def _orders(self, n: int) -> list[int]:
        out = list(range(self.clock + 1, self.clock + 1 + n))
        self.clock += n
        return out

    def sync(self, seq: int, context: list[int]) -> None:
        old = self.own.get(seq, [])
        if old != context[: len(old)]:
            old = []
            self.own_order[seq] = [0]
        self.own_order.setdefault(seq, [0])
        self.own_order[seq] += self._orders(len(context) - max(len(old), 1)) if len(context) > 1 else []
        self.own[seq] = list(context)

    def add_finished(self, tokens: list[int]) -> None:
        cap = self.cfg.max_tokens
        tokens = list(tokens[-cap:]) if cap > 0 else []
        if len(tokens) < 2:
            return
        while self.finished and sum(len(t) for t, _ in self.finished) + len(tokens) > cap:
            self.finished.pop(0)
        self.finished.append((tokens, [0] + self._orders(len(tokens) - 1)))

    def streams(self, seq: int):
        own = [(self.own[seq], self.own_order[seq])] if seq in self.own else []
        return own + self.finished

    def match(self, seq: int, query: list[int], longest: int | None = None):
        """(length, {token: count}, best token) of the longest suffix with an occurrence."""
        top = min(len(query), self.cfg.max_match, longest or self.cfg.max_match)
        for n in range(top, 0, -1):
            suffix, counts, latest = query[-n:], {}, {}
            for tokens, orders in self.streams(seq):
                for t in range(n, len(tokens)):
                    if tokens[t - n : t] == suffix:
                        counts[tokens[t]] = counts.get(tokens[t], 0) + 1
                        latest[tokens[t]] = max(latest.get(tokens[t], 0), orders[t])
            if counts:
                best = max(counts, key=lambda x: (counts[x], latest[x]))
                return n, counts, best
        return 0, {}, None

    def draft(self, seq: int, context: list[int], k: int) -> list[int]:
        if k <= 0 or self.cfg.min_match == 0:
            return []
        self.sync(seq, context)
        n, counts, best = self.match(seq, context)
        if n < self.cfg.min_match:
            return []
        limit, prob, out = min(k, math.ceil(self.cfg.spec_factor * n)), 1.0, []
        while len(out) < limit and n > 0:
            prob *= counts[best] / sum(counts.values())
            if prob < self.cfg.min_prob:
                break
            out.append(best)
            n, counts, best = self.match(seq, context + out, n + 1)
        return out

    def entries(self, seq_ids) -> int:
        """Distinct (n-gram, continuation) pairs per table: the global store, each own context."""
        def pairs(streams):
            return len({(tuple(tokens[t - n : t]), tokens[t]) for tokens, _ in streams
                        for t in range(1, len(tokens)) for n in range(1, min(t, self.cfg.max_match) + 1)})
        own = sum(pairs([(self.own[s], None)]) for s in seq_ids if s in self.own)
        return pairs(self.finished) + own


def random_stream(rng: random.Random, vocab: int, length: int, source: list[int] | None = None) -> list[int]:
    """Random tokens, with copied runs of `source` mixed in so that long matches occur."""
    out = []
    while len(out) < length:
        if source and rng.random() < 0.4:
            i = rng.randrange(len(source))
            out.extend(source[i : i + rng.randint(2, 12)])
        else:
            out.append(rng.randrange(vocab))
    return out[:length]


def random_config(rng: random.Random) -> SuffixConfig:
    max_match = rng.randint(1, 8)
    return SuffixConfig(max_match=max_match, min_match=rng.randint(0, min(2, max_match)), spec_factor=rng.choice([0.5, 1, 2, 8]),
                        min_prob=rng.choice([0.0, 0.05, 0.3]), max_tokens=rng.choice([0, 30, 200, 10_000]))


@pytest.mark.parametrize("case", range(300))
def test_match_counts_choice_and_draft_equal_brute_force_on_random_streams(case):
    rng = random.Random(case)
    cfg = random_config(rng)
    index, ref = SuffixIndex(cfg), Reference(cfg)
    vocab = rng.randint(2, 6)
    history: list[int] = []
    contexts = {seq: random_stream(rng, vocab, rng.randint(1, 10)) for seq in range(3)}
    for _ in range(12):
        if rng.random() < 0.3:
            tokens = random_stream(rng, vocab, rng.randint(0, 40), history)
            index.add_finished(tokens)
            ref.add_finished(tokens)
            history += tokens
        seq = rng.randrange(3)
        contexts[seq] = contexts[seq] + random_stream(rng, vocab, rng.randint(1, 8), history)
        ctx = contexts[seq]
        k = rng.randint(0, 10)
        assert index.draft(seq, ctx, k) == ref.draft(seq, ctx, k)
        query = ctx + random_stream(rng, vocab, rng.randint(0, 3))
        m = index.match(seq, query)
        n, counts, best = ref.match(seq, query)
        assert m.length == n
        assert {t: c for t, (c, _) in m.counts.items()} == counts
        assert (m.best() if m.counts else None) == best
    assert index.entries == ref.entries(index.live)
    assert index.store_tokens <= cfg.max_tokens


def test_the_global_store_stays_within_its_token_bound_and_evicted_sequences_stop_matching():
    cfg = SuffixConfig(max_match=6, max_tokens=100, min_prob=0.0)
    index = SuffixIndex(cfg)
    rng = random.Random(0)
    first = rng.sample(range(1000), 40)  # distinct tokens: its n-grams occur once
    index.add_finished(first)
    assert index.draft(1, first[:10], 4) == first[10:14]
    for _ in range(20):
        index.add_finished([rng.randrange(1000, 2000) for _ in range(30)])
        assert index.store_tokens <= 100
        assert index.store.entries <= cfg.max_match * index.store_tokens
    assert index.draft(2, first[:10], 4) == []  # `first` was evicted first
    for _ in range(len(index.finished)):
        index._evict_oldest()
    assert index.store.entries == 0 and all(not table for table in index.store.tables)  # nothing leaks


def test_finished_sequences_older_than_max_age_leave_the_store():
    now = [0.0]
    index = SuffixIndex(SuffixConfig(max_age_s=10.0, min_prob=0.0), clock=lambda: now[0])
    index.add_finished([1, 2, 3, 4, 5, 6])
    assert index.draft(1, [9, 1, 2], 3) == [3, 4, 5]
    now[0] = 11.0
    index.evict()
    assert index.draft(2, [9, 1, 2], 3) == [] and index.store_tokens == 0


def test_a_sequence_longer_than_the_store_keeps_its_tail():
    index = SuffixIndex(SuffixConfig(max_tokens=5, min_prob=0.0, spec_factor=8.0))
    index.add_finished(list(range(10)))
    assert index.store_tokens == 5
    assert index.draft(1, [6], 3) == [7, 8, 9] and index.draft(2, [2], 3) == []


def test_a_finished_sequence_makes_a_new_one_with_its_prefix_draft_its_continuation():
    index = SuffixIndex()
    served = [5, 17, 23, 99, 4, 8, 15, 16, 42, 7, 3]
    assert index.draft(1, served[:4], 8) == []  # nothing seen yet
    index.sync(1, served)
    index.finish(1)
    assert index.draft(2, [60, 61] + served[:4], 8) == served[4:12]


def test_a_longer_match_drafts_further():
    index = SuffixIndex(SuffixConfig(spec_factor=1.0, min_prob=0.0))
    index.add_finished(list(range(100, 140)))
    assert len(index.draft(1, [100], 16)) == 1
    assert len(index.draft(2, [100, 101, 102, 103, 104], 16)) == 5


def test_the_chain_stops_where_the_continuation_is_uncertain():
    index = SuffixIndex(SuffixConfig(min_prob=0.5, spec_factor=8.0))
    for tail in ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5]):
        index.add_finished(tail)
    # after [1, 2]: 3 is certain; then 4 follows 2 of 3 times (product 2/3 >= 0.5); that is all
    assert index.draft(1, [9, 1, 2], 8) == [3, 4]
    index.add_finished([1, 2, 3, 5])
    # 4 and 5 now tie at 2 of 4: the latest (5) is chosen, at product 0.5; nothing followed 5
    assert index.draft(2, [9, 1, 2], 8) == [3, 5]


NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pair():
    """(target, drafter model, a prompt, the target's greedy continuation of it)."""
    target = build_model(family_config("llama"), seed=0)
    prompt = [3, 41, 9, 88, 17, 5]
    return target, build_model(family_config("llama", layers=1), seed=1), prompt, hf_greedy(target, prompt, NEW_TOKENS)


def _served_twice(target, drafter, prompt, want):
    """Serve `prompt`, then a request that continues it (its prompt: prompt + 4 output tokens);
    returns the second result, checked against the target's own greedy output."""
    engine = always_drafting_engine(runner(target), drafter, 4)
    [first] = engine.generate([prompt], make_params(max_tokens=NEW_TOKENS))
    [second] = engine.generate([prompt + want[:4]], make_params(max_tokens=16))
    assert first.token_ids == want and second.token_ids == want[4:20]
    return second


def test_greedy_output_is_the_targets_own_with_suffix_drafts_from_an_earlier_request(pair):
    target, _, prompt, want = pair
    shared = _served_twice(target, NgramDrafter(), prompt, want)
    alone = _served_twice(target, NgramDrafter(SuffixConfig(max_tokens=0)), prompt, want)
    assert shared.stats.accepted >= 12  # drafted from the finished request: nearly all accepted
    assert shared.stats.accepted > alone.stats.accepted  # ... which its own context could not give


def test_greedy_output_is_the_targets_own_with_suffix_lookup_in_the_model_drafter(pair):
    from specserve.actors.engine.drafters import ModelDrafter

    target, drafter_model, prompt, want = pair
    drafter = ModelDrafter(runner(drafter_model), confidence_threshold=0.0, lookup_min_n=1)
    _served_twice(target, drafter, prompt, want)
    assert drafter.lookup_drafts > 0 and drafter.chain_lookup.store_tokens > 0
