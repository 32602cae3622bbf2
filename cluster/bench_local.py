"""`specserve bench`: in-process speculative decoding against plain decoding and its peers.

All modes run on the same prompts in the same process, interleaved prompt by prompt so that
machine noise hits every mode alike:
  plain        our engine, target only (k = 0)
  plain-modules  the same through transformers' modules (no lean forward; shows what it saves)
  model        our engine with the model drafter as it runs by default: prompt lookup where
               the last token occurred before, the drafter model everywhere else
  model-no-lookup  the same drafter model drafting every token (prompt lookup off)
  ngram        our engine with the n-gram (prompt lookup) drafter
  hf-greedy    transformers `generate`, target only (reference)
  hf-assisted  transformers assisted generation (`assistant_model`) with the same pair (peer)
Efficiency is the measured speedup over plain divided by the analytic bound
(1 - a^(k+1)) / ((1 - a)(k c + 1)) at the measured acceptance a, mean draft length k and
cost ratio c (drafting time per draft token / one plain target step). `lookups` is the share of
the model drafter's drafting steps whose draft came from prompt lookup.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from specserve.actors.demo import demo_path
from specserve.actors.demo.corpus import (MANIFEST, def_prompts, is_held_out, iter_python_files, stdlib_root,
                                          third_party_files, trained_files)
from specserve.actors.engine.build import EngineSpec, build_engine
from specserve.actors.engine.engine import Timing
from specserve.actors.engine.request import make_params
from specserve.cluster.reporting import text_table, write_report

ENGINE_MODES = ("plain", "plain-modules", "model", "model-no-lookup", "ngram")
HF_MODES = ("hf-greedy", "hf-assisted")


def held_out_files():
    """Standard-library files the demo pair was not trained on (per its training manifest)."""
    trained = trained_files() if MANIFEST.exists() else None
    for f in iter_python_files(stdlib_root()):
        if (f.relpath not in trained) if trained is not None else is_held_out(f.relpath):
            yield f


def code_prompts(tokenizer, count: int, max_prompt_tokens: int = 96, seed: int = 0) -> list[list[int]]:
    """Prompts that end with a `def` line of held-out code, so the model writes a function body:
    one per held-out standard-library file, then (when more are asked for) one per file of the
    installed third-party packages, which the demo pair never saw either."""
    rng = random.Random(seed)
    files = list(held_out_files())
    rng.shuffle(files)
    extra = third_party_files(limit=20 * count) if count > len(files) else []
    rng.shuffle(extra)
    return def_prompts(files + extra, tokenizer, count, max_prompt_tokens, rng)


@dataclass
class ModeTotals:
    """What one mode accumulated over all prompts."""

    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    timing: Timing = field(default_factory=Timing)  # the mode's engine timing (engine modes only)
    lookup_drafts: int = 0  # drafts that came from the model drafter's prompt lookup
    outputs: list = field(default_factory=list)


def analytic_bound(a: float, k: float, c: float) -> float:
    """Expected speedup of speculative decoding: (1 - a^(k+1)) / ((1 - a)(k c + 1))."""
    gain = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return gain / (k * c + 1)


def run_engine(engine, prompt, params, totals: ModeTotals) -> None:
    """One request through an engine, added to the mode's totals."""
    start = time.perf_counter()
    [res] = engine.generate([prompt], params)
    totals.seconds += time.perf_counter() - start
    totals.tokens += len(res.token_ids)
    totals.drafted += res.stats.drafted
    totals.accepted += res.stats.accepted
    totals.steps += res.stats.steps
    totals.timing = engine.timing  # the engine runs only this mode's prompts after the warm-up
    totals.lookup_drafts = getattr(engine.drafter, "lookup_drafts", 0)
    totals.outputs.append(res.token_ids)


@torch.inference_mode()
def _run_hf(target, assistant, prompt, max_tokens, eos, totals: ModeTotals) -> None:
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    start = time.perf_counter()
    out = target.generate(ids, **kwargs)
    totals.seconds += time.perf_counter() - start
    toks = out[0, len(prompt):].tolist()
    totals.tokens += len(toks)
    totals.outputs.append(toks)


def _hf_models():
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(demo_path("target"), dtype=torch.float32).eval()
    drafter = AutoModelForCausalLM.from_pretrained(demo_path("drafter"), dtype=torch.float32).eval()
    return target, drafter


