"""ModelRunner: logits equal transformers' own forward over the whole sequence, whatever the
chunking, batching, rollback, slot reuse or block mask; capacity limits are clear errors."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.engine.kv_cache import CacheBudgetError
from specserve.actors.engine.attention import BlockMask
from specserve.actors.engine.runner import ModelRunner, RunnerConfig, chain_block

from .tiny import FAMILIES, WINDOW, build_model, family_config, reference_logits, runner

ATOL = 1e-10  # float64 end to end: agreement is ~1e-15, a wrong mask or position is ~1e-2


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request):
    """A plain transformers model (sdpa attention, its own mask code) of each family."""
    return build_model(family_config(request.param), seed=0)


@pytest.fixture(scope="module", params=[False, True], ids=["transformers", "lean"])
def lean(request):
    """Chain forwards through transformers' modules, or through LeanForward (where the family allows)."""
    return request.param


def random_tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (n,), generator=gen).tolist()


def feed(r: ModelRunner, slot: int, tokens: list[int]) -> torch.Tensor:
    """One single-sequence forward.  # [len(tokens), vocab]"""
    return r.forward([slot], torch.tensor([tokens]))[0]


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Rows padded with a token id that is not 0, so padding cannot pass for a real token."""
    n = max(len(row) for row in rows)
    tokens = torch.full((len(rows), n), 95, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, [len(row) for row in rows]


# ---- chains ---------------------------------------------------------------------------------------


def test_prefill_in_chunks_of_different_sizes_matches_one_full_forward(reference, lean):
    seq = random_tokens(24, seed=1)
    r = runner(reference, lean=lean)
    slot = r.add_sequence()
    chunks, start = [], 0
    for size in (1, 7, 1, 2, WINDOW + 3, 4):  # one chunk longer than the sliding window
        chunks.append(feed(r, slot, seq[start : start + size]))
        start += size
    torch.testing.assert_close(torch.cat(chunks), reference_logits(reference, seq), atol=ATOL, rtol=0)
    assert r.length(slot) == 24


def test_a_batch_of_sequences_with_different_cached_lengths_matches_each_full_forward(reference, lean):
    seqs = [random_tokens(24, seed=10 + i) for i in range(3)]
    cached, steps = (3, 11, 17), ((4, 1, 6), (2, 5, 1))  # two padded steps: the second overwrites padding
    r = runner(reference, lean=lean)
    slots = [r.add_sequence() for _ in seqs]
    for slot, seq, c in zip(slots, seqs, cached):
        feed(r, slot, seq[:c])
    ends = list(cached)
    for step in steps:
        rows = [seq[e : e + n] for seq, e, n in zip(seqs, ends, step)]
        tokens, n_valid = right_padded(rows)
        logits = r.forward(slots, tokens, n_valid)  # [3, n, vocab]
        for i, (seq, e, n) in enumerate(zip(seqs, ends, step)):
            want = reference_logits(reference, seq[: e + n])[e:]
            torch.testing.assert_close(logits[i, :n], want, atol=ATOL, rtol=0)
            assert r.length(slots[i]) == e + n
        ends = [e + n for e, n in zip(ends, step)]


def test_a_long_row_batched_with_a_nearly_full_sequence_stays_within_the_cache():
    # the model drafter does exactly this when a long prompt joins a sequence that is far along
    reference = build_model(family_config("llama", layers=1), seed=0)
    r = runner(reference, max_num_seqs=2, max_seq_len=128)
    deep, new = r.add_sequence(), r.add_sequence()
    long_seq, prompt = random_tokens(121, seed=2), random_tokens(100, seed=3)
    feed(r, deep, long_seq[:120])
    tokens, n_valid = right_padded([long_seq[120:], prompt])  # row `deep` holds 1 token + 99 padding
    logits = r.forward([deep, new], tokens, n_valid)
    torch.testing.assert_close(logits[1], reference_logits(reference, prompt), atol=ATOL, rtol=0)


def test_rollback_then_different_tokens_gives_the_logits_of_the_new_sequence(reference, lean):
    prefix, old, new = random_tokens(12, seed=4), random_tokens(6, seed=5), random_tokens(6, seed=6)
    r = runner(reference, lean=lean)
    slot = r.add_sequence()
    feed(r, slot, prefix + old)
    r.truncate(slot, 14)  # keep two of the old tokens, as after accepting two drafts
    got = feed(r, slot, new)
    want = reference_logits(reference, prefix + old[:2] + new)[14:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert r.length(slot) == 20


def test_a_reused_slot_does_not_see_the_previous_sequence(reference, lean):
    r = runner(reference, max_num_seqs=1, lean=lean)
    slot = r.add_sequence()
    feed(r, slot, random_tokens(30, seed=7))
    r.free(slot)
    again = r.add_sequence()
    assert again == slot and r.length(again) == 0
    seq = random_tokens(9, seed=8)
    got = torch.cat([feed(r, again, seq[:4]), feed(r, again, seq[4:])])
    torch.testing.assert_close(got, reference_logits(reference, seq), atol=ATOL, rtol=0)


# ---- token trees ----------------------------------------------------------------------------------

PARENTS = (-1, 0, 0, 1, 1, 2, 3)  # node 0 is the root; each node's parent precedes it


def tree_mask(parents: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(block [n, n]: node i sees its ancestors and itself, depth [n])."""
    n = len(parents)
    block = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i, p in enumerate(parents):
        block[i, i] = True
        if p >= 0:
            block[i] |= block[p]
            depth[i] = depth[p] + 1
    return block, depth


