"""verify_tree: hand-built greedy walks, masks and depths, and sampled tree verification keeps p."""

from __future__ import annotations

import torch

from specserve.kernels import tree as tree_module
from specserve.kernels.tree import tree_depth, tree_mask, verify_tree

from .stats import total_variation, tv_bound

#          0 (root)
#        /    \
#       1      2
#      / \     |
#     3   4    5
#     |
#     6
PARENTS = [-1, 0, 0, 1, 1, 2, 3]


def greedy_walk(tokens: list[int], target_argmax: list[int], parents: list[int] = PARENTS):
    n = len(tokens)
    out = verify_tree(torch.tensor([tokens]), torch.tensor([parents]), torch.tensor([target_argmax]),
                      torch.zeros(1, n, 8), torch.zeros(1, n, 1, dtype=torch.long), torch.zeros(1, n, 1),
                      torch.tensor([True]), torch.zeros(1, n), torch.ones(1, 8))
    path, num, nxt = (t[0].tolist() for t in out)
    return [i for i in path if i >= 0], num, nxt


def test_tree_mask_lets_each_node_see_only_itself_and_its_ancestors():
    mask = tree_mask(torch.tensor([PARENTS]))[0]
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert mask[2].nonzero().flatten().tolist() == [0, 2]


def test_tree_mask_keeps_padding_out_of_every_real_row():
    mask = tree_mask(torch.tensor([[-1, 0, 1, -1, -1]]))[0]
    assert mask[3].nonzero().flatten().tolist() == [3]
    assert not mask[:3, 3:].any()


def test_tree_depth_counts_edges_from_the_root():
    assert tree_depth(torch.tensor([PARENTS]))[0].tolist() == [0, 1, 1, 2, 2, 2, 3]


def test_greedy_walk_follows_the_second_sibling_when_the_target_prefers_it():
    # target argmax after root = 20 (node 2), after node 2 = 50 (node 5), after node 5 = 99
    tokens = [0, 10, 20, 30, 40, 50, 60]
    target = [20, 0, 50, 0, 0, 99, 0]
    assert greedy_walk(tokens, target) == ([0, 2, 5], 2, 99)


def test_greedy_walk_takes_the_deepest_agreeing_branch_and_the_bonus_token():
    tokens = [0, 10, 20, 30, 40, 50, 60]
    target = [10, 30, 0, 60, 0, 0, 77]
    assert greedy_walk(tokens, target) == ([0, 1, 3, 6], 3, 77)


def test_greedy_walk_with_no_matching_child_emits_the_target_token():
    tokens = [0, 10, 20, 30, 40, 50, 60]
    assert greedy_walk(tokens, [11, 0, 0, 0, 0, 0, 0]) == ([0], 0, 11)


def test_a_chain_is_verified_like_a_chain():
    tokens, parents = [0, 5, 7, 2], [-1, 0, 1, 2]
    assert greedy_walk(tokens, [5, 7, 3, 0], parents) == ([0, 1, 2], 2, 3)


# ---- sampled trees keep the target distribution ----------------------------------------------------

VOCAB = 6
SAMPLES = 30_000


def sampled_pairs(verify, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Emitted (first, second) tokens of many sampled tree verifications, and their exact law.

    The 'target' is a bigram table: p after token t is P[t], and p0 at the root. The tree has
    three children of the root drawn without replacement from q0 (the drafter's Gumbel-top-3),
    and one grandchild under the first child drawn from q1. Every step emits at least one token;
    when it emits two, the pair must follow p0(a) P[a](b); the first token alone must follow p0.
    """
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.softmax(1.5 * torch.randn(VOCAB, generator=gen), -1)
    table = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=gen), -1)
    q0 = torch.softmax(1.5 * torch.randn(VOCAB, generator=gen), -1)
    q1 = torch.softmax(torch.randn(VOCAB, generator=gen), -1)
    parents = torch.tensor([-1, 0, 0, 0, 1]).expand(SAMPLES, 5)
    children = torch.argsort(q0 / torch.empty(SAMPLES, VOCAB).exponential_(generator=gen), dim=-1, descending=True)[:, :3]
    grandchild = torch.multinomial(q1, SAMPLES, replacement=True, generator=gen)
    tokens = torch.cat([torch.zeros(SAMPLES, 1, dtype=torch.long), children, grandchild.unsqueeze(1)], dim=1)
    p = torch.cat([p0.expand(SAMPLES, 1, VOCAB), table[tokens[:, 1:]]], dim=1)  # [samples, 5, vocab]
    ids = torch.arange(VOCAB).expand(SAMPLES, 5, VOCAB)
    q = torch.stack([q0, q0, q0, q0, q1]).expand(SAMPLES, 5, VOCAB)
    path, num, nxt = verify(tokens, parents, torch.zeros_like(tokens), p, ids, q, torch.zeros(SAMPLES, dtype=torch.bool),
                            torch.rand(SAMPLES, 5, generator=gen), torch.empty(SAMPLES, VOCAB).exponential_(generator=gen))
    first = torch.where(num >= 1, tokens.gather(1, path[:, 1:2].clamp(min=0)).squeeze(1), nxt)
    second = torch.where(num >= 2, tokens.gather(1, path[:, 2:3].clamp(min=0)).squeeze(1), nxt)
    pairs = torch.where(num >= 1, first * VOCAB + second, -1)
    law_first, law_pair = p0, (p0.unsqueeze(1) * table).flatten()
    return (first, law_first), (pairs, law_pair)


def test_sampled_tree_verification_emits_tokens_distributed_as_the_target():
    (first, law_first), (pairs, law_pair) = sampled_pairs(verify_tree)
    assert total_variation(first, law_first) < tv_bound(VOCAB, SAMPLES)
    two = pairs[pairs >= 0]
    # given a first token accepted from the tree, the second follows P[first]; reweight by p0
    seen = torch.bincount(two, minlength=VOCAB * VOCAB).double().view(VOCAB, VOCAB)
    conditional = seen / seen.sum(dim=1, keepdim=True).clamp(min=1)
    expected = law_pair.view(VOCAB, VOCAB) / law_first.unsqueeze(1)
    weights = seen.sum(dim=1) / seen.sum()
    tv = 0.5 * ((conditional - expected.double()).abs().sum(dim=1) * weights).sum().item()
    assert tv < tv_bound(VOCAB, len(two))


def walk_without_residual(tokens, p, q_ids, q_probs, uniforms, noise, kids):
    """A biased tree sampler: rejected siblings' mass is never taken out of r."""
    path, cur = [0], 0
    while True:
        r = p[cur]
        for i in kids[cur]:
            x = int(tokens[i])
            q = torch.zeros_like(r).scatter_add_(0, q_ids[i], q_probs[i])
            if uniforms[i] * q[x] <= r[x]:
                break
        else:
            return path, int(torch.argmax(r / noise))
        path.append(i)
        cur = i


def test_sampled_tree_verification_without_the_residual_update_is_caught(monkeypatch):
    monkeypatch.setattr(tree_module, "_walk_sampled", walk_without_residual)
    (first, law_first), _ = sampled_pairs(verify_tree)
    assert total_variation(first, law_first) > tv_bound(VOCAB, SAMPLES)
