"""The fused Triton samplers equal their torch references token for token (same random numbers).

On the CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py). Every batch mixes
random rows with hand-set ones whose outcome the test first checks on the reference: full accepts,
a rejection mid-block, a recovered token after a rejected sibling, and residuals that vanish.
"""

from __future__ import annotations

import pytest
import torch

from specserve.kernels.sampling import truncate_top_m
from specserve.kernels.tree import verify_tree
from specserve.kernels.verify import verify_chain

pytest.importorskip("triton")
from specserve.kernels.triton_sampling import verify_chain_triton, verify_tree_triton  # noqa: E402

BATCH = 8
JUST_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 uniform


def bits(*ints: int) -> torch.Tensor:
    """float32 values from their bit patterns."""
    return torch.tensor(ints, dtype=torch.int32).view(torch.float32)


def exp_noise(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(*shape).exponential_(generator=gen)


def target_probs(batch: int, rows: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, p) [batch, rows, vocab]: half the rows flat, half peaked (long accepted runs)."""
    scale = torch.where(torch.rand(batch, 1, 1, generator=gen) < 0.5, 1.0, 4.0)
    logits = scale * torch.randn(batch, rows, vocab, generator=gen)
    return logits, torch.softmax(logits, dim=-1)


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.int64
        assert torch.equal(g.cpu(), w.cpu()), f"\n triton {g.tolist()}\n torch  {w.tolist()}"


# ---- chain ----------------------------------------------------------------------------------------


def chain_case(k: int, m: int, vocab: int, seed: int, batch: int = BATCH) -> list[torch.Tensor]:
    """verify_chain arguments: random rows, then rows 0-4 set by hand (see check_chain_rows)."""
    gen = torch.Generator().manual_seed(seed)
    logits, p = target_probs(batch, k + 1, vocab, gen)
    target = p.argmax(dim=-1)
    q_dense = torch.softmax(logits[:, :k] + 0.5 * torch.randn(batch, k, vocab, generator=gen), dim=-1)
    q_ids, q_probs = truncate_top_m(q_dense, m)  # [batch, k, m]
    pick = torch.multinomial(q_probs.reshape(-1, m), 1, generator=gen).view(batch, k)
    drafts = q_ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    drafts = torch.where(torch.rand(batch, k, generator=gen) < 0.5, target[:, :k], drafts)
    if m > 1:  # a repeated id: the reference sums its probabilities
        dup = torch.rand(batch, k, generator=gen) < 0.3
        q_ids[..., -1] = torch.where(dup, q_ids[..., 0], q_ids[..., -1])
    draft_len = torch.randint(0, k + 1, (batch,), generator=gen)
    greedy = torch.rand(batch, generator=gen) < 0.4
    uniforms = torch.rand(batch, k, generator=gen)
    if k >= 1:
        set_chain_rows(p, target, drafts, draft_len, greedy, uniforms, q_ids, q_probs)
    if m == 1:  # point masses on the drafts, as the n-gram drafter sends
        q_ids, q_probs = drafts.unsqueeze(-1).clone(), torch.where(q_probs > 1, q_probs, 1.0)
    return [drafts, draft_len, target, p, q_ids, q_probs, greedy, uniforms, exp_noise(batch, vocab, gen=gen)]


def set_chain_rows(p, target, drafts, draft_len, greedy, uniforms, q_ids, q_probs) -> None:
    """0: sampled, all accepted. 1: sampled, rejected at k // 2. 2: greedy, all accepted.
    3: greedy, rejected at k // 2. 4: sampled, rejected where q covers p: no residual mass."""
    k, j = drafts.shape[1], drafts.shape[1] // 2
    draft_len[:5] = k
    greedy[:5] = torch.tensor([False, False, True, True, False])
    drafts[:4] = target[:4, :k]
    uniforms[:2] = 0.0
    drafts[1, j] = p[1, j].argmin()
    q_ids[1, j, 0] = drafts[1, j]
    uniforms[1, j] = 0.999
    drafts[3, j] = (target[3, j] + 1) % p.shape[-1]
    t1, t2 = 7, 11
    p[4, 0] = 0.0
    p[4, 0, t1], p[4, 0, t2] = (1.0, 0.0) if q_ids.shape[-1] == 1 else (0.5, 0.5)
    both = min(2, q_ids.shape[-1])  # q has 25% more mass than p on each of p's tokens
    q_probs[4, 0] = 0.0
    q_ids[4, 0, :both], q_probs[4, 0, :both] = torch.tensor([t1, t2])[:both], 1.25 * p[4, 0, [t1, t2]][:both]
    drafts[4, 0], uniforms[4, 0] = t1, 0.95


def check_chain_rows(k: int, num: torch.Tensor, nxt: torch.Tensor) -> None:
    """The hand-set rows did what set_chain_rows says, on the reference."""
    assert num[[0, 2]].tolist() == [k, k]
    if k >= 2:
        assert num[[1, 3]].tolist() == [k // 2, k // 2]
    assert num[4] == 0 and nxt[4] in (7, 11)  # sampled from p: the residual is all zero


CHAIN_SHAPES = [(1, 1, 1000), (2, 16, 1000), (4, 16, 5003), (8, 1, 5003), (8, 16, 1000), (5, 1, 2048)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,m,vocab", CHAIN_SHAPES)
def test_chain_kernel_matches_the_reference_token_for_token(k, m, vocab, seed):
    args = chain_case(k, m, vocab, seed)
    want = verify_chain(*args)
    check_chain_rows(k, *want)
    assert_same(verify_chain_triton(*args), want)


@pytest.mark.parametrize("seed", [0, 1])
def test_chain_kernel_without_drafts_emits_the_bonus_token(seed):
    args = chain_case(0, 16, 1000, seed)
    want = verify_chain(*args)
    assert (want[0] == 0).all() and not (want[1] == want[1][0]).all()
    assert_same(verify_chain_triton(*args), want)


def test_chain_kernel_rejects_a_mistyped_argument():
    args = chain_case(2, 16, 1000, 0)
    args[3] = args[3].double()
    with pytest.raises(ValueError, match="p has dtype"):
        verify_chain_triton(*args)


# ---- tree -----------------------------------------------------------------------------------------


def random_parents(batch: int, n: int, shape: str, gen: torch.Generator) -> torch.Tensor:
    """[batch, n] parents: chains or random (bushy) trees; rows from 4 on are padded to random sizes."""
    parents = torch.full((batch, n), -1)
    for b in range(batch):
        size = n if b < 4 else int(torch.randint(1, n + 1, (1,), generator=gen))
        for i in range(1, size):
            parents[b, i] = i - 1 if shape == "chain" else int(torch.randint(0, i, (1,), generator=gen))
    return parents


def draw_siblings(logits, target, parents, m, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, q_ids, q_probs): each parent's children drawn without replacement from its sparse q
    (Gumbel-top-b), one of them sometimes forced to the target's argmax; m == 1 gives each node a
    point mass on its own token."""
    batch, n, vocab = logits.shape
    q_ids, q_probs = truncate_top_m(torch.softmax(logits + 0.5 * torch.randn(logits.shape, generator=gen), -1), m)
    tokens = torch.randint(0, vocab, (batch, n), generator=gen)
    node_ids, node_probs = q_ids.clone(), q_probs.clone()
    for b in range(batch):
        for j in range(n):
            kids = (parents[b] == j).nonzero().flatten().tolist()
            order = torch.argsort(q_probs[b, j] / exp_noise(m, gen=gen), descending=True)
            for t, i in enumerate(kids):
                if t < m:  # past the q's support the drafter proposed unrelated tokens
                    tokens[b, i] = q_ids[b, j, order[t]]
                node_ids[b, i], node_probs[b, i] = q_ids[b, j], q_probs[b, j]
            if kids and float(torch.rand(1, generator=gen)) < 0.5 and target[b, j] not in tokens[b, kids]:
                tokens[b, kids[int(torch.randint(0, len(kids), (1,), generator=gen))]] = target[b, j]
    if m == 1:
        node_ids, node_probs = tokens.unsqueeze(-1).clone(), torch.ones(batch, n, 1)
    return tokens, node_ids, node_probs


def tree_case(n: int, m: int, vocab: int, shape: str, seed: int, batch: int = BATCH) -> list[torch.Tensor]:
    """verify_tree arguments: random rows, then rows 0-3 set by hand (see check_tree_rows)."""
    gen = torch.Generator().manual_seed(seed)
    logits, p = target_probs(batch, n, vocab, gen)
    target = p.argmax(dim=-1)
    parents = random_parents(batch, n, shape, gen)
    greedy = torch.rand(batch, generator=gen) < 0.4
    if n >= 4:
        set_tree_parents(parents, greedy)
    tokens, q_ids, q_probs = draw_siblings(logits, target, parents, m, gen)
    uniforms = torch.rand(batch, n, generator=gen)
    if n >= 4:
        set_tree_rows(tokens, target, p, q_ids, q_probs, uniforms)
    return [tokens, parents, target, p, q_ids, q_probs, greedy, uniforms, exp_noise(batch, vocab, gen=gen)]


def set_tree_parents(parents: torch.Tensor, greedy: torch.Tensor) -> None:
    """Rows 0 and 1 are full chains; rows 2 and 3 give the root three children."""
    n = parents.shape[1]
    parents[:4] = torch.arange(-1, n - 1)
    parents[2:4, 1:4] = 0
    greedy[:4] = torch.tensor([False, True, False, False])


def set_tree_rows(tokens, target, p, q_ids, q_probs, uniforms) -> None:
    """0: sampled chain, all accepted. 1: greedy chain, all accepted. 2: the root's first child
    rejected, its second accepted. 3: the first child rejected by a rounding hair, so the residual
    vanishes and r stays p; m == 1: two children with the same token, the second has q_j = 0."""
    n, m = tokens.shape[1], q_ids.shape[-1]
    tokens[:2, 1:] = target[:2, :-1]
    q_ids[:2, 1:, 0] = tokens[:2, 1:]
    uniforms[0] = 0.0
    tokens[2, 1], tokens[2, 2] = p[2, 0].argmin(), target[2, 0]
    if m == 1:
        q_ids[2, 1:3, 0] = tokens[2, 1:3]
    else:  # siblings share the root's q, which holds both tokens
        q_ids[2, 1:4, 0], q_ids[2, 1:4, -1] = tokens[2, 1], tokens[2, 2]
        q_probs[2, 1:4, -1] = q_probs[2, 1:4, 0] / 2
    uniforms[2, 1:3] = torch.tensor([0.9999, 0.0])
    t1, t2 = 7, 11
    p[3, 0] = 0.0
    if m == 1:  # token 3 has no target mass: rejected, then excluded for the second child
        p[3, 0, [t1, t2]] = 0.5
        tokens[3, 1:3] = q_ids[3, 1:3, 0] = 3
        uniforms[3, 1:4] = 0.9999
        return
    p[3, 0, [t1, t2]] = bits(1032228449, 1062377051)  # r(t1) / R is one hair under q(t1) / Q
    q_ids[3, 1:4, :2], q_probs[3, 1:4] = torch.tensor([t1, t2]), 0.0
    q_probs[3, 1:4, :2] = bits(1032228451, 1062377049)
    tokens[3, 1:4] = torch.tensor([t1, t2, 0])
    uniforms[3, 1:4] = torch.tensor([JUST_BELOW_ONE, 0.99, 0.0])


def check_tree_rows(n: int, m: int, path, num, nxt) -> None:
    """The hand-set rows did what set_tree_rows says, on the reference."""
    assert num[:2].tolist() == [n - 1, n - 1]
    assert path[2, 1] == 2
    assert num[3] == 0 and nxt[3] in (7, 11)
    if m > 1:  # kept r = p at the first child; the second child took t2's mass out: only t1 is left
        assert nxt[3] == 7


TREE_SHAPES = [(8, 16, 1000, "bushy"), (12, 16, 5003, "bushy"), (6, 1, 1000, "bushy"), (8, 1, 5003, "chain"),
               (8, 16, 1000, "chain")]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,m,vocab,shape", TREE_SHAPES)
def test_tree_kernel_matches_the_reference_token_for_token(n, m, vocab, shape, seed):
    args = tree_case(n, m, vocab, shape, seed)
    want = verify_tree(*args)
    check_tree_rows(n, m, *want)
    assert_same(verify_tree_triton(*args), want)


def test_tree_kernel_on_a_root_only_block_samples_from_p():
    args = tree_case(1, 16, 1000, "chain", 0)
    want = verify_tree(*args)
    assert (want[1] == 0).all()
    assert_same(verify_tree_triton(*args), want)


# ---- GPU --------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_chain_kernel_matches_the_reference_on_cuda_at_full_vocab(m):
    args = [t.cuda() for t in chain_case(8, m, 32_000, seed=0, batch=64)]
    want = verify_chain(*args)
    check_chain_rows(8, *want)
    assert_same(verify_chain_triton(*args), want)


@pytest.mark.gpu
@needs_cuda
def test_tree_kernel_matches_the_reference_on_cuda_at_full_vocab():
    args = [t.cuda() for t in tree_case(16, 16, 32_000, "bushy", seed=0, batch=64)]
    want = verify_tree(*args)
    check_tree_rows(16, 16, *want)
    assert_same(verify_tree_triton(*args), want)
