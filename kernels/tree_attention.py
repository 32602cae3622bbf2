"""Attention of a verification block over the slot-based KV cache (the readable reference).

A verification step appends n new positions to each sequence: a chain of draft tokens, or a token
tree flattened parent-before-child. Their keys and values are already in the cache, block
position j of row b at cache index prefix_len[b] + j of slot slots[b]. Query i of row b sees

  - every prefix key (cache index < prefix_len[b]);
  - block key j iff block_mask[b, i, j] (tree: ancestors-or-self; chain: j <= i);
  - nothing at or past prefix_len[b] + n (stale entries of an earlier, longer block);

and, under a sliding window, only keys whose logical position kp satisfies kp > qp - window.
Prefix keys sit at logical position = cache index; block key j at positions[b, j], which for a
tree is prefix_len + depth rather than prefix_len + j. Query head h reads kv head
h // (heads // kv_heads) (grouped-query attention).

kernels/triton_attention.py computes the same thing reading the cache rows in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_BLOCK = 64  # longest block the Triton kernel takes in one tile (longer forwards, e.g. prefills, use SDPA)


def default_positions(prefix_len: torch.Tensor, n: int) -> torch.Tensor:
    """Logical positions of a chain block: prefix_len + j.  prefix_len: [batch] -> [batch, n]"""
    return prefix_len.unsqueeze(1) + torch.arange(n, device=prefix_len.device)


def visible_keys(
    prefix_len: torch.Tensor,  # [batch] int64
    block_mask: torch.Tensor,  # [batch, n, n] bool
    positions: torch.Tensor,  # [batch, n] int64 logical positions of the block
    kv_len: int,
    window: int | None,
) -> torch.Tensor:
    """Which of the first kv_len cache entries of its row each query sees.  # [batch, n, kv_len]"""
    batch, n, _ = block_mask.shape
    idx = torch.arange(kv_len, device=prefix_len.device)  # [kv_len] cache index
    j = idx - prefix_len.unsqueeze(1)  # [batch, kv_len] index in the block
    in_block = (j >= 0) & (j < n)
    jc = j.clamp(0, n - 1)
    block_cols = block_mask.gather(2, jc.unsqueeze(1).expand(batch, n, kv_len))  # [batch, n, kv_len]
    allowed = (j < 0).unsqueeze(1) | (in_block.unsqueeze(1) & block_cols)
    if window is None:
        return allowed
    k_pos = torch.where(in_block, positions.gather(1, jc), idx)  # [batch, kv_len]
    return allowed & (k_pos.unsqueeze(1) > positions.unsqueeze(2) - window)


def tree_attention_reference(
    query: torch.Tensor,  # [batch, heads, n, head_dim] queries of the new positions
    k_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim] one layer's keys
    v_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim]
    slots: torch.Tensor,  # [batch] int64 cache row of each sequence
    prefix_len: torch.Tensor,  # [batch] int64 cached tokens before the block
    block_mask: torch.Tensor,  # [batch, n, n] bool mask among the new positions
    scale: float,
    positions: torch.Tensor | None = None,  # [batch, n] int64 (default prefix_len + j)
    window: int | None = None,  # sliding window, or None for full attention
) -> torch.Tensor:
    """Gather the rows, build the boolean mask, run SDPA in float32.  # [batch, n, heads, head_dim]"""
    batch, heads, n, _ = query.shape
    groups = heads // k_cache.shape[2]
    positions = default_positions(prefix_len, n) if positions is None else positions
    kv_len = int((prefix_len + n).max())
    mask = visible_keys(prefix_len, block_mask, positions, kv_len, window)
    compute = torch.promote_types(query.dtype, torch.float32)

    def rows(cache):  # [batch, heads, kv_len, head_dim], each query head beside its kv head
        return cache[slots, :kv_len].transpose(1, 2).repeat_interleave(groups, dim=1).to(compute)

    out = F.scaled_dot_product_attention(query.to(compute), rows(k_cache), rows(v_cache),
                                         attn_mask=mask.unsqueeze(1), scale=scale)
    return out.transpose(1, 2).to(query.dtype).contiguous()