def run_bench(num_prompts: int = 8, max_tokens: int = 128, k_max: int = 8, threshold: float = 0.0,
              include_hf: bool = True, seed: int = 0, progress=print) -> dict:
    """Run every mode over the same prompts; returns the table rows and the settings."""
    engines = {}
    for mode in ENGINE_MODES:
        kind = "none" if mode.startswith("plain") else "model" if mode.startswith("model") else mode
        spec = EngineSpec(demo_path("target"), kind, demo_path("drafter") if kind == "model" else None,
                          max_num_seqs=2, k_max=k_max, confidence_threshold=threshold, lean=mode != "plain-modules",
                          prompt_lookup=0 if mode == "model-no-lookup" else EngineSpec.prompt_lookup)
        engines[mode] = build_engine(spec)
    tokenizer = engines["plain"].tokenizer
    eos = tokenizer.eos_token_id
    hf = _hf_models() if include_hf else None
    prompts = code_prompts(tokenizer, num_prompts, seed=seed)
    params = make_params(max_tokens=max_tokens)
    modes = list(ENGINE_MODES) + (list(HF_MODES) if include_hf else [])
    totals = {m: ModeTotals() for m in modes}
    for eng in engines.values():  # warm-up: first calls allocate and fill caches
        eng.generate([prompts[0][:16]], make_params(max_tokens=8))
        eng.timing = Timing()
        if hasattr(eng.drafter, "lookup_drafts"):
            eng.drafter.lookup_drafts = 0
    for i, prompt in enumerate(prompts):
        for mode in modes:
            if mode in engines:
                run_engine(engines[mode], prompt, params, totals[mode])
            else:
                _run_hf(hf[0], hf[1] if mode == "hf-assisted" else None, prompt, max_tokens, eos, totals[mode])
        progress(f"prompt {i + 1}/{len(prompts)} done")
    return {"settings": {"prompts": len(prompts), "max_tokens": max_tokens, "k_max": k_max,
                         "confidence_threshold": threshold, "threads": torch.get_num_threads()},
            "rows": _rows(totals)}


def _rows(totals: dict[str, ModeTotals]) -> list[dict]:
    plain = totals["plain"]
    plain_tps = plain.tokens / plain.seconds
    t_target = plain.timing.verify_s / max(plain.timing.verify_steps, 1)
    rows = []
    for mode, t in totals.items():
        tps = t.tokens / t.seconds if t.seconds else 0.0
        row = {"mode": mode, "tokens": t.tokens, "seconds": round(t.seconds, 3), "tokens_per_s": round(tps, 2),
               "speedup": round(tps / plain_tps, 3),
               "matches_plain": sum(a == b for a, b in zip(t.outputs, plain.outputs)) / max(len(plain.outputs), 1)}
        if t.steps and t.drafted:
            a = t.accepted / t.drafted
            k = t.drafted / t.steps
            c = (t.timing.draft_s / t.drafted) / t_target  # drafting time per draft token
            bound = analytic_bound(a, k, c)
            row.update(acceptance_rate=round(a, 4), mean_accepted_length=round((t.accepted + t.steps) / t.steps, 3),
                       mean_draft_length=round(k, 3), cost_ratio_c=round(c, 4), analytic_bound=round(bound, 3),
                       efficiency=round(row["speedup"] / bound, 3),
                       lookup_share=round(t.lookup_drafts / t.timing.draft_steps, 3) if t.timing.draft_steps else 0.0)
        rows.append(row)
    return rows


def format_table(report: dict) -> str:
    """The rows as a fixed-width text table."""
    cols = ["mode", "tokens_per_s", "speedup", "acceptance_rate", "mean_accepted_length", "mean_draft_length",
            "cost_ratio_c", "analytic_bound", "efficiency", "lookup_share", "matches_plain"]
    head = ["mode", "tok/s", "speedup", "accept", "mean_acc_len", "k", "c", "bound", "efficiency", "lookups",
            "=plain"]
    return text_table(report["rows"], cols, head, 12)


def bench_main(args) -> int:
    """CLI entry: run, print the table, write JSON."""
    report = run_bench(args.prompts, args.max_tokens, args.k_max, args.threshold, not args.no_hf, args.seed)
    write_report(report, format_table(report), args.out)
    return 0
