"""verify_greedy and verify_sampled: hand-built cases, and speculative sampling leaves the output as p."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.kernels.sampling import sample_from, sparse_to_dense, truncate_top_m
from specserve.kernels.verify import verify_greedy, verify_sampled

from .stats import total_variation, tv_bound


def exp_noise(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(*shape).exponential_(generator=gen)


def random_probs(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(2 * torch.randn(*shape, generator=gen), dim=-1)


def greedy(target: list[list[int]], draft: list[list[int]], draft_len: list[int]):
    """verify_greedy on plain lists: ([num_accepted per row], [next_token per row])."""
    result = verify_greedy(torch.tensor(target), torch.tensor(draft), torch.tensor(draft_len))
    return tuple(t.tolist() for t in result)


# ---- greedy -------------------------------------------------------------------------------------

TARGET = [5, 7, 2, 9]  # the target's argmax at draft positions 1..3, then after the last draft


def test_verify_greedy_accepts_all_matching_drafts_and_emits_the_bonus():
    assert greedy([TARGET], [[5, 7, 2]], [3]) == ([3], [9])


def test_verify_greedy_replaces_a_wrong_first_draft_with_the_target_token():
    assert greedy([TARGET], [[4, 7, 2]], [3]) == ([0], [5])


def test_verify_greedy_stops_at_the_first_mismatch_even_if_later_drafts_match():
    assert greedy([TARGET], [[5, 1, 2]], [3]) == ([1], [7])


def test_verify_greedy_never_accepts_padding_past_draft_len():
    # the padding happens to equal the target's tokens; it must still not be accepted
    assert greedy([TARGET], [[5, 7, 2]], [1]) == ([1], [7])


def test_verify_greedy_with_no_drafts_is_a_plain_decoding_step():
    assert greedy([TARGET], [[5, 7, 2]], [0]) == ([0], [5])


def test_verify_greedy_treats_each_row_of_a_batch_on_its_own():
    targets = [TARGET] * 5 + [[3, 3, 8, 6]]
    drafts = [[5, 7, 2], [4, 7, 2], [5, 1, 2], [5, 7, 2], [5, 7, 2], [3, 3, 3]]
    draft_len = [3, 3, 3, 1, 0, 2]
    assert greedy(targets, drafts, draft_len) == ([3, 0, 1, 1, 0, 2], [9, 5, 7, 7, 5, 8])


# ---- sampled: hand-built ------------------------------------------------------------------------


def test_verify_sampled_accepts_every_draft_when_q_equals_p_and_samples_the_bonus_from_the_last_p():
    gen = torch.Generator().manual_seed(10)
    batch, k, vocab = 500, 3, 7
    p = random_probs(batch, k + 1, vocab, gen=gen)  # [batch, k+1, vocab]
    q = p[:, :k].clone()  # [batch, k, vocab]
    drafts = sample_from(q, exp_noise(batch, k, vocab, gen=gen))  # [batch, k]
    uniforms = torch.rand(batch, k, generator=gen)
    uniforms[0] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))  # the largest float below 1
    noise = exp_noise(batch, vocab, gen=gen)
    num_accepted, next_token = verify_sampled(p, q, drafts, torch.full((batch,), k), uniforms, noise)
    assert (num_accepted == k).all()
    assert torch.equal(next_token, sample_from(p[:, k], noise))


def test_verify_sampled_rejects_a_draft_the_target_gives_zero_probability_and_never_recovers_it():
    gen = torch.Generator().manual_seed(11)
    batch, k, vocab = 2000, 3, 6
    p = random_probs(batch, k + 1, vocab, gen=gen)
    q = p[:, :k].clone()  # d_1 and d_2 always pass their accept test ...
    q[:, 2] = random_probs(batch, vocab, gen=gen)
    drafts = sample_from(q, exp_noise(batch, k, vocab, gen=gen))
    p[torch.arange(batch), 2, drafts[:, 2]] = 0.0  # ... and the target rules d_3 out
    p[:, 2] /= p[:, 2].sum(-1, keepdim=True)
    uniforms = torch.rand(batch, k, generator=gen)
    uniforms[:100, 2] = 1e-12  # even the luckiest accept test must fail
    noise = exp_noise(batch, vocab, gen=gen)
    num_accepted, next_token = verify_sampled(p, q, drafts, torch.full((batch,), k), uniforms, noise)
    assert (num_accepted == 2).all()
    assert not (next_token == drafts[:, 2]).any()


def test_verify_sampled_accepts_a_deterministic_drafters_token_with_probability_p():
    # q one-hot on d: accept iff u <= p(d). Uniforms on an even grid make the rate exact to 1/N.
    batch, vocab, d = 10_000, 5, 3
    p = torch.tensor([0.1, 0.25, 0.05, 0.35, 0.25]).repeat(batch, 2, 1)  # [batch, k+1, vocab], k = 1
    q = F.one_hot(torch.full((batch, 1), d), vocab).float()  # [batch, k, vocab]
    drafts = torch.full((batch, 1), d)
    uniforms = ((torch.arange(batch) + 0.5) / batch).unsqueeze(1)  # [batch, k]
    noise = exp_noise(batch, vocab, gen=torch.Generator().manual_seed(12))
    draft_len = torch.ones(batch, dtype=torch.long)
    num_accepted, next_token = verify_sampled(p, q, drafts, draft_len, uniforms, noise)
    assert abs(num_accepted.double().mean().item() - 0.35) <= 1 / batch
    # the residual max(p - one_hot(d), 0) is p without d: a rejected d never comes back
    assert not (next_token[num_accepted == 0] == d).any()


def test_verify_sampled_never_accepts_padding_and_samples_the_bonus_after_the_last_real_draft():
    gen = torch.Generator().manual_seed(13)
    batch, k, vocab = 300, 4, 6
    p = random_probs(batch, k + 1, vocab, gen=gen)
    q = p[:, :k].clone()  # every draft, padding included, would pass its accept test
    drafts = sample_from(q, exp_noise(batch, k, vocab, gen=gen))
    draft_len = torch.arange(batch) % (k + 1)
    uniforms = torch.rand(batch, k, generator=gen)
    noise = exp_noise(batch, vocab, gen=gen)
    num_accepted, next_token = verify_sampled(p, q, drafts, draft_len, uniforms, noise)
    assert torch.equal(num_accepted, draft_len)
    assert torch.equal(next_token, sample_from(p[torch.arange(batch), draft_len], noise))


def test_verify_sampled_gives_each_row_of_a_batch_the_result_it_gets_alone():
    gen = torch.Generator().manual_seed(14)
    batch, k, vocab = 40, 4, 8
    p = random_probs(batch, k + 1, vocab, gen=gen)
    q = torch.softmax(p[:, :k].log() + 0.7 * torch.randn(batch, k, vocab, generator=gen), dim=-1)
    drafts = sample_from(q, exp_noise(batch, k, vocab, gen=gen))
    draft_len = torch.randint(0, k + 1, (batch,), generator=gen)
    uniforms = torch.rand(batch, k, generator=gen)
    noise = exp_noise(batch, vocab, gen=gen)
    num_accepted, next_token = verify_sampled(p, q, drafts, draft_len, uniforms, noise)
    assert len(set(num_accepted.tolist())) >= 3  # the rows really stop at different places
    for row in range(batch):
        one = slice(row, row + 1)
        alone = verify_sampled(p[one], q[one], drafts[one], draft_len[one], uniforms[one], noise[one])
        assert (alone[0].item(), alone[1].item()) == (num_accepted[row].item(), next_token[row].item())


# ---- sampled: the output is distributed as the target alone ---------------------------------------
#
# A Markov chain over VOCAB tokens stands in for both models: after token a the target's next-token
# distribution is P[a] and the drafter's Q[a] (deliberately different). Each of ROWS independent
# sequences starts at START, drafts K tokens from Q, and is verified against P. Without speculation
# the first two tokens (a, b) have probability P[START, a] * P[a, b]; speculation must not change
# that, whatever Q is, as long as the verifier is told the q the drafter really sampled from.

VOCAB, K, ROWS, START = 6, 3, 40_000, 0
TV_BOUND = tv_bound(VOCAB * VOCAB, ROWS)  # about 0.028; an exact sampler exceeds it w.p. < 1e-6


def markov_tables(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q): target and drafter transition tables, [vocab, vocab], rows sum to one.

    Q is P with noise on the logits: close enough that rows accept 0, 1, 2 and 3 drafts in
    comparable numbers (so every branch of the verifier is exercised), far enough that the
    residual matters.
    """
    gen = torch.Generator().manual_seed(seed)
    P = random_probs(VOCAB, VOCAB, gen=gen)
    Q = torch.softmax(P.log() + torch.randn(VOCAB, VOCAB, generator=gen), dim=-1)
    return P, Q


