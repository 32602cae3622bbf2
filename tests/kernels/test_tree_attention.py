"""Tree attention: the reference against a per-row softmax, the Triton kernel against the reference.

On a CPU the Triton kernel runs in interpreter mode (tests/conftest.py), so sizes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch

from specserve.kernels.tree import tree_depth, tree_mask
from specserve.kernels.tree_attention import tree_attention_reference

pytestmark = pytest.mark.triton_cpu  # Triton on CPU tensors: interpreter mode (see tests/conftest.py)

triton_attention = pytest.importorskip("specserve.kernels.triton_attention")
tree_attention_triton = triton_attention.tree_attention_triton

CAPACITY = 96
NUM_SLOTS = 5


def random_parents(batch: int, n: int, valid: list[int], gen: torch.Generator) -> torch.Tensor:
    """Random trees (parent < child); positions past valid[b] are padding.  # [batch, n]"""
    parents = torch.full((batch, n), -1, dtype=torch.long)
    for b in range(batch):
        for i in range(1, valid[b]):
            parents[b, i] = int(torch.randint(0, i, (1,), generator=gen))
    return parents


def make_case(prefix: list[int], n: int, heads: int, kv_heads: int, head_dim: int = 16, tree: bool = True,
              dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
              num_slots: int = NUM_SLOTS, capacity: int = CAPACITY) -> dict:
    """Arguments of a tree attention call; slots out of order, rows of the cache filled at random."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(prefix)
    prefix_len = torch.tensor(prefix, dtype=torch.long)
    if tree:
        parents = random_parents(batch, n, [n - b % 2 for b in range(batch)], gen)  # odd rows padded
        block, positions = tree_mask(parents), prefix_len.unsqueeze(1) + tree_depth(parents)
    else:
        block, positions = torch.ones(n, n, dtype=torch.bool).tril().expand(batch, n, n), None
    cache = lambda: torch.randn(num_slots, capacity, kv_heads, head_dim, generator=gen).to(dtype)
    args = dict(query=torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype), k_cache=cache(),
                v_cache=cache(), slots=torch.randperm(num_slots, generator=gen)[:batch],
                prefix_len=prefix_len, block_mask=block, scale=1 / math.sqrt(head_dim), positions=positions)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def per_row_softmax(query, k_cache, v_cache, slots, prefix_len, block_mask, scale, positions=None, window=None):
    """The definition, one query at a time: softmax over the listed visible keys."""
    batch, heads, n, head_dim = query.shape
    groups = heads // k_cache.shape[2]
    out = torch.zeros(batch, n, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        pre, slot = int(prefix_len[b]), int(slots[b])
        pos = [pre + j for j in range(n)] if positions is None else positions[b].tolist()
        for i in range(n):
            keys = [(c, c) for c in range(pre)] + [(pre + j, pos[j]) for j in range(n) if block_mask[b, i, j]]
            if window is not None:
                keys = [(c, kp) for c, kp in keys if kp > pos[i] - window]
            idx = torch.tensor([c for c, _ in keys])
            for h in range(heads):
                k = k_cache[slot, idx, h // groups].double()  # [keys, head_dim]
                v = v_cache[slot, idx, h // groups].double()
                weights = torch.softmax(k @ query[b, h, i].double() * scale, dim=0)
                out[b, i, h] = weights @ v
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "chain"])
def test_reference_equals_a_per_row_softmax_over_the_visible_keys(tree, window):
    case = make_case([5, 0, 2], n=4, heads=4, kv_heads=2, tree=tree, seed=1)
    got = tree_attention_reference(**case, window=window)
    want = per_row_softmax(**case, window=window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


# prefix 70 spans two key tiles of the kernel's prefix pass; 0 has no prefix at all
PREFIXES = [70, 0, 13]


@pytest.mark.parametrize("window", [None, 5, 20])  # 5 skips the first key tile of the 70-row
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "chain"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_triton_equals_the_reference_in_float32(heads, kv_heads, tree, window):
    case = make_case(PREFIXES, n=6, heads=heads, kv_heads=kv_heads, tree=tree, seed=2)
    got = tree_attention_triton(**case, window=window)
    want = tree_attention_reference(**case, window=window)
    assert got.shape == want.shape == (3, 6, heads, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_triton_folds_many_query_heads_per_kv_head_into_several_query_tiles():
    # 8 heads on 1 kv head with n = 12: 96 folded rows, two tiles of 64
    case = make_case([40, 3], n=12, heads=8, kv_heads=1, head_dim=32, seed=3)
    torch.testing.assert_close(tree_attention_triton(**case), tree_attention_reference(**case), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_equals_the_reference_in_half_precision(dtype):
    case = make_case(PREFIXES, n=5, heads=4, kv_heads=2, dtype=dtype, seed=4)
    got = tree_attention_triton(**case)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), tree_attention_reference(**case).float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("impl", [tree_attention_reference, tree_attention_triton], ids=["torch", "triton"])
def test_entries_no_query_may_see_do_not_change_the_output(impl):
    case = make_case(PREFIXES, n=6, heads=4, kv_heads=2, seed=5)
    before = impl(**case, window=40)
    hidden = torch.ones(NUM_SLOTS, CAPACITY, dtype=torch.bool)  # [slot, cache index] nobody may read
    for slot, pre in zip(case["slots"].tolist(), case["prefix_len"].tolist()):
        hidden[slot, : pre + 6] = False
    for cache in (case["k_cache"], case["v_cache"]):
        cache[hidden] = 100.0  # other slots and stale entries past prefix + n
    torch.testing.assert_close(impl(**case, window=40), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [tree_attention_reference, tree_attention_triton], ids=["torch", "triton"])
def test_the_block_mask_and_the_window_change_the_output(impl):
    # guards the tests above: were the mask or window ignored by both sides, they would prove nothing
    case = make_case([20, 4], n=6, heads=4, kv_heads=2, seed=6)
    tree_out, windowed = impl(**case), impl(**case, window=4)
    case["block_mask"] = torch.ones(2, 6, 6, dtype=torch.bool).tril().expand(2, 6, 6)
    assert (impl(**case) - tree_out).abs().max() > 1e-2
    assert (windowed - tree_out).abs().max() > 1e-2


@pytest.mark.parametrize("head_dim", [8, 24, 80])
def test_triton_pads_a_head_dim_that_is_not_a_power_of_two(head_dim):
    case = make_case([30, 5], n=6, heads=4, kv_heads=2, head_dim=head_dim, seed=7)
    torch.testing.assert_close(tree_attention_triton(**case), tree_attention_reference(**case), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "chain"])
def test_triton_equals_the_reference_on_cuda_at_serving_sizes(tree, window):
    prefix = [1000 - 37 * b for b in range(16)]  # 1000 .. 445: rows end in different key tiles
    case = make_case(prefix, n=16, heads=32, kv_heads=8, head_dim=128, tree=tree, dtype=torch.bfloat16,
                     seed=7, device="cuda", num_slots=20, capacity=1100)
    got = tree_attention_triton(**case, window=window)
    torch.testing.assert_close(got.float(), tree_attention_reference(**case, window=window).float(),
                               atol=2e-2, rtol=0)
