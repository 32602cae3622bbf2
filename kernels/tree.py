"""Lossless verification of a token tree.

A verification block of one sequence is a tree of n positions. Position 0 is the root: the
sequence's pending token (already emitted). Positions 1 .. n-1 are draft nodes; `parents[i]` is
the block position of node i's parent (0 <= parents[i] < i), so parents always precede their
children and a chain is the tree with parents[i] = i - 1. Padding positions of shorter rows have
parent -1 and are nobody's child. The children of a node, in increasing position order, are its
siblings in the order the drafter drew them.

The target ran over the whole block under the tree mask (each node sees its ancestors only), so
p at position j is the target distribution of the token after node j. Verification walks down
from the root:

  greedy   take the child whose token is the target's argmax; stop when no child matches.
  sampled  recursive rejection over the siblings (SpecInfer's multi-candidate speculative
           sampling with siblings drawn without replacement, as in Recursive Speculative
           Decoding, Jeon et al. 2024): child j, drawn from q_j = q with the earlier siblings
           removed, is accepted with probability min(1, r(x) / q_j(x)) where r is the target
           distribution with the earlier rejected siblings' mass taken out,
           r <- norm(max(r - q_j, 0)). An accepted child becomes the current node; when all
           children are rejected the next token is sampled from r.

Each node's (q_ids, q_probs) row is the distribution its token was drawn from *before* its
earlier siblings were removed (for siblings drawn without replacement, the parent's draft
distribution). The output keeps exactly the target's distribution: the residual step is the
standard speculative-sampling identity applied to r and q_j at each sibling, and drawing the
siblings without replacement keeps each q_j the law of x_j given the earlier rejections.

Outputs: `path` lists the accepted block positions from the root (path[0] = 0), `num_accepted`
counts the accepted draft nodes, `next_token` is the recovered or bonus token after the last
accepted node. Residuals are kept unnormalised (r with its mass R) so the accept test
u * q_j(x) <= r(x) / R becomes u * rem(x) * R <= r(x) * Q without a division.
"""

from __future__ import annotations

import torch

from specserve.kernels.sampling import sample_from


def children_of(parents: torch.Tensor) -> list[list[int]]:
    """Children of every position of one tree, in sibling order.  parents: [n] int64"""
    kids: list[list[int]] = [[] for _ in range(parents.shape[0])]
    for i, par in enumerate(parents.tolist()):
        if i > 0 and par >= 0:
            kids[par].append(i)
    return kids


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self mask: mask[b, i, j] is True iff j is i or an ancestor of i.  # [batch, n, n]

    parents: [batch, n] int64 (padding positions, parent -1, see only themselves).
    """
    batch, n = parents.shape
    mask = torch.eye(n, dtype=torch.bool).expand(batch, n, n).clone()
    rows = torch.arange(batch)
    for i in range(1, n):
        par = parents[:, i]
        real = par >= 0
        # node i sees what its parent sees (parents come first, so that row is complete)
        mask[rows[real], i] |= mask[rows[real], par[real]]
    return mask


def tree_depth(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every position (root 0, padding 0).  parents: [batch, n] -> [batch, n] int64"""
    depth = torch.zeros_like(parents)
    for i in range(1, parents.shape[1]):
        par = parents[:, i]
        depth[:, i] = torch.where(par >= 0, depth.gather(1, par.clamp(min=0).unsqueeze(1)).squeeze(1) + 1, 0)
    return depth


def _walk_greedy(tokens, target_argmax, kids) -> list[int]:
    path, cur = [0], 0
    while True:
        want = int(target_argmax[cur])
        nxt = next((i for i in kids[cur] if int(tokens[i]) == want), None)
        if nxt is None:
            return path
        path.append(nxt)
        cur = nxt


def _walk_sampled(tokens, p, q_ids, q_probs, uniforms, noise, kids) -> tuple[list[int], int]:
    """Recursive rejection down the tree of one row: (path, next_token)."""
    path, cur = [0], 0
    while True:
        r = p[cur]
        mass = r.sum()
        excluded: list[int] = []
        accepted = None
        for i in kids[cur]:
            x = int(tokens[i])
            rem = torch.zeros_like(r).scatter_add_(0, q_ids[i], q_probs[i])  # q before removals
            if excluded:
                rem[excluded] = 0.0
            q_mass = rem.sum()
            if rem[x] > 0 and uniforms[i] * rem[x] * mass <= r[x] * q_mass:
                accepted = i
                break
            if q_mass > 0:
                residual = (r - rem * (mass / q_mass)).clamp(min=0.0)
                residual_mass = residual.sum()
                if residual_mass > 0:  # vanishes only where r and q_j agree to rounding: keep r
                    r, mass = residual, residual_mass
            excluded.append(x)
        if accepted is None:
            return path, int(sample_from(r, noise))
        path.append(accepted)
        cur = accepted


def verify_tree(
    tokens: torch.Tensor,  # [batch, n] int64 block tokens (position 0: the pending token)
    parents: torch.Tensor,  # [batch, n] int64 parent position (-1 for the root and padding)
    target_argmax: torch.Tensor,  # [batch, n] int64 argmax of the target logits (greedy rows)
    p: torch.Tensor,  # [batch, n, vocab] float32 target distribution (sampled rows)
    q_ids: torch.Tensor,  # [batch, n, m] int64 sparse draft distribution of each node (row 0 unused)
    q_probs: torch.Tensor,  # [batch, n, m] float32
    greedy: torch.Tensor,  # [batch] bool
    uniforms: torch.Tensor,  # [batch, n] float32 U(0, 1), one per node's accept test
    noise: torch.Tensor,  # [batch, vocab] float32 Exp(1) for the recovered or bonus token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(path [batch, n] int64 padded with -1, num_accepted [batch], next_token [batch]).

    The readable reference of the fused tree sampler (kernels/triton_sampling.py): one row at a
    time, one sibling at a time.
    """
    batch, n = tokens.shape
    dev = tokens.device
    path = torch.full((batch, n), -1, dtype=torch.long, device=dev)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=dev)
    next_token = torch.zeros(batch, dtype=torch.long, device=dev)
    for b in range(batch):
        kids = children_of(parents[b])
        if bool(greedy[b]):
            row_path = _walk_greedy(tokens[b], target_argmax[b], kids)
            nxt = int(target_argmax[b, row_path[-1]])
        else:
            row_path, nxt = _walk_sampled(tokens[b], p[b], q_ids[b], q_probs[b], uniforms[b], noise[b], kids)
        path[b, : len(row_path)] = torch.tensor(row_path, device=dev)
        num_accepted[b], next_token[b] = len(row_path) - 1, nxt
    return path, num_accepted, next_token
