"""The project-owned KV cache: one row (slot) of keys and values per live sequence.

Each layer stores keys and values as `[num_slots, capacity, kv_heads, head_dim]`. A sequence owns
a slot; its length is a host-side integer, so rolling back to any earlier length is O(1) (the
stale entries past it are simply overwritten later). Slots are reused when sequences finish.
The whole cache is allocated once against a byte budget, so running out of memory is a clear
error at admission, never a crash in the middle of a forward pass.

transformers' attention layers call `update(key, value, layer_idx)` with the new positions of
the current forward; the write positions come from `StepLayout`, set before each forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


class CacheBudgetError(RuntimeError):
    """The KV cache cannot hold what was asked of it."""


@dataclass(frozen=True)
class CacheShape:
    """Geometry of the cache, taken from the model config."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (keys and values)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * elem


@dataclass
class StepLayout:
    """Where the new positions of one forward go.

    slots:  [batch] int64 slot of each row
    write:  [batch, n] int64 cache position of each new token (prefix length + j)
    kv_len: number of cache positions the attention must read (max over rows of prefix + n)
    """

    slots: torch.Tensor
    write: torch.Tensor
    kv_len: int
    single: tuple[int, int] | None = None  # (slot, first write position) when the batch is one row
    paged: bool = False  # return the whole storage: the paged attention kernel reads rows in place


class KVCache:
    """Slot-based key/value storage for every layer of one model."""

    def __init__(self, shape: CacheShape, num_slots: int, max_seq_len: int, device: torch.device,
                 budget_bytes: int | None = None, block_margin: int = 64):
        self.shape = shape
        self.max_seq_len = max_seq_len
        # room past max_seq_len for the padded positions of a verification block
        self.capacity = max_seq_len + block_margin
        need = num_slots * self.capacity * shape.bytes_per_token()
        if budget_bytes is not None and need > budget_bytes:
            raise CacheBudgetError(
                f"KV cache for {num_slots} sequences of up to {max_seq_len} tokens needs "
                f"{_size(need)}, over the budget of {_size(budget_bytes)}; "
                f"lower max_num_seqs or max_seq_len, or raise the budget"
            )
        dims = (num_slots, self.capacity, shape.kv_heads, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self.layout: StepLayout | None = None

    @property
    def num_free(self) -> int:
        """Slots available for new sequences."""
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot (length 0) for a new sequence."""
        if not self._free:
            raise CacheBudgetError(f"all {len(self.lengths)} KV cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Give a finished sequence's slot back."""
        if slot in self._free:
            raise ValueError(f"KV cache slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll a sequence back to `length` cached tokens. O(1): nothing is copied."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def check_room(self, slot: int, new_tokens: int) -> None:
        """Raise if `new_tokens` more tokens would not fit in this sequence's row."""
        if self.lengths[slot] + new_tokens > self.max_seq_len:
            raise CacheBudgetError(
                f"sequence needs {self.lengths[slot] + new_tokens} tokens, over max_seq_len={self.max_seq_len}"
            )

    # -- the transformers cache protocol: what the attention layers call ---------------------

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values and return the rows the attention reads.

        key, value: [batch, kv_heads, n, head_dim]. Returns keys and values of shape
        [batch, kv_heads, kv_len, head_dim] (a view when the batch is a single slot), or the
        whole storage when the paged attention kernel reads the rows itself.
        """
        lay = self.layout
        k_store, v_store = self.keys[layer_idx], self.values[layer_idx]
        if lay.single is not None and not lay.paged:  # one sequence: plain slices, no gather/scatter
            s, start = lay.single
            end = start + key.shape[2]
            k_store[s, start:end] = key[0].transpose(0, 1)
            v_store[s, start:end] = value[0].transpose(0, 1)
            k_all, v_all = k_store[s : s + 1, : lay.kv_len], v_store[s : s + 1, : lay.kv_len]
            return k_all.transpose(1, 2), v_all.transpose(1, 2)
        rows = lay.slots.unsqueeze(1).expand_as(lay.write)  # [batch, n]
        k_store[rows, lay.write] = key.transpose(1, 2).to(k_store.dtype)
        v_store[rows, lay.write] = value.transpose(1, 2).to(v_store.dtype)
        if lay.paged:
            return k_store, v_store  # [num_slots, capacity, kv_heads, head_dim]
        k_all = k_store[:, : lay.kv_len].index_select(0, lay.slots)
        v_all = v_store[:, : lay.kv_len].index_select(0, lay.slots)
        return k_all.transpose(1, 2), v_all.transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Only used by transformers when no position ids are given; we always give them."""
        return 0
