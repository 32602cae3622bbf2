"""Compaction of the KV cache after a tree step (the readable reference).

A tree block of n positions sits at cache indices prefix_len + 0 .. n-1 of its row, in block
order. Verification accepts one root-to-node path; `path` lists its block positions in order
(path[:, 0] = 0, the root; strictly increasing; padded with -1). The sequence continues along
that path only, so its entries must become contiguous: block position path[b, j] moves to cache
index prefix_len[b] + j. A node at depth j was run at logical position prefix_len + j, so the
moved keys are exactly those a plain chain over the path would have cached.

Sources can overlap destinations (path [0, 2, 3] moves 2 -> 1 and 3 -> 2); every source is
read before anything is written. A chain's path (0, 1, 2, ...) moves nothing.
"""

from __future__ import annotations

import torch


def compact_kv_reference(
    k_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim] one layer's keys
    v_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim]
    slots: torch.Tensor,  # [batch] int64 cache row of each sequence (distinct)
    prefix_len: torch.Tensor,  # [batch] int64 cached tokens before the block
    path: torch.Tensor,  # [batch, n] int64 accepted block positions, padded with -1
) -> None:
    """Move each row's accepted entries to prefix_len + j, in place, for keys and values."""
    n = path.shape[1]
    j = torch.arange(n, device=path.device)
    # padding copies an entry onto itself, so every row keeps the same shape and nothing syncs
    src = prefix_len.unsqueeze(1) + torch.where(path >= 0, path, j)  # [batch, n]
    dst = prefix_len.unsqueeze(1) + j  # [batch, n]
    rows = slots.unsqueeze(1).expand_as(dst)
    for cache in (k_cache, v_cache):
        cache[rows, dst] = cache[rows, src]  # advanced indexing reads a copy before the write
