"""`specserve bench --suffix`: the suffix drafter against prompt lookup alone on repeated traffic.

The workload is what agents and tools send: the same functions asked for again. From Python
sources of installed third-party packages (code the demo pair never saw: it trained on the
standard library), each of `functions` functions is requested in `repeats` rounds, all functions
once per round: the lines before its `def` and the `def` line, under a round-specific header
comment (a template filled in differently), so the target writes a similar body each time. Modes,
interleaved request by request in one process, each with its own engine:
  plain               the target alone (k = 0)
  ngram-lookup        prompt lookup alone: the latest continuation of the last 1-4 tokens in the
                      request's own context (the drafter before the suffix index)
  ngram-suffix-own    the suffix index over the request's own context only (no global store):
                      what the drafting rule alone changes
  ngram-suffix        the suffix index: own context and the requests this engine finished before
  model-lookup        the model drafter with prompt lookup where the last token repeats (the
                      verifier's local drafter before the suffix index, with the replicas' model)
  model-suffix-own    the model drafter with the suffix index over the request's own context only
  model-suffix        the same with the suffix index and its store (the default)
  model-suffix-b      a second replica: the suffix index with no store of its own, fed (with
                      `add_finished`, the call the replicas' share makes) the requests
                      model-suffix finished in the earlier rounds: the speedup on one replica
                      from traffic another replica served
Rows give tokens/s, the speedup over plain and acceptance over all rounds, the first round and the
rounds after it (where the same requests were served before), and accepted drafts per token.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from specserve.actors.demo import demo_path
from specserve.actors.demo.corpus import third_party_files
from specserve.actors.engine.build import EngineSpec, build_engine
from specserve.actors.engine.drafters import PromptLookup
from specserve.actors.engine.engine import Timing
from specserve.actors.engine.request import make_params
from specserve.actors.engine.suffix import SuffixConfig
from specserve.cluster.reporting import text_table, write_report

MODES = ("plain", "ngram-lookup", "ngram-suffix-own", "ngram-suffix", "model-lookup", "model-suffix-own",
         "model-suffix", "model-suffix-b")
HEADERS = ("# helper, as in the module\n", "# same function, second request\n", "# rewritten on request\n",
           "# again: keep the behaviour\n")


class LookupOnly:
    """Prompt lookup behind the suffix index's interface: the index before it learned from traffic."""

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.lookup = PromptLookup(max_n, min_n)
        self.store_tokens = 0

    def draft(self, seq_id: int, context: list[int], k: int, shared: bool = True) -> list[int]:
        return self.lookup.continuation(seq_id, context, k)

    def drop(self, seq_id: int) -> None:
        self.lookup.drop(seq_id)

    def finish(self, seq_id: int, tokens: list[int] | None = None) -> None:
        self.lookup.drop(seq_id)


def function_prompts(tokenizer, functions: int, seed: int = 0, max_prompt_tokens: int = 160) -> list[str]:
    """Texts ending with the `def` line of a third-party function with a body of 4-40 lines."""
    rng = random.Random(seed)
    files = third_party_files(limit=4000)
    rng.shuffle(files)
    out = []
    for f in files:
        lines = f.text.splitlines(keepends=True)
        defs = [i for i, line in enumerate(lines) if line.startswith("def ") and line.rstrip().endswith(":")]
        if not defs:
            continue
        i = rng.choice(defs)
        text = "".join(lines[max(0, i - 10) : i + 1])
        if len(tokenizer(text)["input_ids"]) <= max_prompt_tokens:
            out.append(text)
        if len(out) == functions:
            break
    return out


def workload(tokenizer, functions: int, repeats: int, seed: int) -> list[tuple[int, list[int]]]:
    """(round, prompt ids) of every request, round by round."""
    texts = function_prompts(tokenizer, functions, seed)
    return [(r, tokenizer(HEADERS[r % len(HEADERS)] + t)["input_ids"]) for r in range(repeats) for t in texts]


SPANS = ("all", "first", "later")  # every round; the first round; the rounds after it


@dataclass
class Totals:
    """What one mode accumulated in each span (SPANS)."""

    tokens: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    drafted: list[int] = field(default_factory=lambda: [0, 0, 0])
    accepted: list[int] = field(default_factory=lambda: [0, 0, 0])
    outputs: list = field(default_factory=list)


class ReplicaB:
    """Replica B's view of replica A's traffic: what A finished reaches B's index a round later
    (as the share would pass it on); B keeps nothing of its own."""

    def __init__(self, a, b):
        self.pending: list[list[int]] = []
        self.b_index = b.drafter.chain_lookup
        finished_a = a.drafter.finished

        def on_a_finished(seq_id, tokens):
            self.pending.append(list(tokens))
            finished_a(seq_id, tokens)
        a.drafter.finished = on_a_finished
        b.drafter.finished = lambda seq_id, tokens: self.b_index.drop(seq_id)

    def new_round(self) -> None:
        """Hand B what A finished in the rounds so far."""
        for tokens in self.pending:
            self.b_index.add_finished(tokens)
        self.pending = []


