"""`specserve bench --serving`: the deployed system through gRPC, variants side by side.

Three applications of the demo pair share one local cluster (and one gRPC port; the client
picks one with the `application` metadata key): plain decoding of the target, speculative
decoding with synchronous drafting, with pipelined drafting, and with pipelined drafting whose
drafts made ahead are pushed into the verifier's speculation cache (`cached`, the default). For each concurrency level
the variants run the same requests one after another, in a rotating order, several rounds,
so machine noise hits them alike; every round of every level has prompts of its own (held-out
code, `seed` choosing them), so no variant is ever asked a prompt twice. Reported per variant and level: aggregate tokens/s,
speedup over plain at the same level, acceptance, TTFT and inter-token latency percentiles,
the verifier's median draft round-trip overhead, and the drafter replica's drafts and how many
of them pipelined drafting had ready when the verdict came (`ahead_hits`), and for the cache the
drafts taken from it (`cache_hits`, and their share of drafting steps), the pushes (`pushes`; of
them `branch_pushes` for rejection outcomes, `branch_hits` the verdicts one matched), the outcomes
with a pushed draft waiting when a step's draft was chosen (`outcomes_per_step`) and the
verifier's wait for drafts per drafting step (p50, p90). Before the cluster starts, the
concurrency-1 prompts also go through the same engine and drafter in-process (plain and
speculative, prompt by prompt), the reference each served speedup is held against.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import grpc

from specserve.cluster.reporting import percentile, text_table, write_report
from specserve.cluster.client import Client, Reply

VARIANTS = {
    "plain": {"models": {"drafter": "none"}},
    "sync": {"speculation": {"pipelined": False}},
    "pipelined": {"speculation": {"pipelined": True, "speculation_cache": False}},
    "cached": {"speculation": {"pipelined": True, "speculation_cache": True}},  # the default
}


@dataclass
class LevelTotals:
    """One variant at one concurrency level, over all rounds."""

    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    failed: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # the verifier engine's steps and draft waits (_timing_delta)


def _config(base: dict, variant: dict, port: int):
    from specserve.cluster.config import parse_config

    data = json.loads(json.dumps(base))
    for section, values in variant.items():
        data.setdefault(section, {}).update(values)
    data.setdefault("server", {})["grpc_port"] = port
    return parse_config(data)


def _run_level(address: str, app: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
               totals: LevelTotals) -> None:
    """`len(prompts)` requests, at most `concurrency` in flight, through one client each."""
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    replies: dict[int, Reply] = {}

    def worker():
        with Client(address, metadata=[("application", app)], timeout_s=600) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    i, prompt = queue.pop(0)
                try:
                    replies[i] = client.generate(prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
                except grpc.RpcError:
                    with lock:
                        totals.failed += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals.seconds += time.perf_counter() - start
    for i in sorted(replies):
        r = replies[i]
        totals.tokens += len(r.token_ids)
        totals.drafted, totals.accepted, totals.steps = (totals.drafted + r.drafted, totals.accepted + r.accepted,
                                                         totals.steps + r.steps)
        totals.ttft.append(r.ttft_s)
        if len(r.token_ids) > 1 and len(r.chunk_times) > 1:
            totals.itl.append((r.chunk_times[-1] - r.chunk_times[0]) / (len(r.token_ids) - 1))
        totals.outputs.append(r.token_ids)


def _rows(results: dict, overheads: dict) -> list[dict]:
    rows = []
    for level, by_variant in results.items():
        plain = by_variant["plain"]
        plain_tps = plain.tokens / plain.seconds if plain.seconds else 0.0
        for name, t in by_variant.items():
            tps = t.tokens / t.seconds if t.seconds else 0.0
            row = {"variant": name, "concurrency": level, "requests": len(t.outputs), "failed": t.failed,
                   "tokens_per_s": round(tps, 2), "speedup": round(tps / plain_tps, 3) if plain_tps else None,
                   "ttft_p50_ms": _ms(percentile(t.ttft, 0.5)), "ttft_p90_ms": _ms(percentile(t.ttft, 0.9)),
                   "itl_p50_ms": _ms(percentile(t.itl, 0.5)), "itl_p90_ms": _ms(percentile(t.itl, 0.9)),
                   "matches_plain": sum(a == b for a, b in zip(t.outputs, plain.outputs)) / max(len(plain.outputs), 1),
                   "ttft_ms": [_ms(x) for x in t.ttft], "itl_ms": [_ms(x) for x in t.itl]}  # for distributions
            if t.drafted:
                row.update(acceptance_rate=round(t.accepted / t.drafted, 4),
                           mean_accepted_length=round((t.accepted + t.steps) / t.steps, 3))
            row.update(t.engine)
            if name in overheads:
                row["draft_overhead_p50_ms"] = overheads[name]
            rows.append(row)
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _loads(apps: list[str]) -> dict[str, dict]:
    """Each verifier's `load()`: its engine timing so far, the draft round trips it measured."""
    from ray import serve

    return {app: serve.get_app_handle(app).load.remote(True).result() for app in apps}


