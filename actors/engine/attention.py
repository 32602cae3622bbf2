"""The project's attention, registered into transformers' attention interface.

transformers' attention layers project q/k/v, apply their position encoding, hand the new keys
and values to our `KVCache.update`, and call this function. The mask is ours too: every new
position sees the sequence's cached prefix plus the new positions its row of the block mask
allows (a chain is lower-triangular; a token tree lets each node see only its ancestors).
Building it once per forward in `BlockMask.build` keeps transformers' own mask code out of the
hot path, and one implementation serves every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from specserve.kernels import dispatch

ATTN_IMPLEMENTATION = "specserve"


@dataclass(frozen=True)
class PagedBlock:
    """What the paged attention kernel needs instead of a dense mask (kernels/tree_attention.py).

    With it, the cache hands the attention its whole storage and the kernel reads each row in
    place through `slots`: no gather of the cached prefix per layer and step.
    """

    slots: torch.Tensor  # [batch] int64
    prefix_len: torch.Tensor  # [batch] int64
    block: torch.Tensor  # [batch, n, n] bool mask among the new positions
    positions: torch.Tensor  # [batch, n] int64 logical positions of the new tokens
    backend: str  # kernels/dispatch.py


@dataclass
class BlockMask:
    """Which cached positions each new position may attend to.

    allowed:   [batch, 1, n, kv_len] bool, or None when every key is visible (one new token)
    q_pos:     [batch, n] logical positions of the queries (for sliding windows)
    k_pos:     [batch, kv_len] logical positions of the keys
    """

    allowed: torch.Tensor | None
    q_pos: torch.Tensor
    k_pos: torch.Tensor | None
    _windowed: dict = field(default_factory=dict)
    _additive: dict = field(default_factory=dict)  # see additive()
    paged: PagedBlock | None = None  # set: the paged kernel computes the attention (no dense mask)

    @staticmethod
    def chain(prefix_len: torch.Tensor, n: int, kv_len: int) -> "BlockMask":
        """The common case: each row's new tokens form a chain after its prefix.

        Key j is visible to query i of row b iff j <= prefix_b + i. That also hides the stale
        cache entries of shorter rows and keeps right-padding out of every real query's view.
        """
        q_pos = prefix_len.unsqueeze(1) + torch.arange(n)  # [batch, n]
        k_pos = torch.arange(kv_len).expand(len(prefix_len), kv_len)  # [batch, kv_len]
        if q_pos.shape[0] == 1 and n == 1:
            return BlockMask(None, q_pos, k_pos)  # a single new token sees the whole row
        allowed = k_pos.unsqueeze(1) <= q_pos.unsqueeze(2)  # [batch, n, kv_len]
        return BlockMask(allowed.unsqueeze(1), q_pos, k_pos)

    @staticmethod
    def build(prefix_len: torch.Tensor, block: torch.Tensor, positions: torch.Tensor, kv_len: int) -> "BlockMask":
        """prefix_len: [batch] cached tokens before the block; block: [batch, n, n] bool mask
        among the new positions; positions: [batch, n] logical positions of the new tokens."""
        batch, n = positions.shape
        dev = positions.device
        slot_idx = torch.arange(kv_len, device=dev)  # [kv_len] storage index in the row
        in_prefix = slot_idx.unsqueeze(0) < prefix_len.unsqueeze(1)  # [batch, kv_len]
        j = slot_idx.unsqueeze(0) - prefix_len.unsqueeze(1)  # [batch, kv_len] index in the block
        in_block = (j >= 0) & (j < n)
        block_cols = block.gather(2, j.clamp(0, n - 1).unsqueeze(1).expand(batch, n, kv_len))  # [batch, n, kv_len]
        allowed = in_prefix.unsqueeze(1) | (in_block.unsqueeze(1) & block_cols)
        k_pos = torch.where(in_block, positions.gather(1, j.clamp(0, n - 1)), slot_idx.unsqueeze(0))
        if n == 1 and bool(allowed.all()):
            return BlockMask(None, positions, k_pos)
        return BlockMask(allowed.unsqueeze(1), positions, k_pos)

    def to(self, device: torch.device) -> "BlockMask":
        """The same mask with its tensors on `device` (where the attention runs)."""
        if self.q_pos.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockMask(move(self.allowed), move(self.q_pos), move(self.k_pos), paged=self.paged)

    def for_window(self, window: int | None) -> torch.Tensor | None:
        """The mask restricted to keys within a sliding window of the query (as transformers)."""
        if window is None:
            return self.allowed
        if window not in self._windowed:
            near = self.k_pos.unsqueeze(1) > self.q_pos.unsqueeze(2) - window  # [batch, n, kv_len]
            base = self.allowed if self.allowed is not None else torch.ones_like(near).unsqueeze(1)
            self._windowed[window] = base & near.unsqueeze(1)
        return self._windowed[window]

    def additive(self, window: int | None, groups: int, dtype: torch.dtype) -> torch.Tensor | None:
        """`for_window(window)` as SDPA's additive float mask (0 visible, -inf hidden), its query
        rows repeated `groups` times for grouped-query attention ([batch, 1, groups * n, kv_len]).

        Built once per forward and shared by every layer: converting and repeating a boolean mask
        in each layer's attention costs about as much as the attention itself at these sizes."""
        key = (window, groups, dtype)
        if key not in self._additive:
            allowed = self.for_window(window)
            if allowed is not None:
                allowed = allowed.repeat(1, 1, groups, 1) if groups > 1 else allowed
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                    ~allowed, float("-inf"))
            self._additive[key] = allowed
        return self._additive[key]


