"""Lossless verification of a chain of draft tokens.

For one sequence the verifier ran the target over [pending, d_1 .. d_k] and so holds the target
distribution p_i for each draft position and one more, p_{k+1}, after the last draft. Then:

  accepted   draft tokens d_1 .. d_m kept, because the target agrees with them;
  recovered  the token that replaces the first rejected draft d_{m+1}, sampled from the
             residual distribution norm(max(p - q, 0)) (greedy: the target's argmax);
  bonus      the extra token sampled from p_{k+1} when all k drafts were accepted.

Every verification emits m accepted tokens plus exactly one recovered or bonus token. With
greedy decoding this is token-identical to the target alone; with sampling, accepting d_i with
probability min(1, p_i(d_i) / q_i(d_i)) and resampling from the residual leaves the output
distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023). Sequences in a batch have
different draft lengths; positions past a row's `draft_len` are padding and never accepted.
"""

from __future__ import annotations

import torch

from specserve.kernels.sampling import sample_from, sparse_to_dense


def _first_rejection(accept: torch.Tensor, draft_len: torch.Tensor) -> torch.Tensor:
    """Accepted prefix length per row.  accept: [batch, k] bool, draft_len: [batch]"""
    k = accept.shape[1]
    in_draft = torch.arange(k, device=accept.device) < draft_len.unsqueeze(1)  # [batch, k]
    ok = (accept & in_draft).int()
    return ok.cumprod(dim=1).sum(dim=1)  # [batch]


def verify_greedy(
    target_tokens: torch.Tensor,  # [batch, k+1] argmax of the target logits at each position
    draft_tokens: torch.Tensor,  # [batch, k]
    draft_len: torch.Tensor,  # [batch] drafts actually proposed per row (<= k)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_accepted [batch], next_token [batch]) for greedy decoding."""
    num_accepted = _first_rejection(draft_tokens == target_tokens[:, :-1], draft_len)
    next_token = target_tokens.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return num_accepted, next_token


def accept_drafts(
    p: torch.Tensor,  # [batch, k+1, vocab] target distribution at each position
    q: torch.Tensor,  # [batch, k, vocab] draft distribution each draft token was sampled from
    draft_tokens: torch.Tensor,  # [batch, k]
    draft_len: torch.Tensor,  # [batch]
    uniforms: torch.Tensor,  # [batch, k] U(0, 1) for the accept tests
) -> torch.Tensor:
    """num_accepted [batch]: draft i is kept with probability min(1, p_i(d_i) / q_i(d_i))."""
    idx = draft_tokens.unsqueeze(-1)  # [batch, k, 1]
    p_draft = p[:, :-1].gather(-1, idx).squeeze(-1)  # [batch, k]
    q_draft = q.gather(-1, idx).squeeze(-1)  # [batch, k]
    # accept iff u * q(d) <= p(d): the same event as u <= p/q, without dividing by q
    return _first_rejection(uniforms * q_draft <= p_draft, draft_len)


def verify_sampled(
    p: torch.Tensor,  # [batch, k+1, vocab]
    q: torch.Tensor,  # [batch, k, vocab]
    draft_tokens: torch.Tensor,  # [batch, k]
    draft_len: torch.Tensor,  # [batch]
    uniforms: torch.Tensor,  # [batch, k]
    noise: torch.Tensor,  # [batch, vocab] Exp(1) for sampling the recovered or bonus token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_accepted [batch], next_token [batch]) for speculative sampling."""
    num_accepted = accept_drafts(p, q, draft_tokens, draft_len, uniforms)
    return num_accepted, sample_next(p, q, num_accepted, draft_len, noise)


def sample_next(
    p: torch.Tensor,  # [batch, k+1, vocab]
    q: torch.Tensor,  # [batch, k, vocab]
    num_accepted: torch.Tensor,  # [batch]
    draft_len: torch.Tensor,  # [batch]
    noise: torch.Tensor,  # [batch, vocab] Exp(1)
) -> torch.Tensor:
    """The recovered token (from the residual) after a rejection, else the bonus token from p."""
    rows = torch.arange(p.shape[0], device=p.device)
    p_next = p[rows, num_accepted]  # [batch, vocab]
    rejected = num_accepted < draft_len  # [batch]
    q_at = q[rows, num_accepted.clamp(max=q.shape[1] - 1)] if q.shape[1] else torch.zeros_like(p_next)
    residual = (p_next - q_at).clamp(min=0.0)
    # where p and q agree to rounding the residual can vanish; p itself is then the limit
    # (max, not sum: exact in any reduction order, so a fused kernel decides the same)
    has_mass = residual.amax(dim=-1, keepdim=True) > 0
    residual = torch.where(has_mass, residual, p_next)
    final = torch.where(rejected.unsqueeze(-1), residual, p_next)
    # sample_from needs no normalisation: argmax(r / E) samples from r / sum(r)
    return sample_from(final, noise)


def verify_chain(
    draft_tokens: torch.Tensor,  # [batch, k] int64
    draft_len: torch.Tensor,  # [batch] int64 drafts actually proposed per row (<= k)
    target_argmax: torch.Tensor,  # [batch, k+1] int64 argmax of the target logits (greedy rows)
    p: torch.Tensor,  # [batch, k+1, vocab] float32 target distribution (sampled rows; any values in greedy rows)
    q_ids: torch.Tensor,  # [batch, k, m] int64 sparse draft distribution of each draft token
    q_probs: torch.Tensor,  # [batch, k, m] float32 (zero for unused entries)
    greedy: torch.Tensor,  # [batch] bool
    uniforms: torch.Tensor,  # [batch, k] float32 U(0, 1) for the accept tests
    noise: torch.Tensor,  # [batch, vocab] float32 Exp(1) for the recovered or bonus token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_accepted [batch], next_token [batch]) for a batch mixing greedy and sampled rows.

    The reference of the fused chain rejection sampler (kernels/triton_sampling.py): the same
    answer from the same random numbers, token for token.
    """
    num_g, next_g = verify_greedy(target_argmax, draft_tokens, draft_len)
    q = sparse_to_dense(q_ids, q_probs, p.shape[-1])  # [batch, k, vocab]
    num_s, next_s = verify_sampled(p, q, draft_tokens, draft_len, uniforms, noise)
    return torch.where(greedy, num_g, num_s), torch.where(greedy, next_g, next_s)