def _drafter_infos(apps: list[str]) -> dict[str, dict]:
    """Each speculative application's drafter replica's `info()` (the benchmark runs one per app)."""
    from ray import serve

    return {app: serve.get_deployment_handle("Drafter", app_name=app).info.remote().result()
            for app in apps if VARIANTS[app].get("models", {}).get("drafter") != "none"}


def _ahead_delta(before: dict, after: dict) -> dict:
    """What a drafter replica did between two snapshots: drafts sent, and the verdicts that
    confirmed (hits) or threw away (misses) work drafted ahead."""
    return {k: after[k] - before[k] for k in ("drafts", "ahead_hits", "ahead_misses", "branch_pushes", "branch_hits")}


def _cache_delta(before: dict, after: dict) -> dict:
    """The speculation cache between two snapshots of a verifier's load: drafts taken from it,
    pushes received, and the wait for drafts per drafting step (p50, p90 over the level)."""
    n = after.get("draft_wait_count", 0) - before.get("draft_wait_count", 0)
    waits = after.get("recent_draft_waits_ms", [])[-n:] if n > 0 else []
    out = {k: after.get(k, 0) - before.get(k, 0) for k in ("cache_hits", "pushes", "stale_pushes")}
    decisions = after.get("cache_decisions", 0) - before.get("cache_decisions", 0)
    outcomes = after.get("cached_outcomes", 0) - before.get("cached_outcomes", 0)
    cached_share = round(out["cache_hits"] / n, 4) if n > 0 else None
    return out | {"wait_p50_ms": percentile(waits, 0.5), "wait_p90_ms": percentile(waits, 0.9),
                  "cached_share": cached_share,  # drafting steps whose draft came from the cache
                  "outcomes_per_step": round(outcomes / decisions, 3) if decisions else None}


def _timing_delta(before: dict, after: dict) -> dict:
    """What the verifier's engine did between two snapshots: steps, how many asked for drafts,
    how many of those were probes, and the share of its time spent waiting for drafts."""
    d = {k: after[k] - before[k] for k in after}
    busy = d["draft_s"] + d["verify_s"]
    return {"steps": d["verify_steps"], "drafting_steps": d["draft_steps"], "probes": d["probes"],
            "draft_wait_share": round(d["draft_s"] / busy, 4) if busy else None,
            "verify_ms_per_step": round(1000 * d["verify_s"] / d["verify_steps"], 2) if d["verify_steps"] else None}


WARM_UP = 2  # requests per variant before measuring


