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

pytestmark = pytest.mark.triton_cpu  # Triton on CPU tensors: interpreter mode (see tests/conftest.py)

BATCH = 8
JUST_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 uniform


def bits(*ints: int) -> torch.Tensor:
    """float32 values from their bit patterns."""
    return torch.tensor(ints, dtype=torch.int32).view(torch.float32)


def exp_noise(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(*shape).exponential_(generator=gen)


def target_probs(batch: int, rows: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, p) [batch, rows, vocab]: a few favoured tokens hold most of the mass, as in text,
    so a drafter that roughly agrees is accepted often and rejected often."""
    logits = 2.0 * torch.randn(batch, rows, vocab, generator=gen)
    favoured = torch.randint(0, vocab, (batch, rows, 4), generator=gen)
    boost = 4.0 + 4.0 * torch.rand(batch, rows, 4, generator=gen)
    logits.scatter_add_(-1, favoured, boost)
    return logits, torch.softmax(logits, dim=-1)


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.int64
        assert torch.equal(g.cpu(), w.cpu()), f"\n triton {g.tolist()}\n torch  {w.tolist()}"


# ---- chain ----------------------------------------------------------------------------------------


def chain_case(k: int, m: int, vocab: int, seed: int, batch: int = BATCH) -> list[torch.Tensor]:
    """verify_chain arguments: random rows, then rows 0-5 set by hand (see set_chain_rows)."""
    gen = torch.Generator().manual_seed(seed)
    logits, p = target_probs(batch, k + 1, vocab, gen)
    target = p.argmax(dim=-1)
    q_dense = torch.softmax(logits[:, :k] + 0.5 * torch.randn(batch, k, vocab, generator=gen), dim=-1)
    q_ids, q_probs = truncate_top_m(q_dense, m)  # [batch, k, m]
    pick = torch.multinomial(q_probs.reshape(-1, m), 1, generator=gen).view(batch, k)
    drafts = q_ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    drafts = torch.where(torch.rand(batch, k, generator=gen) < 0.5, target[:, :k], drafts)
    if m > 1:  # a repeated id: the reference sums its probabilities
        q_ids[..., 1] = torch.where(torch.rand(batch, k, generator=gen) < 0.3, q_ids[..., 0], q_ids[..., 1])
    draft_len = torch.randint(0, k + 1, (batch,), generator=gen)
    greedy = torch.rand(batch, generator=gen) < 0.4
    uniforms = torch.rand(batch, k, generator=gen)
    if k >= 1:
        set_chain_rows(p, target, drafts, draft_len, greedy, uniforms, q_ids, q_probs)
    if m == 1:  # point masses on the drafts, as the n-gram drafter sends (row 4 keeps its 1.25)
        q_ids, q_probs = drafts.unsqueeze(-1).clone(), torch.where(q_probs > 1, q_probs, 1.0)
    return [drafts, draft_len, target, p, q_ids, q_probs, greedy, uniforms, exp_noise(batch, vocab, gen=gen)]


def set_chain_rows(p, target, drafts, draft_len, greedy, uniforms, q_ids, q_probs) -> None:
    """0: sampled, all accepted. 1: sampled, rejected at k // 2. 2: greedy, all accepted.
    3: greedy, rejected at k // 2. 4, 5: sampled, rejected at 0 (see set_sparse_q_rows)."""
    k, j = drafts.shape[1], drafts.shape[1] // 2
    draft_len[:6] = k
    greedy[:6] = torch.tensor([False, False, True, True, False, False])
    drafts[:4] = target[:4, :k]
    uniforms[:2] = 0.0
    drafts[1, j] = p[1, j].argmin()
    q_ids[1, j, 0] = drafts[1, j]
    uniforms[1, j] = 0.999
    drafts[3, j] = (target[3, j] + 1) % p.shape[-1]
    set_sparse_q_rows(p, drafts, uniforms, q_ids, q_probs)


def set_sparse_q_rows(p, drafts, uniforms, q_ids, q_probs) -> None:
    """Row 4: q has 25% more mass than p on each of p's tokens (7, 11), so the residual is all zero
    and the recovered token comes from p. Row 5 (m > 1): q lists token 7 twice, .3 + .3 = .6 > .4 =
    p(7) rejects it (one entry alone would not), and the residual leaves only token 11."""
    m = q_ids.shape[-1]
    p[4:6, 0] = 0.0
    q_probs[4:6, 0] = 0.0
    drafts[4:6, 0], uniforms[4:6, 0] = 7, torch.tensor([0.95, 0.9])
    if m == 1:
        p[4, 0, 7], q_probs[4, 0, 0] = 1.0, 1.25
        return
    p[4, 0, [7, 11]] = 0.5
    q_ids[4, 0, :2], q_probs[4, 0, :2] = torch.tensor([7, 11]), 0.625
    p[5, 0, [7, 11]] = torch.tensor([0.4, 0.6])
    q_ids[5, 0, :2], q_probs[5, 0, :2] = 7, 0.3


def check_chain_rows(k: int, m: int, num: torch.Tensor, nxt: torch.Tensor) -> None:
    """The hand-set rows did what set_chain_rows says, on the reference."""
    assert num[[0, 2]].tolist() == [k, k]
    if k >= 2:
        assert num[[1, 3]].tolist() == [k // 2, k // 2]
    assert num[4] == 0 and nxt[4] in (7, 11)  # sampled from p: the residual is all zero
    if m > 1:
        assert num[5] == 0 and nxt[5] == 11


# (k, m, vocab): m = 1 are the n-gram drafter's point masses
CHAIN_SHAPES = [(1, 1, 1000), (2, 16, 1000), (3, 16, 2048), (4, 16, 5003), (5, 1, 2048), (6, 1, 1000),
                (7, 16, 5003), (8, 1, 5003), (8, 16, 1000)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,m,vocab", CHAIN_SHAPES)
def test_chain_kernel_matches_the_reference_token_for_token(k, m, vocab, seed):
    args = chain_case(k, m, vocab, seed)
    want = verify_chain(*args)
    check_chain_rows(k, m, *want)
    assert_same(verify_chain_triton(*args), want)


@pytest.mark.parametrize("seed", [0, 1])
def test_chain_kernel_without_drafts_emits_the_bonus_token(seed):
    args = chain_case(0, 16, 1000, seed)
    want = verify_chain(*args)
    assert (want[0] == 0).all() and not (want[1] == want[1][0]).all()
    assert_same(verify_chain_triton(*args), want)


def tied_probs(vocab: int) -> torch.Tensor:
    """[8, vocab]: p uniform over tokens in different chunks, in one chunk, in both; then all zero.
    With noise 1 they tie exactly, and torch.argmax takes the smallest token."""
    p = torch.zeros(8, vocab)
    for row, ids in enumerate([[1030, 2100, 3100], [10, 20, 900], [5, 7, 1500, 2900], []] * 2):
        p[row, ids] = 1 / max(len(ids), 1)
    return p


TIE_WINNERS = [1030, 10, 5]


def test_chain_kernel_breaks_argmax_ties_toward_the_smallest_token_like_torch():
    p = tied_probs(5003).unsqueeze(1).repeat(1, 2, 1)  # [8, k+1, vocab]
    three = torch.full((8, 1), 3)  # a draft token p lacks; rows 4-7 reject it
    draft_len = torch.tensor([0] * 4 + [1] * 4)
    args = [three, draft_len, torch.zeros(8, 2, dtype=torch.long), p, three.unsqueeze(-1), torch.ones(8, 1, 1),
            torch.zeros(8, dtype=torch.bool), torch.full((8, 1), 0.5), torch.ones(8, 5003)]
    want = verify_chain(*args)
    assert want[1].tolist() == TIE_WINNERS + [0] + TIE_WINNERS + [0]
    assert_same(verify_chain_triton(*args), want)


def test_chain_kernel_rejects_a_mistyped_argument():
    args = chain_case(2, 16, 1000, 0)
    args[3] = args[3].double()
    with pytest.raises(ValueError, match="p has dtype"):
        verify_chain_triton(*args)


# ---- tree -----------------------------------------------------------------------------------------


def random_parents(batch: int, n: int, shape: str, gen: torch.Generator) -> torch.Tensor:
    """[batch, n] parents: chains or random (bushy) trees, padded to random sizes."""
    parents = torch.full((batch, n), -1)
    for b in range(batch):
        size = int(torch.randint(1, n + 1, (1,), generator=gen))
        for i in range(1, size):
            parents[b, i] = i - 1 if shape == "chain" else int(torch.randint(0, i, (1,), generator=gen))
    return parents


def draw_siblings(logits, target, parents, m, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, q_ids, q_probs): each parent's children drawn without replacement from its sparse q
    (Gumbel-top-b), one of them sometimes forced to the target's argmax; m == 1 gives each node a
    point mass on its own token."""
    batch, n, vocab = logits.shape
    q_ids, q_probs = truncate_top_m(torch.softmax(logits + torch.randn(logits.shape, generator=gen), -1), m)
    if m > 1:  # a repeated id (the reference sums it); siblings may then repeat a token
        q_ids[..., 1] = torch.where(torch.rand(batch, n, generator=gen) < 0.3, q_ids[..., 0], q_ids[..., 1])
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
    """verify_tree arguments: random rows, then rows 0-4 set by hand (see set_tree_rows)."""
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
    """Rows 0-4 are full chains, except that in rows 2-4 the root's first children are siblings."""
    n = parents.shape[1]
    parents[:5] = torch.arange(-1, n - 1)
    parents[2:4, 1:4] = 0
    parents[4, 2] = 0
    greedy[:5] = torch.tensor([False, True, False, False, True])


def set_tree_rows(tokens, target, p, q_ids, q_probs, uniforms) -> None:
    """0: sampled chain, all accepted. 1: greedy chain, all accepted. 2: the root's first child
    rejected, its second accepted only because the test uses the residual's mass R. 3: residuals
    that vanish or have no q left. 4: greedy, two siblings with the target's token: the first wins."""
    tokens[[0, 1, 4], 1:] = target[[0, 1, 4], :-1]
    tokens[4, 2] = target[4, 0]
    q_ids[:2, 1:, 0] = tokens[:2, 1:]
    uniforms[0] = 0.0
    set_residual_mass_row(tokens, p, q_ids, q_probs, uniforms)
    set_rounding_row(tokens, p, q_ids, q_probs, uniforms)


def set_residual_mass_row(tokens, p, q_ids, q_probs, uniforms) -> None:
    """Row 2: p = (.5, .3, .2) on tokens 7, 11, 13. Child 1 (token 7) is rejected and leaves
    r = (0, .2, 0) with R = .2; child 2 (token 11) passes u * q(11) * R <= r(11) * Q, which with
    the stale R = 1 it would fail."""
    p[2, 0] = 0.0
    p[2, 0, [7, 11, 13]] = torch.tensor([0.5, 0.3, 0.2])
    tokens[2, 1:3] = torch.tensor([7, 11])
    if q_ids.shape[-1] == 1:  # point masses: r = (0, .3, .2), R = .5 after child 1
        q_ids[2, 1:3, 0] = tokens[2, 1:3]
        uniforms[2, 1:3] = torch.tensor([0.9, 0.5])
        return
    q_probs[2, 1:4] = 0.0
    q_ids[2, 1:4, :3] = torch.tensor([7, 11, 13])
    q_probs[2, 1:4, :3] = torch.tensor([0.7, 0.1, 0.2])
    uniforms[2, 1:3] = torch.tensor([0.9, 0.8])


def set_rounding_row(tokens, p, q_ids, q_probs, uniforms) -> None:
    """Row 3, m > 1: child 1 (token 7) is rejected by a rounding hair, its residual vanishes and r
    stays p; child 2 (token 11) is rejected and leaves only token 7; child 3 has no q left.
    m == 1: two children with token 3, which p lacks: rejected, then excluded (Q = 0)."""
    p[3, 0] = 0.0
    if q_ids.shape[-1] == 1:
        p[3, 0, [7, 11]] = 0.5
        tokens[3, 1:3] = q_ids[3, 1:3, 0] = 3
        uniforms[3, 1:4] = 0.9999
        return
    p[3, 0, [7, 11]] = bits(1032228449, 1062377051)  # r(7) / R is one hair under q(7) / Q
    q_probs[3, 1:4] = 0.0
    q_ids[3, 1:4, :2] = torch.tensor([7, 11])
    q_probs[3, 1:4, :2] = bits(1032228451, 1062377049)
    tokens[3, 1:4] = torch.tensor([7, 11, 0])
    uniforms[3, 1:4] = torch.tensor([JUST_BELOW_ONE, 0.99, 0.0])


def check_tree_rows(n: int, m: int, path, num, nxt) -> None:
    """The hand-set rows did what set_tree_rows says, on the reference."""
    assert num[:2].tolist() == [n - 1, n - 1]
    assert path[2, :2].tolist() == [0, 2]
    assert num[3] == 0 and nxt[3] in (7, 11)
    if m > 1:
        assert nxt[3] == 7
    assert path[4, :2].tolist() == [0, 1] and num[4] == 1


# (n, m, vocab, shape); n = 64 gives the root more children than q has tokens
TREE_SHAPES = [(8, 16, 1000, "bushy"), (12, 16, 5003, "bushy"), (64, 16, 1000, "bushy"), (6, 1, 1000, "bushy"),
               (8, 1, 5003, "chain"), (8, 16, 1000, "chain")]


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


def test_tree_kernel_breaks_argmax_ties_toward_the_smallest_token_like_torch():
    p = tied_probs(5003).unsqueeze(1).repeat(1, 2, 1)  # [8, n, vocab]
    parents = torch.tensor([[-1, 0]] * 4 + [[-1, -1]] * 4)  # rows 0-3: one child, token 3, rejected
    tokens = torch.full((8, 2), 3)
    args = [tokens, parents, torch.zeros(8, 2, dtype=torch.long), p, tokens.unsqueeze(-1), torch.ones(8, 2, 1),
            torch.zeros(8, dtype=torch.bool), torch.full((8, 2), 0.5), torch.ones(8, 5003)]
    want = verify_tree(*args)
    assert want[2].tolist() == TIE_WINNERS + [0] + TIE_WINNERS + [0]
    assert_same(verify_tree_triton(*args), want)


# ---- GPU --------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_chain_kernel_matches_the_reference_on_cuda_at_full_vocab(m):
    args = [t.cuda() for t in chain_case(8, m, 32_000, seed=0, batch=64)]
    want = verify_chain(*args)
    check_chain_rows(8, m, *want)
    assert_same(verify_chain_triton(*args), want)


@pytest.mark.gpu
@needs_cuda
def test_tree_kernel_matches_the_reference_on_cuda_at_full_vocab():
    args = [t.cuda() for t in tree_case(16, 16, 32_000, "bushy", seed=0, batch=64)]
    want = verify_tree(*args)
    check_tree_rows(16, 16, *want)
    assert_same(verify_tree_triton(*args), want)