def root_path(parents: tuple[int, ...], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_a_tree_mask_gives_every_node_the_logits_of_its_root_to_node_path(reference, lean):
    prefixes = [random_tokens(9, seed=20), random_tokens(3, seed=21)]  # deep enough for the window
    nodes = [random_tokens(len(PARENTS), seed=22), random_tokens(len(PARENTS), seed=23)]
    block, depth = tree_mask(PARENTS)
    r = runner(reference, lean=lean)
    slots = [r.add_sequence() for _ in prefixes]
    for slot, prefix in zip(slots, prefixes):
        feed(r, slot, prefix)
    logits = r.forward(slots, torch.tensor(nodes), block=block.expand(2, -1, -1), depth=depth.expand(2, -1))
    for row, (prefix, toks) in enumerate(zip(prefixes, nodes)):
        for node in range(len(PARENTS)):
            path = prefix + [toks[j] for j in root_path(PARENTS, node)]
            want = reference_logits(reference, path)[-1]
            torch.testing.assert_close(logits[row, node], want, atol=ATOL, rtol=0)


def test_the_sliding_window_of_the_test_models_really_changes_the_logits():
    # guards the tests above: were the window ignored by both sides, they would prove nothing
    windowed = build_model(family_config("mistral"), seed=0)
    full = build_model(family_config("mistral", sliding_window=None), seed=0)
    seq = random_tokens(16, seed=9)
    diff = (reference_logits(windowed, seq) - reference_logits(full, seq)).abs().amax(dim=-1)
    assert diff[:WINDOW].max() < ATOL and diff[WINDOW:].min() > 1e-4


def test_the_additive_mask_hides_what_the_boolean_mask_hides_for_every_query_head_group():
    prefix, block = torch.tensor([3, 1]), chain_block([3, 2], 3)
    positions = prefix.unsqueeze(1) + torch.arange(3)
    mask = BlockMask.build(prefix, block, positions, kv_len=6)
    additive = mask.additive(None, 2, torch.float64)  # [batch, 1, groups * n, kv_len]
    assert additive.shape == (2, 1, 6, 6) and additive.dtype == torch.float64
    for group in range(2):
        rows = additive[:, :, group * 3 : (group + 1) * 3]
        assert torch.equal(rows == 0, mask.allowed) and torch.equal(rows == float("-inf"), ~mask.allowed)
    assert mask.additive(None, 2, torch.float64) is additive  # built once, shared by every layer


# ---- capacity -------------------------------------------------------------------------------------


def small_model():
    return build_model(family_config("llama", layers=1), seed=0)


def test_a_kv_budget_too_small_for_the_cache_is_refused_at_construction_naming_the_budget():
    with pytest.raises(CacheBudgetError, match=r"budget of 1\.0 MiB"):
        ModelRunner(small_model(), RunnerConfig(max_num_seqs=8, max_seq_len=2048, kv_budget_bytes=2**20,
                                                dtype=torch.float64))


def test_a_kv_budget_exactly_the_size_of_the_cache_is_accepted():
    # 1 layer x 2 kv heads x head_dim 8 x (keys + values) x 8 bytes = 256 bytes per token
    need = 2 * (64 + 64) * 256  # 2 slots of max_seq_len 64 + the block margin 64
    ModelRunner(small_model(), RunnerConfig(max_num_seqs=2, max_seq_len=64, kv_budget_bytes=need,
                                            dtype=torch.float64))
    with pytest.raises(CacheBudgetError):
        ModelRunner(small_model(), RunnerConfig(max_num_seqs=2, max_seq_len=64, kv_budget_bytes=need - 1,
                                                dtype=torch.float64))


def test_allocating_more_sequences_than_max_num_seqs_raises_until_one_is_freed():
    r = runner(small_model(), max_num_seqs=2)
    first, second = r.add_sequence(), r.add_sequence()
    assert first != second
    with pytest.raises(CacheBudgetError):
        r.add_sequence()
    r.free(first)
    assert r.add_sequence() == first


def test_freeing_a_slot_twice_never_gives_it_to_two_sequences():
    r = runner(small_model(), max_num_seqs=2)
    slot = r.add_sequence()
    r.free(slot)
    try:
        r.free(slot)
    except (ValueError, RuntimeError):
        return  # refusing the double free is fine too
    assert r.add_sequence() != r.add_sequence()


def test_a_forward_past_max_seq_len_raises_and_changes_no_length():
    r = runner(small_model(), max_num_seqs=2, max_seq_len=16)
    a, b = r.add_sequence(), r.add_sequence()
    feed(r, a, random_tokens(10, seed=30))
    feed(r, b, random_tokens(14, seed=31))
    tokens, n_valid = right_padded([random_tokens(6, seed=32), random_tokens(3, seed=33)])
    with pytest.raises(CacheBudgetError, match="max_seq_len=16"):
        r.forward([a, b], tokens, n_valid)  # a fits exactly; b would need 17
    assert (r.length(a), r.length(b)) == (10, 14)
    feed(r, a, random_tokens(6, seed=32))  # filling a sequence to exactly max_seq_len is allowed
    assert r.length(a) == 16


def test_truncating_to_more_than_the_cached_length_raises_value_error():
    r = runner(small_model())
    slot = r.add_sequence()
    feed(r, slot, random_tokens(5, seed=40))
    with pytest.raises(ValueError):
        r.truncate(slot, 6)
    with pytest.raises(ValueError):
        r.truncate(slot, -1)
    r.truncate(slot, 5)  # a no-op rollback is fine
    assert r.length(slot) == 5