def run_bench_serving(levels: list[int], requests: int, max_tokens: int, rounds: int, port: int,
                      drafter: str = "model", progress=print, seed: int = 0, prompt_lookup: int | None = None) -> dict:
    """Deploy the variants on a local cluster, measure them side by side, tear down."""
    from specserve.actors.demo import demo_path
    from specserve.actors.engine.build import load_tokenizer
    from specserve.cluster import serving
    from specserve.cluster.bench_local import code_prompts

    base = {"verifier": {"num_cpus": 1, "max_num_seqs": max(levels), "max_queue": 2 * max(levels),
                         "max_seq_len": 512},
            "drafter": {"num_cpus": 1, "replicas": 1, "host": "127.0.0.1"},
            "models": {"drafter": drafter}}
    if prompt_lookup is not None:
        base["speculation"] = {"prompt_lookup": prompt_lookup}
    cfgs = {name: _config(base, v, port) for name, v in VARIANTS.items()}
    # every request of a variant is a prompt it has not seen: a suffix index that learned a prompt's
    # continuation from an earlier round would otherwise draft it whole
    needed = WARM_UP + rounds * sum(max(requests, level) for level in levels)
    prompts = code_prompts(load_tokenizer(demo_path("target")), needed, seed=seed)
    if len(prompts) < needed:
        raise ValueError(f"{needed} held-out prompts needed, {len(prompts)} exist: fewer levels, rounds or prompts")
    fresh = iter(prompts[WARM_UP:])
    # every round's requests, the same for every variant
    batches = {level: [[next(fresh) for _ in range(max(requests, level))] for _ in range(rounds)] for level in levels}
    reference = None
    if 1 in levels and drafter != "none":  # before the cluster starts: the machine is the engine's alone
        progress("in-process reference: the concurrency-1 prompts through the same engine and drafter")
        reference = in_process_reference(cfgs["cached"], [p for batch in batches[1] for p in batch], max_tokens)
    serving.connect(None, num_cpus=8)
    try:
        apps = [cfgs[n].application(n, f"/{n}") for n in VARIANTS]
        serving.deploy(cfgs["plain"], applications=apps, progress=progress)
        address = f"127.0.0.1:{port}"
        for name in VARIANTS:  # warm-up: first requests pay for lazy initialisation
            _run_level(address, name, prompts[:WARM_UP], 8, 2, LevelTotals())
        results: dict[int, dict[str, LevelTotals]] = {}
        after: dict[str, dict] = {}
        for level in levels:
            results[level] = {n: LevelTotals() for n in VARIANTS}
            before, drafters_before = _loads(list(VARIANTS)), _drafter_infos(list(VARIANTS))
            for r in range(rounds):
                batch = batches[level][r]
                order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[: r % len(VARIANTS)]
                for name in order:
                    _run_level(address, name, batch, max_tokens, level, results[level][name])
                progress(f"concurrency {level}: round {r + 1}/{rounds} done")
            after, drafters_after = _loads(list(VARIANTS)), _drafter_infos(list(VARIANTS))
            for name in VARIANTS:
                results[level][name].engine = _timing_delta(before[name]["engine"], after[name]["engine"])
                if name in drafters_after:
                    results[level][name].engine.update(_ahead_delta(drafters_before[name], drafters_after[name]))
                results[level][name].engine["lookup_drafts"] = after[name]["lookup_drafts"] - before[name]["lookup_drafts"]
                results[level][name].engine.update(_cache_delta(before[name], after[name]))
                # what the verifier's draft-length policy went by at the end of the level
                results[level][name].engine["cost_model"] = after[name]["cost_model"]
        # median draft round-trip overhead each speculative verifier measured over the whole run
        overheads = {name: load["draft_overhead_p50_ms"] for name, load in after.items()
                     if load.get("draft_overhead_p50_ms") is not None}
    finally:
        serving.shutdown()
    rows = _rows(results, overheads) + (reference["rows"] if reference else [])
    return {"config": {"levels": levels, "requests": requests, "max_tokens": max_tokens, "rounds": rounds,
                       "drafter": drafter, "seed": seed, "prompt_lookup": prompt_lookup},
            "rows": rows, "served_vs_in_process": _served_vs_in_process(rows)}


IN_PROCESS = ("in-process-plain", "in-process")


