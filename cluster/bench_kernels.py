"""`specserve bench --kernels`: each Triton kernel against its torch reference on one GPU.

Both implementations run on the same CUDA tensors, interleaved, timed with CUDA events after a
warm-up; the outputs are compared first (sampling kernels must agree token for token). Sizes:
  chain-sampling  batch 64, k 8, vocabulary 32,000, sparse q of 16 entries (the issue's target)
  tree-sampling   batch 64, trees of 16 nodes, vocabulary 32,000
  tree-attention  batch 16, 32 query / 8 kv heads of 128, 1,024 cached tokens, 16-node trees, bf16
  compaction      one layer of the same cache, accepted paths of up to 8 nodes
"""

from __future__ import annotations

import torch

from specserve.cluster.reporting import text_table, write_report


def _time_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _random_parents(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    parents = torch.full((batch, n), -1, dtype=torch.long)
    for i in range(1, n):
        parents[:, i] = torch.randint(0, i, (batch,), generator=gen)
    return parents


def _sampling_inputs(batch: int, n: int, vocab: int, m: int, gen: torch.Generator, dev: str):
    p = torch.softmax(3 * torch.randn(batch, n, vocab, generator=gen), -1)
    q_ids = torch.randint(0, vocab, (batch, n, m), generator=gen)
    q_probs = torch.softmax(torch.randn(batch, n, m, generator=gen), -1)
    tokens = q_ids[:, :, 0].clone()
    target_argmax = p.argmax(-1)
    # make long accepted runs common: half the draft tokens equal the target's argmax
    agree = torch.rand(batch, n, generator=gen) < 0.5
    tokens = torch.where(agree, target_argmax.roll(1, dims=1), tokens)
    q_ids[:, :, 0] = tokens
    greedy = torch.rand(batch, generator=gen) < 0.25
    uniforms = torch.rand(batch, n, generator=gen)
    noise = torch.empty(batch, vocab).exponential_(generator=gen)
    to = lambda t: t.to(dev)  # noqa: E731
    return [to(t) for t in (tokens, target_argmax, p, q_ids, q_probs, greedy, uniforms, noise)]


def bench_chain(dev: str, gen, iters: int) -> dict:
    from specserve.kernels.triton_sampling import verify_chain_triton
    from specserve.kernels.verify import verify_chain

    batch, k, vocab, m = 64, 8, 32000, 16
    tokens, target_argmax, p, q_ids, q_probs, greedy, uniforms, noise = _sampling_inputs(batch, k + 1, vocab, m, gen, dev)
    draft_len = torch.randint(0, k + 1, (batch,), generator=gen).to(dev)
    args = (tokens[:, 1:].contiguous(), draft_len, target_argmax, p, q_ids[:, 1:].contiguous(),
            q_probs[:, 1:].contiguous(), greedy, uniforms[:, 1:].contiguous(), noise)
    same = all(torch.equal(a, b) for a, b in zip(verify_chain(*args), verify_chain_triton(*args)))
    return _row("chain-sampling", "batch 64, k 8, vocab 32000, m 16", same,
                _time_ms(lambda: verify_chain(*args), iters), _time_ms(lambda: verify_chain_triton(*args), iters))


def bench_tree(dev: str, gen, iters: int) -> dict:
    from specserve.kernels.tree import verify_tree
    from specserve.kernels.triton_sampling import verify_tree_triton

    batch, n, vocab, m = 64, 17, 32000, 16
    tokens, target_argmax, p, q_ids, q_probs, greedy, uniforms, noise = _sampling_inputs(batch, n, vocab, m, gen, dev)
    parents = _random_parents(batch, n, gen).to(dev)
    args = (tokens, parents, target_argmax, p, q_ids, q_probs, greedy, uniforms, noise)
    same = all(torch.equal(a, b) for a, b in zip(verify_tree(*args), verify_tree_triton(*args)))
    return _row("tree-sampling", "batch 64, 16 nodes, vocab 32000, m 16", same,
                _time_ms(lambda: verify_tree(*args), max(2, iters // 20)), _time_ms(lambda: verify_tree_triton(*args), iters))


def bench_attention(dev: str, gen, iters: int) -> dict:
    from specserve.kernels.tree import tree_mask
    from specserve.kernels.tree_attention import tree_attention_reference
    from specserve.kernels.triton_attention import tree_attention_triton

    batch, heads, kv_heads, dim, prefix, n = 16, 32, 8, 128, 1024, 17
    dt = torch.bfloat16
    k_cache = torch.randn(batch, prefix + 64, kv_heads, dim, generator=gen).to(dev, dt)
    v_cache = torch.randn(batch, prefix + 64, kv_heads, dim, generator=gen).to(dev, dt)
    query = torch.randn(batch, heads, n, dim, generator=gen).to(dev, dt)
    slots = torch.randperm(batch, generator=gen).to(dev)
    prefix_len = torch.randint(prefix // 2, prefix, (batch,), generator=gen).to(dev)
    mask = tree_mask(_random_parents(batch, n, gen)).to(dev)
    args = (query, k_cache, v_cache, slots, prefix_len, mask, dim ** -0.5)
    ref, tri = tree_attention_reference(*args), tree_attention_triton(*args)
    same = bool(torch.allclose(ref.float(), tri.float(), atol=2e-2, rtol=2e-2))
    return _row("tree-attention", "batch 16, heads 32/8 x 128, prefix ~1k, 17 pos, bf16", same,
                _time_ms(lambda: tree_attention_reference(*args), iters), _time_ms(lambda: tree_attention_triton(*args), iters))


def bench_compaction(dev: str, gen, iters: int) -> dict:
    from specserve.kernels.compaction import compact_kv_reference
    from specserve.kernels.triton_compaction import compact_kv_triton

    batch, kv_heads, dim, prefix, n = 16, 8, 128, 1024, 17
    base_k = torch.randn(batch, prefix + 64, kv_heads, dim, generator=gen).to(dev, torch.bfloat16)
    base_v = torch.randn(batch, prefix + 64, kv_heads, dim, generator=gen).to(dev, torch.bfloat16)
    path = torch.full((batch, n), -1, dtype=torch.long)
    for b in range(batch):
        picked = sorted(torch.randperm(n - 1, generator=gen)[: 1 + b % 8].add(1).tolist())
        path[b, : 1 + len(picked)] = torch.tensor([0] + picked)
    slots, prefix_len, path = torch.arange(batch).to(dev), torch.full((batch,), prefix - 64).to(dev), path.to(dev)
    ref_k, ref_v, tri_k, tri_v = base_k.clone(), base_v.clone(), base_k.clone(), base_v.clone()
    compact_kv_reference(ref_k, ref_v, slots, prefix_len, path)
    compact_kv_triton(tri_k, tri_v, slots, prefix_len, path)
    same = torch.equal(ref_k, tri_k) and torch.equal(ref_v, tri_v)
    return _row("compaction", "one layer, batch 16, kv 8 x 128, paths <= 8", same,
                _time_ms(lambda: compact_kv_reference(ref_k, ref_v, slots, prefix_len, path), iters),
                _time_ms(lambda: compact_kv_triton(tri_k, tri_v, slots, prefix_len, path), iters))


def _row(kernel: str, shape: str, same: bool, torch_ms: float, triton_ms: float) -> dict:
    return {"kernel": kernel, "shape": shape, "outputs_match": same, "torch_ms": round(torch_ms, 4),
            "triton_ms": round(triton_ms, 4), "speedup": round(torch_ms / triton_ms, 2)}


def run_kernel_bench(iters: int = 50, progress=print) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark needs a CUDA GPU (the CPU runs only the torch references)")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for bench in (bench_chain, bench_tree, bench_attention, bench_compaction):
        rows.append(bench("cuda", gen, iters))
        progress(f"{rows[-1]['kernel']}: done")
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


def format_table(report: dict) -> str:
    cols = ["kernel", "torch_ms", "triton_ms", "speedup", "outputs_match", "shape"]
    return f"device: {report['device']}\n" + text_table(report["rows"], cols, cols, 14)


def bench_kernels_main(args) -> int:
    report = run_kernel_bench()
    write_report(report, format_table(report), args.out)
    return 0
