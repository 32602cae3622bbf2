"""KV cache compaction in Triton: semantics as `specserve.kernels.compaction` (the reference).

One program per (row, chunk of an entry's kv_heads * head_dim elements) walks j in increasing
order. That order is safe in place: the path is strictly increasing from path[0] = 0, so
path[j] >= j, and every earlier write went to an index j' < j <= path[j]: no source is
overwritten before it is read. Positions already in place (path[j] == j) and padding are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHUNK = 1024  # elements of one entry a program copies


@triton.jit
def _compact_kernel(k_ptr, v_ptr, slots_ptr, prefix_ptr, path_ptr, n, entry, s_slot, s_pos,
                    CHUNK: tl.constexpr):
    b = tl.program_id(0)
    e = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    e_ok = e < entry
    base = tl.load(slots_ptr + b) * s_slot + tl.load(prefix_ptr + b) * s_pos
    for j in range(0, n):
        src = tl.load(path_ptr + b * n + j)
        if (src >= 0) & (src != j):  # padding, or already in place
            from_off = base + src * s_pos + e
            to_off = base + j * s_pos + e
            tl.store(k_ptr + to_off, tl.load(k_ptr + from_off, mask=e_ok), mask=e_ok)
            tl.store(v_ptr + to_off, tl.load(v_ptr + from_off, mask=e_ok), mask=e_ok)


def _check(k_cache, v_cache, slots, prefix_len, path) -> None:
    """Shapes, dtypes and layouts the kernel relies on."""
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    assert v_cache.dtype == k_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "cache storage must be contiguous"
    batch = path.shape[0]
    assert path.dim() == 2 and slots.shape == prefix_len.shape == (batch,), (path.shape, slots.shape)
    assert slots.dtype == prefix_len.dtype == path.dtype == torch.int64


def compact_kv_triton(
    k_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim]
    slots: torch.Tensor,  # [batch] int64 (distinct)
    prefix_len: torch.Tensor,  # [batch] int64
    path: torch.Tensor,  # [batch, n] int64 accepted block positions, padded with -1
) -> None:
    """Move each row's accepted entries to prefix_len + j, in place, as `compact_kv_reference`."""
    _check(k_cache, v_cache, slots, prefix_len, path)
    batch, n = path.shape
    entry = k_cache.shape[2] * k_cache.shape[3]
    chunk = min(MAX_CHUNK, triton.next_power_of_2(entry))
    grid = (batch, triton.cdiv(entry, chunk))
    _compact_kernel[grid](k_cache, v_cache, slots.contiguous(), prefix_len.contiguous(), path.contiguous(),
                          n, entry, k_cache.stride(0), k_cache.stride(1), CHUNK=chunk)