def in_process_reference(cfg, prompts: list[list[int]], max_tokens: int) -> dict:
    """Plain and speculative decoding of `prompts` by one in-process engine each, built from the
    verifier's settings with the drafter replica's model drafting locally (its suffix lookup as the
    verifier's), on the verifier's thread count; prompt by prompt, alternating which runs first."""
    from specserve.actors.demo import demo_path
    from specserve.actors.engine.build import EngineSpec, build_engine
    from specserve.actors.engine.request import make_params
    from specserve.actors.settings import DTYPES, use_threads
    from specserve.cluster.bench_local import ModeTotals, _rows as local_rows, run_engine

    spec = cfg.speculation
    threads = max(1, round(cfg.verifier.num_cpus))
    use_threads(threads)
    common = dict(max_num_seqs=2, max_seq_len=cfg.verifier.max_seq_len, dtype=DTYPES[cfg.models.dtype],
                  k_max=spec.k_max, kernels=spec.kernels, lean=cfg.models.lean, fixed_k=spec.fixed_k)
    engines = {"in-process-plain": build_engine(EngineSpec(demo_path("target"), "none", **common)),
               "in-process": build_engine(EngineSpec(demo_path("target"), "model", demo_path("drafter"),
                                                     confidence_threshold=spec.confidence_threshold,
                                                     prompt_lookup=spec.prompt_lookup, suffix=spec.suffix(),
                                                     tree_nodes=spec.tree_nodes, tree_lookup=spec.tree_lookup,
                                                     **common))}
    totals = {name: ModeTotals() for name in IN_PROCESS}
    for engine in engines.values():  # warm-up, as the served variants had
        engine.generate([prompts[0][:16]], make_params(max_tokens=8))
    params = make_params(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        for name in IN_PROCESS[::1 if i % 2 == 0 else -1]:
            run_engine(engines[name], prompt, params, totals[name])
    # bench_local's rows (speedup over its "plain"), named as this benchmark's variants
    rows = local_rows({"plain": totals[IN_PROCESS[0]], "model": totals[IN_PROCESS[1]]})  # in that order
    rows = [{"variant": name, "concurrency": 1, "requests": len(totals[name].outputs), "failed": 0,
             "threads": threads, **{k: v for k, v in row.items() if k != "mode"}} for name, row in zip(IN_PROCESS, rows)]
    return {"rows": rows}


def _served_vs_in_process(rows: list[dict]) -> dict | None:
    """Each speculative variant's speedup at concurrency 1 over the in-process engine's speedup."""
    ref = next((r["speedup"] for r in rows if r["variant"] == "in-process"), None)
    if not ref:
        return None
    return {r["variant"]: round(r["speedup"] / ref, 3) for r in rows
            if r["concurrency"] == 1 and r["variant"] in VARIANTS and r["variant"] != "plain" and r["speedup"]}


def format_table(report: dict) -> str:
    cols = ["concurrency", "variant", "tokens_per_s", "speedup", "acceptance_rate", "mean_accepted_length",
            "ttft_p50_ms", "itl_p50_ms", "itl_p90_ms", "draft_overhead_p50_ms", "steps", "drafting_steps", "probes",
            "lookup_drafts", "drafts", "ahead_hits", "cache_hits", "cached_share", "pushes", "branch_pushes",
            "branch_hits", "outcomes_per_step", "wait_p50_ms", "wait_p90_ms", "draft_wait_share", "verify_ms_per_step", "failed", "matches_plain"]
    head = ["conc", "variant", "tok/s", "speedup", "accept", "mean_acc", "ttft50ms", "itl50ms", "itl90ms",
            "rtt50ms", "steps", "drafting", "probes", "lookups", "drafts", "ahead_hit", "cached", "cached%", "pushes",
            "br_push", "br_hit", "outcomes", "wait50ms", "wait90ms", "wait", "verify_ms", "failed", "=plain"]
    return text_table(report["rows"], cols, head, 10)


def bench_serving_main(args) -> int:
    """CLI entry: run, print the table, write JSON."""
    levels = [int(x) for x in args.concurrency.split(",")]
    report = run_bench_serving(levels, args.prompts, args.max_tokens, args.rounds, args.port, args.drafter,
                               seed=args.seed, prompt_lookup=args.prompt_lookup)
    table = format_table(report)
    if report["served_vs_in_process"]:
        table += "\nspeedup at concurrency 1 / the in-process engine's: " + ", ".join(
            f"{name} {ratio}x" for name, ratio in report["served_vs_in_process"].items())
    write_report(report, table, args.out)
    return 0