def specserve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, n, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    value: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    attention_mask: torch.Tensor | None,  # transformers' mask: unused, ours comes in block_mask
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    block_mask: BlockMask | None = None,
    softcap: float | None = None,  # Gemma 2: scores become softcap * tanh(scores / softcap)
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention of the new positions over cache + block."""
    if block_mask is None:
        raise RuntimeError("specserve attention needs a block_mask; run models through ModelRunner")
    if block_mask.paged is not None:  # key/value are the layer's whole cache storage
        if softcap is not None:
            raise RuntimeError("the paged attention kernel has no score soft-capping; the runner must not page")
        pg = block_mask.paged
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = dispatch.tree_attention(query, key, value, pg.slots, pg.prefix_len, pg.block, scale, pg.positions,
                                      sliding_window, backend=pg.backend)
        return out, None
    batch, heads, n, head_dim = query.shape
    groups = heads // key.shape[1]
    mask = block_mask.additive(sliding_window, groups, query.dtype)
    if groups > 1:
        # grouped-query attention without copying K/V: query head h reads kv head h // groups, so
        # fold each group's heads into the query length  # [batch, kv_heads, groups * n, head_dim]
        query = query.reshape(batch, key.shape[1], groups * n, head_dim)
    key, value = key.to(query.dtype), value.to(query.dtype)
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:
        out = softcapped_attention(query, key, value, mask, scaling, softcap)
    out = out.reshape(batch, heads, n, head_dim)  # (a view on the CPU; CUDA may return another layout)
    return out.transpose(1, 2).contiguous(), None  # [batch, n, heads, head_dim]


def softcapped_attention(
    query: torch.Tensor,  # [batch, kv_heads, groups * n, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    value: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    mask: torch.Tensor | None,  # [batch, 1, groups * n, kv_len] additive, or None
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    """Attention with tanh soft-capped scores, as Gemma 2 computes it (SDPA cannot cap).  # like query

    The cap applies before the mask; the softmax runs in at least float32, as transformers' own."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(query @ key.transpose(-1, -2) * (scale / softcap)) * softcap  # [batch, kv_heads, rows, kv_len]
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return probs.to(value.dtype) @ value


AttentionInterface.register(ATTN_IMPLEMENTATION, specserve_attention)
