"""Fused Triton verification samplers: chain rejection sampling and tree verification.

Each kernel reproduces its torch reference token for token from the same random numbers:
`verify_chain_triton` is `kernels.verify.verify_chain` and `verify_tree_triton` is
`kernels.tree.verify_tree` (whose docstring defines the tree layout and the recursive rejection).
One program verifies one batch row; the vocabulary is swept in BLOCK_V chunks.

How the kernels stay exact:
  - argmax keeps a running (max, index) pair and, within a chunk, the smallest index among the
    maxima, which is torch.argmax's tie rule;
  - divisions are IEEE round-to-nearest (`div_rn`, not Triton's approximate fp32 `/`) and the
    kernels are compiled without fma contraction, so every product and difference is rounded
    as torch rounds it, in the reference's order of operations;
  - the sparse q is never made dense: a vocab chunk is compared against the m ids of a row and
    the matching probabilities are summed, as the reference's scatter_add sums duplicate ids.

What is not mirrored, each deciding a token only within an ulp or on a measure-zero input:
  - the order of float32 sums (the tree's masses R and Q, and an id listed three or more times):
    the rounding can differ from torch's;
  - NaN (only from 0 / 0 noise, or R / Q overflowing): torch.argmax picks it, the kernels skip it.
`verify_tree_triton` returns its outputs on the inputs' device; the reference builds them on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHUNK = 16_384  # elements of the [BLOCK_V, BLOCK_M] id comparison held at once
MAX_TREE = 256  # positions per tree block: the excluded-sibling list lives in registers
INT_BIG: tl.constexpr = tl.constexpr(2_147_483_647)  # "no index yet" in argmin reductions


# ---- shared pieces ------------------------------------------------------------------------------


@triton.jit
def _argmax_step(best, best_idx, vals, idx):
    """Fold a chunk into a running argmax; the first index wins ties, as in torch.argmax."""
    chunk_max = tl.max(vals, axis=0)
    chunk_idx = tl.min(tl.where(vals == chunk_max, idx, INT_BIG), axis=0)
    better = chunk_max > best  # strict: an equal later chunk keeps the earlier index
    return tl.where(better, chunk_max, best), tl.where(better, chunk_idx, best_idx)


@triton.jit
def _sparse_at(vocab_ids, ids, probs):
    """Dense q at `vocab_ids` from a sparse row (duplicate ids add up).  -> vocab_ids' shape

    vocab_ids: [BLOCK] int, ids: [BLOCK_M] int64, probs: [BLOCK_M] float32
    """
    hit = vocab_ids[:, None] == ids[None, :]  # [BLOCK, BLOCK_M]
    return tl.sum(tl.where(hit, probs[None, :], 0.0), axis=1)


@triton.jit
def _sample(row_ptr, noise_ptr, V, BLOCK_V: tl.constexpr):
    """argmax(row / noise) over the vocabulary: an exact sample from the unnormalised row."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        v = start + offs
        live = v < V
        r = tl.load(row_ptr + v, mask=live, other=0.0)
        e = tl.load(noise_ptr + v, mask=live, other=1.0)
        vals = tl.where(live, tl.math.div_rn(r, e), float("-inf"))
        best, best_idx = _argmax_step(best, best_idx, vals, v)
    return best_idx


# ---- chain ----------------------------------------------------------------------------------------


@triton.jit
def _leading(ok, pos, BLOCK_K: tl.constexpr):
    """Length of the all-True prefix of `ok` (lanes past the row's drafts must be False)."""
    return tl.min(tl.where(ok, BLOCK_K, pos), axis=0)


