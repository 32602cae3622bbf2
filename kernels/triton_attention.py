"""Tree attention in Triton: the block's queries over the cache rows, read in place.

Semantics as `specserve.kernels.tree_attention` (the reference). Flash-attention style: each
program keeps a running max, sum and output for its queries and streams the keys of one cache
row through an online softmax, in two passes:

  prefix  cache indices [0, prefix_len): visible to every query (subject to the window);
  block   cache indices [prefix_len, prefix_len + n): one tile, masked by block_mask.

Grid-wise, one program serves all the query heads that share a kv head: the group's heads are
folded into the query rows (row r = head-in-group * n + i), so each key is read once per kv head
rather than once per query head. The block is short (n <= 64), so the folded rows fit in one or
a few tiles of BLOCK_M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specserve.kernels.tree_attention import MAX_BLOCK  # n <= MAX_BLOCK: the block pass is a single tile

LOG2E = 1.4426950408889634
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_N = 64  # keys per tile of the prefix pass


@triton.jit
def _attend(acc, m_i, l_i, q, k_ptr, v_ptr, offs, key_ok, visible, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):  # q: [BLOCK_M, BLOCK_D]
    """One tile of keys through the online softmax.  offs: [tile] element offset of each key."""
    d = tl.arange(0, BLOCK_D)
    kv_ok = key_ok[:, None] & (d[None, :] < HEAD_DIM)  # head dims padded to BLOCK_D read as zeros
    k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, tile], log2 units
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # m_i starts finite, so a fully hidden tile gives alpha 1
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slots_ptr, prefix_ptr, mask_ptr, pos_ptr,
    sq_b, sq_h, sq_n,  # query strides (head_dim is contiguous)
    sk_s, sk_c, sk_h,  # cache strides, shared by keys and values
    so_b, so_n, so_h,  # output strides
    n, groups, qk_scale, window,
    HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b, kvh = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # folded (head in group, query)
    row_ok = rows < groups * n
    h = kvh * groups + rows // n
    i = rows % n  # always a real query index, so q_pos needs no mask
    d = tl.arange(0, BLOCK_D)
    io_ok = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + i[:, None] * sq_n + d[None, :],
                mask=io_ok, other=0.0).to(DOT_DTYPE)
    q_pos = tl.load(pos_ptr + b * n + i)  # [BLOCK_M]
    slot = tl.load(slots_ptr + b)
    prefix = tl.load(prefix_ptr + b)
    kv_base = slot * sk_s + kvh * sk_h
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    start = 0
    if HAS_WINDOW:  # skip the prefix tiles that lie before every query's window
        start = tl.maximum(tl.min(q_pos) - window + 1, 0) // BLOCK_N * BLOCK_N
    for k0 in range(start, prefix, BLOCK_N):
        kidx = k0 + tl.arange(0, BLOCK_N)
        key_ok = kidx < prefix
        visible = row_ok[:, None] & key_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (kidx[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, kv_base + kidx * sk_c, key_ok, visible,
                                qk_scale, HEAD_DIM, BLOCK_D, PRECISION)

    j = tl.arange(0, BLOCK_J)
    j_ok = j < n
    pair_ok = row_ok[:, None] & j_ok[None, :]
    visible = tl.load(mask_ptr + b * n * n + i[:, None] * n + j[None, :], mask=pair_ok, other=0) != 0
    if HAS_WINDOW:
        k_pos = tl.load(pos_ptr + b * n + j, mask=j_ok, other=0)
        visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, kv_base + (prefix + j) * sk_c, j_ok, visible,
                            qk_scale, HEAD_DIM, BLOCK_D, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a query that sees nothing gets zeros
    tl.store(out_ptr + b * so_b + i[:, None] * so_n + h[:, None] * so_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_ok)


def _dot_dtype(dtype: torch.dtype, device: torch.device) -> tl.dtype:
    """Operand dtype of the kernel's matrix products: the input's, except bfloat16 on the CPU.

    Triton's interpreter (how the CPU runs this kernel) computes bfloat16 dots wrongly, so there
    the operands are widened to float32; loads and stores stay bfloat16.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu"):
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _check(query, k_cache, v_cache, slots, prefix_len, block_mask, positions) -> None:
    """Shapes, dtypes and layouts the kernel relies on."""
    batch, heads, n, head_dim = query.shape
    num_slots, capacity, kv_heads, _ = k_cache.shape
    assert query.dtype in FLOAT_DTYPES and k_cache.dtype in FLOAT_DTYPES, (query.dtype, k_cache.dtype)
    assert v_cache.dtype == k_cache.dtype and v_cache.shape == k_cache.shape
    assert k_cache.shape[3] == head_dim, (k_cache.shape, query.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "cache storage must be contiguous"
    assert query.stride(3) == 1, "query head_dim must be contiguous"
    assert 1 <= head_dim <= 256, f"head_dim {head_dim} is over 256"
    assert 1 <= n <= MAX_BLOCK, f"block of {n} positions; at most {MAX_BLOCK}"
    assert heads % kv_heads == 0, (heads, kv_heads)
    assert slots.shape == prefix_len.shape == (batch,), (slots.shape, prefix_len.shape)
    assert slots.dtype == prefix_len.dtype == positions.dtype == torch.int64
    assert block_mask.shape == (batch, n, n) and block_mask.dtype == torch.bool, block_mask.shape
    assert positions.shape == (batch, n), positions.shape


def tree_attention_triton(
    query: torch.Tensor,  # [batch, heads, n, head_dim]
    k_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, capacity, kv_heads, head_dim]
    slots: torch.Tensor,  # [batch] int64
    prefix_len: torch.Tensor,  # [batch] int64
    block_mask: torch.Tensor,  # [batch, n, n] bool
    scale: float,
    positions: torch.Tensor | None = None,  # [batch, n] int64 (default prefix_len + j)
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the block over cache + block, as `tree_attention_reference`.  # [batch, n, heads, head_dim]"""
    batch, heads, n, head_dim = query.shape
    if positions is None:
        positions = prefix_len.unsqueeze(1) + torch.arange(n, device=prefix_len.device)
    _check(query, k_cache, v_cache, slots, prefix_len, block_mask, positions)
    kv_heads = k_cache.shape[2]
    groups = heads // kv_heads
    dot_dtype = _dot_dtype(query.dtype, query.device)
    out = torch.empty(batch, n, heads, head_dim, dtype=query.dtype, device=query.device)
    block_m = min(MAX_BLOCK, max(16, triton.next_power_of_2(groups * n)))
    grid = (batch, kv_heads, triton.cdiv(groups * n, block_m))
    _tree_attention_kernel[grid](
        query, k_cache, v_cache, out, slots.contiguous(), prefix_len.contiguous(),
        block_mask.contiguous().view(torch.uint8), positions.contiguous(),
        query.stride(0), query.stride(1), query.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n, groups, scale * LOG2E, 0 if window is None else window,
        HAS_WINDOW=window is not None, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        BLOCK_J=max(16, triton.next_power_of_2(n)),
        DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
    )
    return out