def top2(table: torch.Tensor) -> torch.Tensor:
    """A sparse drafter: each row of `table` cut to its two most likely tokens, as a dense table."""
    return sparse_to_dense(*truncate_top_m(table, 2), VOCAB)


def speculative_round(start, P, q_drawn, q_claimed, verifier, gen):
    """One draft-and-verify round from `start` [rows]: (num_accepted, next_token [rows], drafts [rows, K]).

    The drafter samples from q_drawn; the verifier is told q_claimed (the same table unless a test
    lies to it).
    """
    rows = start.shape[0]
    prev, drafts, q = start, [], []
    for _ in range(K):
        q.append(q_claimed[prev])
        prev = sample_from(q_drawn[prev], exp_noise(rows, VOCAB, gen=gen))
        drafts.append(prev)
    drafts = torch.stack(drafts, dim=1)  # [rows, K]
    p = P[torch.cat([start.unsqueeze(1), drafts], dim=1)]  # [rows, K+1, vocab]: P[token before position i]
    uniforms = torch.rand(rows, K, generator=gen)
    noise = exp_noise(rows, VOCAB, gen=gen)
    q = torch.stack(q, dim=1)  # [rows, K, vocab]
    num_accepted, next_token = verifier(p, q, drafts, torch.full((rows,), K), uniforms, noise)
    return num_accepted, next_token, drafts


