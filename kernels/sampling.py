"""Turning logits into the distribution a request samples from, and sampling from it.

Terms used across specserve:
  p  the target distribution at a position, after the request's temperature / top-k / top-p;
  q  the draft distribution the drafter actually sampled its token from.

`sampling_probs` is the single definition of p: plain decoding and speculative verification
both call it, so speculation changes nothing about what a request samples from. Its filters
follow transformers' own logits warpers (temperature, then top-k, then top-p) so a request
means the same thing here as in `generate`.

Sampling uses the exponential-noise trick: argmax(p / E) with E ~ Exp(1) i.i.d. is an exact
sample from p. The noise is an argument, so two implementations can be compared token for token
and a request's generator makes its output reproducible.
"""

from __future__ import annotations

import torch


def sampling_probs(
    logits: torch.Tensor,  # [..., vocab]
    temperature: torch.Tensor,  # [...] > 0
    top_k: torch.Tensor,  # [...] int, 0 = off
    top_p: torch.Tensor,  # [...] float64 in (0, 1], 1 = off
) -> torch.Tensor:
    """The request's distribution p over the vocabulary.  # [..., vocab] float32"""
    scores = logits.float() / temperature.unsqueeze(-1)
    scores = _top_k_filter(scores, top_k)
    scores = _top_p_filter(scores, top_p)
    return torch.softmax(scores, dim=-1)


def _top_k_filter(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask every score below the k-th largest (ties at the k-th are kept, as in transformers)."""
    vocab = scores.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    k_max = int(k.max())
    top_vals = torch.topk(scores, k_max, dim=-1).values  # [..., k_max]
    kth = top_vals.gather(-1, (k - 1).unsqueeze(-1))  # [..., 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of top tokens whose mass reaches top_p (at least one token)."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    # 1 - top_p in double precision, then rounded, as transformers compares it: a float32 top_p
    # would move the cut-off by one ulp and keep an extra tied token
    threshold = (1 - top_p.to(torch.float64)).to(cum.dtype)
    remove_sorted = cum <= threshold.unsqueeze(-1)
    remove_sorted[..., -1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def sample_from(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exact sample per row: argmax(probs / noise), noise ~ Exp(1).  probs, noise: [..., vocab]"""
    return torch.argmax(probs / noise, dim=-1)


def sparse_to_dense(
    ids: torch.Tensor,  # [..., m] int64 token ids of the sparse entries
    probs: torch.Tensor,  # [..., m] their probabilities (zero for unused entries)
    vocab: int,
) -> torch.Tensor:
    """Scatter a sparse (token, probability) distribution into a dense one.  # [..., vocab]"""
    dense = torch.zeros(*ids.shape[:-1], vocab, dtype=torch.float32, device=ids.device)
    return dense.scatter_add_(-1, ids, probs.float())


def truncate_top_m(probs: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m most likely tokens of `probs`, renormalised: a sparse q that is cheap to send.

    Returns (ids [..., m] int64, probs [..., m] float32). Entries outside the support of
    `probs` get probability zero.
    """
    vals, ids = torch.topk(probs, min(m, probs.shape[-1]), dim=-1)
    return ids, vals / vals.sum(dim=-1, keepdim=True)