def _engine(mode: str, k_max: int):
    kind = "none" if mode == "plain" else mode.split("-")[0]
    suffix = SuffixConfig(max_tokens=0) if mode.endswith("-own") else SuffixConfig()
    spec = EngineSpec(demo_path("target"), kind, demo_path("drafter") if kind == "model" else None,
                      max_num_seqs=2, k_max=k_max, suffix=suffix)
    engine = build_engine(spec)
    if mode.endswith("lookup"):
        if kind == "ngram":
            engine.drafter.lookup = LookupOnly()
        else:
            engine.drafter.chain_lookup = LookupOnly(4, spec.prompt_lookup)
    return engine


def _run(engine, prompt: list[int], params, totals: Totals, later: bool) -> None:
    start = time.perf_counter()
    [res] = engine.generate([prompt], params)
    elapsed = time.perf_counter() - start
    for i in (0, 2 if later else 1):
        totals.tokens[i] += len(res.token_ids)
        totals.seconds[i] += elapsed
        totals.drafted[i] += res.stats.drafted
        totals.accepted[i] += res.stats.accepted
    totals.outputs.append(res.token_ids)


def run_suffix_bench(functions: int = 6, repeats: int = 3, max_tokens: int = 128, k_max: int = 8, seed: int = 0,
                     progress=print) -> dict:
    """Every mode over the same requests; returns the table rows and the settings."""
    engines = {m: _engine(m, k_max) for m in MODES}
    tokenizer = engines["plain"].tokenizer
    requests = workload(tokenizer, functions, repeats, seed)
    for eng in engines.values():  # warm-up on a prompt outside the workload; nothing is stored
        eng.generate([tokenizer("def warm_up(x):\n")["input_ids"]], make_params(max_tokens=8))
        eng.timing = Timing()
        for index in (getattr(eng.drafter, "lookup", None), getattr(eng.drafter, "chain_lookup", None)):
            if hasattr(index, "forget_finished"):
                index.forget_finished()
    params = make_params(max_tokens=max_tokens)
    totals = {m: Totals() for m in MODES}
    replica_b = ReplicaB(engines["model-suffix"], engines["model-suffix-b"])
    for n, (rnd, prompt) in enumerate(requests):
        if n and rnd != requests[n - 1][0]:
            replica_b.new_round()
        for mode in MODES:
            _run(engines[mode], prompt, params, totals[mode], rnd > 0)
        progress(f"request {n + 1}/{len(requests)} (round {rnd + 1}) done")
    lookups = {m: getattr(e.drafter, "lookup_drafts", None) for m, e in engines.items()}
    return {"settings": {"functions": functions, "repeats": repeats, "max_tokens": max_tokens, "k_max": k_max,
                         "seed": seed, "threads": torch.get_num_threads(), "requests": len(requests)},
            "rows": _rows(totals, lookups)}


def _rows(totals: dict[str, Totals], lookups: dict) -> list[dict]:
    plain = totals["plain"]
    rows = []
    for mode, t in totals.items():
        row = {"mode": mode, "tokens": t.tokens[0],
               "matches_plain": sum(a == b for a, b in zip(t.outputs, plain.outputs)) / max(len(plain.outputs), 1),
               "model_lookup_drafts": lookups[mode]}
        for i, tag in enumerate(SPANS):
            tps = t.tokens[i] / t.seconds[i] if t.seconds[i] else 0.0
            row[f"tokens_per_s_{tag}"] = round(tps, 2)
            row[f"speedup_{tag}"] = round(tps / (plain.tokens[i] / plain.seconds[i]), 3) if plain.seconds[i] else None
            row[f"acceptance_{tag}"] = round(t.accepted[i] / t.drafted[i], 3) if t.drafted[i] else None
            row[f"accepted_per_token_{tag}"] = round(t.accepted[i] / t.tokens[i], 3) if t.tokens[i] else None
        rows.append(row)
    return rows


def format_table(report: dict) -> str:
    """The rows as a fixed-width text table, with the suffix/lookup ratios under it."""
    cols = ["mode"] + [f"{m}_{span}" for span in SPANS for m in ("tokens_per_s", "speedup", "acceptance")] \
        + ["accepted_per_token_all", "matches_plain"]
    head = ["mode"] + [f"{m}{tag}" for tag in ("", " r1", " r2+") for m in ("tok/s", "speedup", "accept")] \
        + ["acc/token", "=plain"]
    rows = {r["mode"]: r for r in report["rows"]}
    lines = [text_table(report["rows"], cols, head, 12)]
    for name, (num, den) in {"ngram: suffix / lookup": ("ngram-suffix", "ngram-lookup"),
                             "model: suffix / lookup": ("model-suffix", "model-lookup"),
                             "replica B fed by A / B alone": ("model-suffix-b", "model-suffix-own")}.items():
        if num not in rows or den not in rows:
            continue
        s, p = rows[num], rows[den]
        ratios = ", ".join(f"{s[f'tokens_per_s_{span}'] / p[f'tokens_per_s_{span}']:.3f} ({span})" for span in SPANS
                           if p[f"tokens_per_s_{span}"])
        lines.append(f"{name} tokens/s = {ratios}")
    return "\n".join(lines)


def bench_suffix_main(args) -> int:
    """CLI entry: run, print the table, write JSON."""
    report = run_suffix_bench(args.functions, args.repeats, args.max_tokens, args.k_max, args.seed)
    write_report(report, format_table(report), args.out)
    return 0