def first_two_tokens_tv(P, q_drawn, q_claimed, verifier=verify_sampled, seed=20) -> float:
    """TV between the empirical joint of the first two emitted tokens and P[START, a] * P[a, b]."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.full((ROWS,), START)
    num_accepted, next_token, drafts = speculative_round(start, P, q_drawn, q_claimed, verifier, gen)
    first = torch.where(num_accepted >= 1, drafts[:, 0], next_token)
    # rows that emitted only their recovered token continue with a fresh round from it
    again, again_next, again_drafts = speculative_round(first, P, q_drawn, q_claimed, verifier, gen)
    after_recovered = torch.where(again >= 1, again_drafts[:, 0], again_next)
    second = torch.where(num_accepted == 1, next_token, after_recovered)
    second = torch.where(num_accepted >= 2, drafts[:, 1], second)
    exact = P[START].unsqueeze(1) * P  # [vocab, vocab]: first token a, second b
    return total_variation(first * VOCAB + second, exact.flatten())


def verify_recovering_from_p(p, q, draft_tokens, draft_len, uniforms, noise):
    """WRONG on purpose: verify_sampled's accept test, but recovering from p instead of max(p - q, 0)."""
    num_accepted, _ = verify_sampled(p, q, draft_tokens, draft_len, uniforms, noise)
    return num_accepted, sample_from(p[torch.arange(p.shape[0]), num_accepted], noise)


def test_markov_rounds_exercise_every_acceptance_count():
    # guards the distribution tests below: every branch of the two-token bookkeeping must occur often
    P, Q = markov_tables()
    start = torch.full((ROWS,), START)
    for q in (Q, top2(Q)):
        gen = torch.Generator().manual_seed(21)
        num_accepted, _, _ = speculative_round(start, P, q, q, verify_sampled, gen)
        assert torch.bincount(num_accepted, minlength=K + 1).min() > ROWS // 20


def test_verify_sampled_leaves_the_first_two_tokens_distributed_as_the_target():
    P, Q = markov_tables()
    assert first_two_tokens_tv(P, Q, Q) < TV_BOUND


def test_verify_sampled_with_a_top2_sparse_drafter_leaves_the_output_distributed_as_the_target():
    P, Q = markov_tables()
    assert first_two_tokens_tv(P, top2(Q), top2(Q)) < TV_BOUND


def test_distribution_test_catches_a_verifier_that_recovers_from_p_instead_of_the_residual():
    # recovering from p over-weights the tokens the drafter already proposes often; TV here is ~0.13
    P, Q = markov_tables()
    assert first_two_tokens_tv(P, Q, Q, verify_recovering_from_p) > 2 * TV_BOUND


def test_distribution_test_catches_a_verifier_told_the_dense_q_of_a_top2_drafter():
    # The drafter only ever proposes Q's top 2, each more often than Q says. Told the dense Q, the
    # verifier accepts them as if they were rarer, and its residual max(p - Q, 0) never yields a
    # token outside the top 2 where p <= Q: that mass of p is lost. TV here is ~0.26.
    P, Q = markov_tables()
    assert first_two_tokens_tv(P, top2(Q), Q) > 2 * TV_BOUND
