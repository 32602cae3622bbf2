"""KV compaction after a tree step: hand-computed moves, Triton against the reference, and a
compacted cache equal to one that prefilled the accepted path as a plain chain."""

from __future__ import annotations

import pytest
import torch

from specserve.kernels.compaction import compact_kv_reference
from specserve.kernels.tree import tree_depth, tree_mask

from ..actors.engine.tiny import build_model, family_config, runner

pytestmark = pytest.mark.triton_cpu  # Triton on CPU tensors: interpreter mode (see tests/conftest.py)

triton_compaction = pytest.importorskip("specserve.kernels.triton_compaction")
compact_kv_triton = triton_compaction.compact_kv_triton

IMPLS = pytest.mark.parametrize("compact", [compact_kv_reference, compact_kv_triton], ids=["torch", "triton"])


def numbered_cache(num_slots: int = 4, capacity: int = 12, kv_heads: int = 2, head_dim: int = 3,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every element distinct, so any wrong move shows.  # [num_slots, capacity, kv_heads, head_dim]"""
    return torch.arange(num_slots * capacity * kv_heads * head_dim).reshape(num_slots, capacity, kv_heads,
                                                                            head_dim).to(dtype)


def compacted(compact, slots, prefix, path, **cache_kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original keys, compacted keys, compacted values) of numbered caches."""
    k = numbered_cache(**cache_kw)
    v = -numbered_cache(**cache_kw)
    original = k.clone()
    compact(k, v, torch.tensor(slots), torch.tensor(prefix), torch.tensor(path))
    return original, k, v


@IMPLS
def test_an_overlapping_path_moves_each_node_to_its_depth_in_hand_computed_order(compact):
    # row 0 (slot 2, prefix 3): path [0, 2, 3] moves block 2 -> 1 and 3 -> 2 (block 2 is both a
    # source and a destination); row 1 (slot 0, prefix 1): path [0, 3] moves block 3 -> 1
    slots, prefix, path = [2, 0], [3, 1], [[0, 2, 3, -1], [0, 3, -1, -1]]
    original, k, v = compacted(compact, slots, prefix, path)
    want = original.clone()
    want[2, 4], want[2, 5] = original[2, 5], original[2, 6]
    want[0, 2] = original[0, 4]
    assert torch.equal(k, want)
    assert torch.equal(v, -want)


@IMPLS
def test_a_chain_path_and_a_root_only_path_move_nothing(compact):
    original, k, v = compacted(compact, [1, 3], [2, 0], [[0, 1, 2, 3], [0, -1, -1, -1]])
    assert torch.equal(k, original) and torch.equal(v, -original)


def random_paths(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Strictly increasing paths from 0 of random lengths, padded with -1.  # [batch, n]"""
    path = torch.full((batch, n), -1, dtype=torch.long)
    for b in range(batch):
        length = int(torch.randint(1, n + 1, (1,), generator=gen))
        rest = torch.randperm(n - 1, generator=gen)[: length - 1].sort().values + 1
        path[b, :length] = torch.cat([torch.zeros(1, dtype=torch.long), rest])
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_the_reference_on_random_paths_and_touches_nothing_else(dtype):
    gen = torch.Generator().manual_seed(0)
    batch, n, num_slots, capacity = 5, 8, 7, 40
    shape = (num_slots, capacity, 2, 16)
    k0, v0 = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    slots = torch.randperm(num_slots, generator=gen)[:batch]
    prefix = torch.tensor([0, 9, 31, 5, 17])
    path = random_paths(batch, n, gen)
    k_ref, v_ref, k_tri, v_tri = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    compact_kv_reference(k_ref, v_ref, slots, prefix, path)
    compact_kv_triton(k_tri, v_tri, slots, prefix, path)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    moved = torch.zeros(num_slots, capacity, dtype=torch.bool)  # [slot, cache index] of a destination
    for b in range(batch):
        length, row = int((path[b] >= 0).sum()), slots[b]
        moved[row, prefix[b] : prefix[b] + length] = True
        assert torch.equal(k_ref[row, prefix[b] + torch.arange(length)], k0[row, prefix[b] + path[b, :length]])
    assert torch.equal(k_ref[~moved], k0[~moved]) and torch.equal(v_ref[~moved], v0[~moved])
    assert not torch.equal(k_ref, k0)  # the random paths did move something


def test_triton_copies_entries_wider_than_one_chunk():
    # 8 kv heads x 256 = 2048 elements per entry: two programs per row
    shape = (3, 10, 8, 256)
    k, v = torch.randn(shape), torch.randn(shape)
    args = (torch.tensor([2, 0]), torch.tensor([1, 4]), torch.tensor([[0, 2, 5], [0, 1, 3]]))
    k_ref, v_ref = k.clone(), v.clone()
    compact_kv_reference(k_ref, v_ref, *args)
    compact_kv_triton(k, v, *args)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


# ---- a compacted tree step equals a prefill of the accepted path ---------------------------------------

#          0
#        / | \
#       1  2  3
#       |  |\
#       4  5 6
#          |
#          7
PARENTS = [-1, 0, 0, 0, 1, 2, 2, 5]


@IMPLS
def test_compacting_a_tree_step_leaves_the_cache_of_a_prefill_of_the_accepted_path(compact):
    model = build_model(family_config("llama"), seed=0)
    gen = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(0, 96, (length,), generator=gen) for length in (5, 2)]
    nodes = torch.randint(0, 96, (2, len(PARENTS)), generator=gen)  # [batch, n]
    paths = [[0, 2, 5, 7], [0, 3]]  # deep and overlapping; short
    tree = runner(model)
    slots = [tree.add_sequence() for _ in prefixes]
    for slot, prefix in zip(slots, prefixes):
        tree.forward([slot], prefix.unsqueeze(0))
    parents = torch.tensor([PARENTS, PARENTS])
    tree.forward(slots, nodes, block=tree_mask(parents), depth=tree_depth(parents))
    path = torch.tensor([p + [-1] * (len(PARENTS) - len(p)) for p in paths])
    prefix_len = torch.tensor([len(p) for p in prefixes])
    for keys, values in zip(tree.cache.keys, tree.cache.values):
        compact(keys, values, torch.tensor(slots), prefix_len, path)
    chain = runner(model)
    for b, (slot, prefix, p) in enumerate(zip(slots, prefixes, paths)):
        tree.truncate(slot, len(prefix) + len(p))
        fresh = chain.add_sequence()
        chain.forward([fresh], torch.cat([prefix, nodes[b, p]]).unsqueeze(0))
        length = chain.length(fresh)
        assert tree.length(slot) == length
        for layer in range(len(chain.cache.keys)):
            torch.testing.assert_close(tree.cache.keys[layer][slot, :length], chain.cache.keys[layer][fresh, :length],
                                       atol=1e-10, rtol=0)
            torch.testing.assert_close(tree.cache.values[layer][slot, :length],
                                       chain.cache.values[layer][fresh, :length], atol=1e-10, rtol=0)
        # and decoding goes on identically from the compacted cache
        nxt = torch.tensor([[7]])
        torch.testing.assert_close(tree.forward([slot], nxt), chain.forward([fresh], nxt), atol=1e-10, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_equals_the_reference_on_cuda_at_serving_sizes():
    gen = torch.Generator().manual_seed(2)
    shape = (20, 1100, 8, 128)
    k = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    slots = torch.randperm(20, generator=gen)[:16].cuda()
    prefix = torch.randint(0, 1000, (16,), generator=gen).cuda()
    path = random_paths(16, 16, gen).cuda()
    k_ref, v_ref = k.clone(), v.clone()
    compact_kv_reference(k_ref, v_ref, slots, prefix, path)
    compact_kv_triton(k, v, slots, prefix, path)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
