"""`specserve bench --trees`: token trees against chains at the same verify budget (demo pair).

For each budget B (draft positions the target verifies per step), on the same prompts,
interleaved prompt by prompt:
  chain-B         the model drafter drafts exactly B tokens in a chain (no confidence stop)
  tree-B          the tree drafter fills a tree of exactly B tokens (depth <= B, best first) from
                  the model's candidates alone (`lookup=0`)
  lookup-tree-B   the same with the sequence's prompt-lookup continuation merged in (greedy
                  requests; the default of `speculation.tree_lookup`)
  ngram-B         the n-gram (prompt-lookup) drafter alone, up to B tokens in a chain
plus plain decoding (the speedup baseline) and the default adaptive chain. The fixed modes
verify the same number of positions per step (ngram-B at most that many: it drafts only what
it finds), so accepted tokens per verifier step compare their drafts alone; tokens/s adds what
drafting a tree costs (one drafter forward per level over more nodes). Every mode's output must
equal plain decoding (greedy).
"""

from __future__ import annotations

import torch

from specserve.actors.demo import demo_path
from specserve.actors.engine.build import EngineSpec, build_engine
from specserve.actors.engine.draft_length import DraftLengthConfig
from specserve.actors.engine.drafters import ModelDrafter, NgramDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.request import make_params
from specserve.actors.engine.tree_drafting import TreeDrafter
from specserve.cluster.bench_local import ModeTotals, code_prompts, run_engine
from specserve.cluster.reporting import text_table, write_report


def _engines(budgets: list[int], branching: int, device: str) -> dict[str, SpeculativeEngine]:
    plain = build_engine(EngineSpec(demo_path("target"), "none", max_num_seqs=2, device=device))
    adaptive = build_engine(EngineSpec(demo_path("target"), "model", demo_path("drafter"), max_num_seqs=2,
                                       device=device, prompt_lookup=0))
    engines = {"plain": plain, "chain-adaptive": adaptive}
    drafter_runner = adaptive.drafter.runner
    for b in budgets:
        chain = ModelDrafter(_fresh_runner(drafter_runner), confidence_threshold=0.0)
        engines[f"chain-{b}"] = SpeculativeEngine(_fresh_runner(plain.target), plain.tokenizer, chain,
                                                  DraftLengthConfig(k_max=b, fixed_k=b))
        for mode, lookup in ((f"tree-{b}", 0), (f"lookup-tree-{b}", EngineSpec.tree_lookup)):
            tree = TreeDrafter(_fresh_runner(drafter_runner), branching=branching, lookup=lookup)
            engines[mode] = SpeculativeEngine(_fresh_runner(plain.target), plain.tokenizer, tree,
                                              DraftLengthConfig(k_max=b, fixed_k=b, tree_nodes=b))
        engines[f"ngram-{b}"] = SpeculativeEngine(_fresh_runner(plain.target), plain.tokenizer, NgramDrafter(),
                                                  DraftLengthConfig(k_max=b, fixed_k=b))
    return engines


def _fresh_runner(runner):
    """Another runner over the same weights (its own KV cache)."""
    return type(runner)(runner.model, runner.cfg)


def run_tree_bench(budgets: list[int], num_prompts: int = 8, max_tokens: int = 96, branching: int = 3,
                   seed: int = 0, temperature: float = 0.0, device: str = "cpu", progress=print) -> dict:
    """Every mode over the same prompts; returns rows, tree/chain ratios and the settings.

    temperature > 0: sampled requests (seeded per prompt, the same seed in every mode), so
    outputs differ between modes and only the distribution is the target's.
    """
    engines = _engines(budgets, branching, device)
    prompts = code_prompts(engines["plain"].tokenizer, num_prompts, seed=seed)
    params = make_params(max_tokens=max_tokens, temperature=temperature)
    for eng in engines.values():  # warm-up
        eng.generate([prompts[0][:16]], make_params(max_tokens=8))
    totals = {m: ModeTotals() for m in engines}
    for i, prompt in enumerate(prompts):
        for mode, eng in engines.items():
            if temperature > 0:  # unseeded: no fixed k for seeded requests, and every mode draws afresh
                params = make_params(max_tokens=max_tokens, temperature=temperature)
            run_engine(eng, prompt, params, totals[mode])
        progress(f"prompt {i + 1}/{len(prompts)} done")
    rows = _rows(totals)
    by_mode = {r["mode"]: r for r in rows}

    def ratio(a: str, b: str, key: str) -> float:
        return round(by_mode[a][key] / max(by_mode[b][key], 1e-9), 3)

    ratios = [{"budget": b,
               "accepted_per_step_ratio": ratio(f"tree-{b}", f"chain-{b}", "accepted_per_step"),
               "tokens_per_s_ratio": ratio(f"tree-{b}", f"chain-{b}", "tokens_per_s"),
               "lookup_accepted_per_step_ratio": ratio(f"lookup-tree-{b}", f"chain-{b}", "accepted_per_step"),
               "lookup_tokens_per_s_ratio": ratio(f"lookup-tree-{b}", f"chain-{b}", "tokens_per_s"),
               "lookup_vs_ngram_accepted_per_step_ratio": ratio(f"lookup-tree-{b}", f"ngram-{b}", "accepted_per_step")}
              for b in budgets]
    return {"settings": {"prompts": len(prompts), "max_tokens": max_tokens, "budgets": budgets,
                         "branching": branching, "temperature": temperature, "threads": torch.get_num_threads(),
                         "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"},
            "rows": rows, "tree_vs_chain": ratios}


def _rows(totals: dict[str, ModeTotals]) -> list[dict]:
    plain = totals["plain"]
    plain_tps = plain.tokens / plain.seconds
    rows = []
    for mode, t in totals.items():
        tps = t.tokens / t.seconds
        rows.append({"mode": mode, "tokens_per_s": round(tps, 2), "speedup": round(tps / plain_tps, 3),
                     "verified_per_step": round(t.drafted / t.steps, 3),
                     "accepted_per_step": round(t.accepted / t.steps, 3),
                     "tokens_per_step": round((t.accepted + t.steps) / t.steps, 3),
                     "matches_plain": sum(a == b for a, b in zip(t.outputs, plain.outputs)) / len(plain.outputs)})
        # (sampled runs: matching plain is not expected; the distribution is what is lossless)
    return rows


def format_tables(report: dict) -> str:
    cols = ["mode", "tokens_per_s", "speedup", "verified_per_step", "accepted_per_step", "tokens_per_step",
            "matches_plain"]
    head = ["mode", "tok/s", "speedup", "drafts/step", "accepted/step", "tokens/step", "=plain"]
    ratio_cols = ["budget", "accepted_per_step_ratio", "tokens_per_s_ratio", "lookup_accepted_per_step_ratio",
                  "lookup_tokens_per_s_ratio", "lookup_vs_ngram_accepted_per_step_ratio"]
    ratio_head = ["budget", "tree/chain acc", "tree/chain tok/s", "lookup-tree/chain acc", "lookup-tree/chain tok/s",
                  "lookup-tree/ngram acc"]
    return (text_table(report["rows"], cols, head, 14) + "\n\n"
            + text_table(report["tree_vs_chain"], ratio_cols, ratio_head, 20))


def bench_trees_main(args) -> int:
    """CLI entry: run, print the tables, write JSON."""
    budgets = [int(b) for b in args.budgets.split(",")]
    report = run_tree_bench(budgets, args.prompts, args.max_tokens, args.branching, args.seed, args.temperature,
                            args.device)
    write_report(report, format_tables(report), args.out)
    return 0