@triton.jit
def _chain_accepted(drafts, in_draft, pos, p_row, q_ids_row, q_probs_row, u_row, K, M, V,
                    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """num_accepted of a sampled row: draft i is kept iff u_i * q_i(d_i) <= p_i(d_i)."""
    js = tl.arange(0, BLOCK_M)
    live = (pos[:, None] < K) & (js[None, :] < M)  # [BLOCK_K, BLOCK_M]
    ids = tl.load(q_ids_row + pos[:, None] * M + js[None, :], mask=live, other=-1)
    probs = tl.load(q_probs_row + pos[:, None] * M + js[None, :], mask=live, other=0.0)
    q_draft = tl.sum(tl.where(ids == drafts[:, None], probs, 0.0), axis=1)  # [BLOCK_K]
    p_draft = tl.load(p_row + pos * V + drafts, mask=in_draft, other=0.0)
    u = tl.load(u_row + pos, mask=pos < K, other=0.0)
    return _leading(in_draft & (u * q_draft <= p_draft), pos, BLOCK_K)


@triton.jit
def _chain_next(num, draft_len, p_row, q_ids_row, q_probs_row, noise_row, K, M, V,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """The recovered token (residual max(p - q, 0)) after a rejection, else the bonus from p."""
    rejected = num < draft_len
    q_pos = tl.minimum(num, K - 1)  # the reference clamps the same way; -1: no drafts, q = 0
    js = tl.arange(0, BLOCK_M)
    live = js < tl.where(q_pos >= 0, M, 0)
    ids = tl.load(q_ids_row + q_pos * M + js, mask=live, other=-1)
    probs = tl.load(q_probs_row + q_pos * M + js, mask=live, other=0.0)
    p_next = p_row + num * V
    offs = tl.arange(0, BLOCK_V)
    best_r = tl.full([], float("-inf"), tl.float32)
    best_p = tl.full([], float("-inf"), tl.float32)
    idx_r = tl.full([], 0, tl.int32)
    idx_p = tl.full([], 0, tl.int32)
    res_max = tl.full([], 0.0, tl.float32)
    # one sweep: the residual's and p's argmax both, and whether the residual has any mass
    for start in range(0, V, BLOCK_V):
        v = start + offs
        in_vocab = v < V
        p = tl.load(p_next + v, mask=in_vocab, other=0.0)
        e = tl.load(noise_row + v, mask=in_vocab, other=1.0)
        res = tl.maximum(p - _sparse_at(v, ids, probs), 0.0)
        res_max = tl.maximum(res_max, tl.max(res, axis=0))
        best_r, idx_r = _argmax_step(best_r, idx_r, tl.where(in_vocab, tl.math.div_rn(res, e), float("-inf")), v)
        best_p, idx_p = _argmax_step(best_p, idx_p, tl.where(in_vocab, tl.math.div_rn(p, e), float("-inf")), v)
    return tl.where(rejected & (res_max > 0), idx_r, idx_p)


@triton.jit
def _chain_kernel(draft_ptr, draft_len_ptr, target_argmax_ptr, p_ptr, q_ids_ptr, q_probs_ptr, greedy_ptr,
                  uniforms_ptr, noise_ptr, num_out_ptr, next_out_ptr, K, M, V,
                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    draft_len = tl.load(draft_len_ptr + b)
    pos = tl.arange(0, BLOCK_K)
    in_draft = (pos < K) & (pos < draft_len)
    drafts = tl.load(draft_ptr + b * K + pos, mask=pos < K, other=-1)
    target_row = target_argmax_ptr + b * (K + 1)
    if tl.load(greedy_ptr + b) != 0:
        targets = tl.load(target_row + pos, mask=pos < K, other=-1)
        num = _leading(in_draft & (drafts == targets), pos, BLOCK_K)
        nxt = tl.load(target_row + num).to(tl.int64)
    else:
        p_row = p_ptr + b * (K + 1) * V
        q_ids_row = q_ids_ptr + b * K * M
        q_probs_row = q_probs_ptr + b * K * M
        num = _chain_accepted(drafts, in_draft, pos, p_row, q_ids_row, q_probs_row, uniforms_ptr + b * K,
                              K, M, V, BLOCK_K, BLOCK_M)
        nxt = _chain_next(num, draft_len, p_row, q_ids_row, q_probs_row, noise_ptr + b * V, K, M, V,
                          BLOCK_M, BLOCK_V).to(tl.int64)
    tl.store(num_out_ptr + b, num.to(tl.int64))
    tl.store(next_out_ptr + b, nxt)


# ---- tree -----------------------------------------------------------------------------------------


@triton.jit
def _walk_greedy(tokens_row, parents_row, target_row, path_row, N, BLOCK_N: tl.constexpr):
    """Follow the child whose token is the target's argmax: (num_accepted, next_token)."""
    pos = tl.arange(0, BLOCK_N)
    tokens = tl.load(tokens_row + pos, mask=pos < N, other=-1)
    parents = tl.load(parents_row + pos, mask=pos < N, other=-1)
    cur = tl.full([], 0, tl.int32)
    depth = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    for _ in range(1, N):  # a walk accepts at most N - 1 nodes
        want = tl.load(target_row + cur)
        match = (pos >= 1) & (pos < N) & (parents == cur) & (tokens == want)
        child = tl.min(tl.where(match, pos, BLOCK_N), axis=0)  # first sibling that matches
        step = (child < BLOCK_N) & (done == 0)
        depth += step.to(tl.int32)
        tl.store(path_row + depth, child.to(tl.int64), mask=step)
        cur = tl.where(step, child, cur)
        done = tl.where(step, done, 1)
    return depth, tl.load(target_row + cur).to(tl.int64)


@triton.jit
def _load_residual(work_row, p_row, V, BLOCK_V: tl.constexpr):
    """r <- p of the current node, in the row's workspace; returns its mass R."""
    offs = tl.arange(0, BLOCK_V)
    mass = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + offs
        p = tl.load(p_row + v, mask=v < V, other=0.0)
        tl.store(work_row + v, p, mask=v < V)
        mass += tl.sum(p, axis=0)
    tl.debug_barrier()  # the stores must be visible to every thread of the program
    return mass


@triton.jit
def _residual_mass(work_row, ids, probs, scale, V, BLOCK_V: tl.constexpr):
    """Mass of max(r - rem * scale, 0) over the vocabulary, r left unchanged."""
    offs = tl.arange(0, BLOCK_V)
    mass = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + offs
        r = tl.load(work_row + v, mask=v < V, other=0.0)
        mass += tl.sum(tl.maximum(r - _sparse_at(v, ids, probs) * scale, 0.0), axis=0)
    return mass


@triton.jit
def _apply_residual(work_row, ids, probs, scale):
    """r <- max(r - rem * scale, 0): only the entries in rem's support change."""
    live = ids >= 0
    rem = _sparse_at(ids, ids, probs)  # [BLOCK_M]
    r = tl.load(work_row + ids, mask=live, other=0.0)
    tl.debug_barrier()  # duplicate ids: every old value is read before any is overwritten
    tl.store(work_row + ids, tl.maximum(r - rem * scale, 0.0), mask=live)
    tl.debug_barrier()


@triton.jit
def _take_out(work_row, mass, ids, probs, q_mass, V, BLOCK_V: tl.constexpr):
    """After a rejection, r <- max(r - q_j * R / Q, 0) unless that leaves no mass; returns R."""
    if q_mass > 0:
        scale = tl.math.div_rn(mass, q_mass)
        new_mass = _residual_mass(work_row, ids, probs, scale, V, BLOCK_V)
        if new_mass > 0:  # vanishes only where r and q_j agree to rounding: keep r
            _apply_residual(work_row, ids, probs, scale)
            mass = new_mass
    return mass


@triton.jit
def _try_siblings(work_row, mass, cur, tokens_row, parents_row, q_ids_row, q_probs_row, u_row, N, M, V,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Recursive rejection over the children of `cur`: the accepted position, or -1.

    On -1 the workspace holds the final residual r to sample the recovered token from.
    """
    js = tl.arange(0, BLOCK_M)
    slots = tl.arange(0, BLOCK_N)
    excluded = tl.full([BLOCK_N], -1, tl.int64)  # tokens of the rejected earlier siblings
    n_excluded = tl.full([], 0, tl.int32)
    accepted = tl.full([], -1, tl.int32)
    for i in range(1, N):
        if (tl.load(parents_row + i) == cur) & (accepted < 0):
            x = tl.load(tokens_row + i)
            ids = tl.load(q_ids_row + i * M + js, mask=js < M, other=-1)
            probs = tl.load(q_probs_row + i * M + js, mask=js < M, other=0.0)
            # q_j: the node's q with the earlier siblings' tokens removed
            gone = tl.max((ids[:, None] == excluded[None, :]).to(tl.int32), axis=1) > 0
            ids = tl.where(gone, -1, ids)  # zero probabilities suffice; this also spares no-op stores
            probs = tl.where(gone, 0.0, probs)
            rem_x = tl.sum(tl.where(ids == x, probs, 0.0), axis=0)
            q_mass = tl.sum(probs, axis=0)
            u = tl.load(u_row + i)
            if (rem_x > 0) & (u * rem_x * mass <= tl.load(work_row + x) * q_mass):
                accepted = i
            else:
                mass = _take_out(work_row, mass, ids, probs, q_mass, V, BLOCK_V)
                excluded = tl.where(slots == n_excluded, x, excluded)
                n_excluded += 1
    return accepted


@triton.jit
def _walk_sampled(tokens_row, parents_row, p_row, q_ids_row, q_probs_row, u_row, noise_row, work_row, path_row,
                  N, M, V, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Recursive rejection down the tree: (num_accepted, next_token)."""
    cur = tl.full([], 0, tl.int32)
    depth = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    nxt = tl.full([], 0, tl.int32)
    for _ in range(0, N):  # at most N - 1 accepts, then the final sample
        if done == 0:
            mass = _load_residual(work_row, p_row + cur * V, V, BLOCK_V)
            child = _try_siblings(work_row, mass, cur, tokens_row, parents_row, q_ids_row, q_probs_row, u_row,
                                  N, M, V, BLOCK_N, BLOCK_M, BLOCK_V)
            if child >= 0:
                depth += 1
                tl.store(path_row + depth, child.to(tl.int64))
                cur = child
            else:
                nxt = _sample(work_row, noise_row, V, BLOCK_V)
                done = 1
    return depth, nxt.to(tl.int64)


@triton.jit
def _tree_kernel(tokens_ptr, parents_ptr, target_argmax_ptr, p_ptr, q_ids_ptr, q_probs_ptr, greedy_ptr,
                 uniforms_ptr, noise_ptr, work_ptr, path_ptr, num_out_ptr, next_out_ptr, N, M, V,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    path_row = path_ptr + b * N
    tl.store(path_row, tl.full([], 0, tl.int64))  # the root is always on the path
    if tl.load(greedy_ptr + b) != 0:
        num, nxt = _walk_greedy(tokens_ptr + b * N, parents_ptr + b * N, target_argmax_ptr + b * N, path_row,
                                N, BLOCK_N)
    else:
        num, nxt = _walk_sampled(tokens_ptr + b * N, parents_ptr + b * N, p_ptr + b * N * V, q_ids_ptr + b * N * M,
                                 q_probs_ptr + b * N * M, uniforms_ptr + b * N, noise_ptr + b * V,
                                 work_ptr + b * V, path_row, N, M, V, BLOCK_N, BLOCK_M, BLOCK_V)
    tl.store(num_out_ptr + b, num.to(tl.int64))
    tl.store(next_out_ptr + b, nxt)


# ---- entry points -------------------------------------------------------------------------------


def _check(args: dict[str, torch.Tensor], shapes: dict[str, tuple], dtypes: dict[str, torch.dtype]) -> list:
    """Validate shapes, dtypes and device once; return the tensors contiguous, in order."""
    device = next(iter(args.values())).device
    for name, t in args.items():
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shapes[name]}")
        if t.dtype != dtypes[name]:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {dtypes[name]}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
    return [t.contiguous() for t in args.values()]


def _blocks(m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_V): the vocab chunk shrinks as m grows so the id comparison stays small."""
    block_m = triton.next_power_of_2(max(m, 1))
    return block_m, max(128, min(1024, MAX_CHUNK // block_m))


def verify_chain_triton(
    draft_tokens: torch.Tensor,  # [batch, k] int64
    draft_len: torch.Tensor,  # [batch] int64 drafts actually proposed per row (<= k)
    target_argmax: torch.Tensor,  # [batch, k+1] int64 argmax of the target logits (greedy rows)
    p: torch.Tensor,  # [batch, k+1, vocab] float32 target distribution (sampled rows)
    q_ids: torch.Tensor,  # [batch, k, m] int64 sparse draft distribution of each draft token
    q_probs: torch.Tensor,  # [batch, k, m] float32 (zero for unused entries)
    greedy: torch.Tensor,  # [batch] bool
    uniforms: torch.Tensor,  # [batch, k] float32 U(0, 1) for the accept tests
    noise: torch.Tensor,  # [batch, vocab] float32 Exp(1) for the recovered or bonus token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_accepted [batch], next_token [batch]) int64; as `kernels.verify.verify_chain`."""
    batch, k = draft_tokens.shape
    vocab, m = p.shape[-1], q_ids.shape[-1]
    i64, f32 = torch.int64, torch.float32
    draft_tokens, draft_len, target_argmax, p, q_ids, q_probs, greedy, uniforms, noise = _check(
        dict(draft_tokens=draft_tokens, draft_len=draft_len, target_argmax=target_argmax, p=p, q_ids=q_ids,
             q_probs=q_probs, greedy=greedy, uniforms=uniforms, noise=noise),
        dict(draft_tokens=(batch, k), draft_len=(batch,), target_argmax=(batch, k + 1), p=(batch, k + 1, vocab),
             q_ids=(batch, k, m), q_probs=(batch, k, m), greedy=(batch,), uniforms=(batch, k), noise=(batch, vocab)),
        dict(draft_tokens=i64, draft_len=i64, target_argmax=i64, p=f32, q_ids=i64, q_probs=f32, greedy=torch.bool,
             uniforms=f32, noise=f32),
    )
    num_accepted = torch.zeros(batch, dtype=i64, device=p.device)
    next_token = torch.zeros(batch, dtype=i64, device=p.device)
    if batch == 0:
        return num_accepted, next_token
    block_m, block_v = _blocks(m)
    _chain_kernel[(batch,)](
        draft_tokens, draft_len, target_argmax, p, q_ids, q_probs, greedy.view(torch.uint8), uniforms, noise,
        num_accepted, next_token, k, m, vocab,
        BLOCK_K=triton.next_power_of_2(max(k, 1)), BLOCK_M=block_m, BLOCK_V=block_v, enable_fp_fusion=False,
    )
    return num_accepted, next_token


def verify_tree_triton(
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

    As `kernels.tree.verify_tree`.
    """
    batch, n = tokens.shape
    vocab, m = p.shape[-1], q_ids.shape[-1]
    if not 1 <= n <= MAX_TREE:
        raise ValueError(f"a tree block has 1 to {MAX_TREE} positions, got {n}")
    i64, f32 = torch.int64, torch.float32
    tokens, parents, target_argmax, p, q_ids, q_probs, greedy, uniforms, noise = _check(
        dict(tokens=tokens, parents=parents, target_argmax=target_argmax, p=p, q_ids=q_ids, q_probs=q_probs,
             greedy=greedy, uniforms=uniforms, noise=noise),
        dict(tokens=(batch, n), parents=(batch, n), target_argmax=(batch, n), p=(batch, n, vocab),
             q_ids=(batch, n, m), q_probs=(batch, n, m), greedy=(batch,), uniforms=(batch, n), noise=(batch, vocab)),
        dict(tokens=i64, parents=i64, target_argmax=i64, p=f32, q_ids=i64, q_probs=f32, greedy=torch.bool,
             uniforms=f32, noise=f32),
    )
    path = torch.full((batch, n), -1, dtype=i64, device=p.device)
    num_accepted = torch.zeros(batch, dtype=i64, device=p.device)
    next_token = torch.zeros(batch, dtype=i64, device=p.device)
    if batch == 0:
        return path, num_accepted, next_token
    work = torch.empty(batch, vocab, dtype=f32, device=p.device)  # the residual r of each row
    block_m, block_v = _blocks(m)
    _tree_kernel[(batch,)](
        tokens, parents, target_argmax, p, q_ids, q_probs, greedy.view(torch.uint8), uniforms, noise, work,
        path, num_accepted, next_token, n, m, vocab,
        BLOCK_N=triton.next_power_of_2(n), BLOCK_M=block_m, BLOCK_V=block_v, enable_fp_fusion=False,
    )
    return path, num_accepted, next_token
