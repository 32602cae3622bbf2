"""`specserve bench --distill`: online distillation on a shifted workload, measured while serving.

A local cluster serves the demo pair with distillation on, starting from the shipped demo
drafter (a fresh version store). The workload is shifted: prompts are windows of Python
sources of installed third-party packages, code the demo models never trained on (they saw
the standard library). All requests go through gRPC at a fixed concurrency, greedy. One fixed
evaluation set of `window` prompts is served at the start and at the end, so before and after
compare the same requests:

1. before: the evaluation set, `after_rounds` times, with training paused (the demo drafter as
   shipped);
2. training: `requests` new requests in windows of `window`; after each window the live
   drafter version, the trainer's numbers and the gate scores are read from the hub;
3. after: publishing is held (the weights stay those learned within the training phase) and
   the evaluation set is served `after_rounds` times with training paused and as many times
   with it running, alternating, so that the throughput cost of training is measured side by
   side on the same weights and requests;
4. plain: the evaluation set through a second application on the same cluster that decodes
   with the target alone (no drafter), for reference;
5. side by side: the shipped drafter and the last version are pinned in turn on the drafter
   replicas (`DistillHub.pin`, training paused) and serve the evaluation set alternately,
   `after_rounds` times each, so that their throughputs are compared in one stretch of time
   under the same conditions (the before windows ran at the start, on a fresher machine).

Speculation drafts exactly k = 4 tokens every step, all by the drafter model (`speculation.fixed_k`,
prompt lookup off, confidence stop off), so that every window measures the drafter the same
way: acceptance is then the plain
per-token acceptance rate alpha. With the cost model on, the shipped drafter's acceptance on
this workload is too low for speculation to pay, and it would mostly be switched off; with
the confidence stop on, it drafts only the tokens it is sure of, and accepted / drafted says
little. Acceptance = accepted / drafted over the window's replies;
tokens/s = the window's tokens over its wall time. Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import random
import tempfile
import time

from specserve.cluster.bench_serving import LevelTotals, _run_level
from specserve.cluster.reporting import text_table, write_report

PROMPT_TOKENS = 64
FIXED_K = 4


def shifted_prompts(tokenizer, count: int, seed: int = 0, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """`count` windows of `length` tokens from third-party package sources (not the stdlib)."""
    from specserve.actors.demo.corpus import third_party_files

    files = third_party_files()
    rng = random.Random(seed)
    rng.shuffle(files)
    prompts: list[list[int]] = []
    for f in files:
        ids = tokenizer.encode(f.text, add_special_tokens=False)
        for _ in range(min(4, len(ids) // (4 * length))):  # a few windows per file, from long files only
            start = rng.randrange(0, len(ids) - length)
            prompts.append(ids[start : start + length])
        if len(prompts) >= count:
            return prompts[:count]
    raise ValueError(f"only {len(prompts)} shifted prompts on this machine, {count} wanted")


def _config(port: int, store: str, concurrency: int):
    from specserve.cluster.config import parse_config

    return parse_config({
        "verifier": {"num_cpus": 1, "max_num_seqs": concurrency, "max_queue": 2 * concurrency, "max_seq_len": 512},
        "drafter": {"num_cpus": 0.5, "replicas": 1, "host": "127.0.0.1"},
        "distill": {"enabled": True, "store_path": store, "num_cpus": 0.5},
        # every step drafts exactly FIXED_K tokens, so the windows compare drafter quality (module doc)
        "speculation": {"fixed_k": FIXED_K, "confidence_threshold": 0.0, "prompt_lookup": 0},
        "server": {"grpc_port": port},
    })


def _window(address: str, prompts, max_tokens: int, concurrency: int, hub, phase: str, served: int,
            app: str = "specserve") -> dict:
    import ray

    totals = LevelTotals()
    _run_level(address, app, prompts, max_tokens, concurrency, totals)
    st = ray.get(hub.status.remote(), timeout=30)
    t = st["trainer"]
    return {"phase": phase, "served": served + len(prompts), "requests": len(prompts), "failed": totals.failed,
            "tokens_per_s": round(totals.tokens / totals.seconds, 2),
            "acceptance_rate": round(totals.accepted / totals.drafted, 4) if totals.drafted else None,
            "drafted_per_token": round(totals.drafted / totals.tokens, 4) if totals.tokens else None,
            "tokens_per_step": round(totals.tokens / totals.steps, 4) if totals.steps else None,
            "live_version": st["stable"], "canary": st["canary"], "train_steps": t["steps"],
            "gate_candidate": _r(t["candidate_score"]), "gate_live": _r(t["live_score"]),
            "received": st["received"], "dropped": st["tap_dropped"] + st["inbox_dropped"]}


def _running(hub) -> str:
    """The version every drafter replica runs now."""
    import ray

    running = set(ray.get(hub.status.remote(), timeout=30)["replicas"].values())
    if len(running) != 1:
        raise RuntimeError(f"drafter replicas run different versions: {sorted(running)}")
    return running.pop()


def _pin(hub, version: str, progress, timeout_s: float = 60.0) -> None:
    """Pin `version` on every replica and wait until they all run it."""
    import ray

    ray.get(hub.pin.remote(version), timeout=30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _running(hub) == version:
                progress(f"drafter replicas run {version}")
                return
        except RuntimeError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"drafter replicas did not switch to {version} within {timeout_s:.0f} s")


def _r(x):
    return None if x is None else round(x, 4)


def run_bench_distill(requests: int, window: int, concurrency: int, max_tokens: int, after_rounds: int, port: int,
                      progress=print) -> dict:
    """Run the phases of the module docstring on a local cluster; returns the report."""
    import ray

    from specserve.actors.demo import demo_path
    from specserve.actors.distill.hub import get_hub
    from specserve.actors.engine.build import load_tokenizer
    from specserve.cluster import serving

    store = tempfile.mkdtemp(prefix="specserve-bench-versions-")
    cfg = _config(port, store, concurrency)
    prompts = shifted_prompts(load_tokenizer(demo_path("target")), 2 * concurrency + window + requests)
    warmup, evaluation, traffic = (prompts[: 2 * concurrency], prompts[2 * concurrency : 2 * concurrency + window],
                                   prompts[2 * concurrency + window :])
    serving.connect(None, num_cpus=4)
    rows: list[dict] = []
    try:
        plain = cfg.model_copy(update={"models": cfg.models.model_copy(update={"drafter": "none"}),
                                       "distill": cfg.distill.model_copy(update={"enabled": False})})
        serving.deploy(cfg, progress=progress, applications=[cfg.application(), plain.application("plain", "/plain")])
        hub, address = get_hub(), f"127.0.0.1:{port}"
        ray.get(hub.set_paused.remote(True))
        for app in ("specserve", "plain"):
            _run_level(address, app, warmup, 8, concurrency, LevelTotals())
        served = 0

        def run(phase: str, batch: list[list[int]], app: str = "specserve") -> None:
            nonlocal served
            row = _window(address, batch, max_tokens, concurrency, hub, phase, served, app)
            served += len(batch)
            rows.append(row)
            progress(f"{phase:>8}: {row['served']:>5} served  {row['tokens_per_s']:7.1f} tok/s  "
                     f"acceptance {row['acceptance_rate']}  live {row['live_version']}  steps {row['train_steps']}")

        for _ in range(after_rounds):
            run("before", evaluation)
        ray.get(hub.set_paused.remote(False))
        for start in range(0, requests, window):
            run("training", traffic[start : start + window])
        ray.get(hub.hold_publishing.remote(True))
        for _ in range(after_rounds):
            ray.get(hub.set_paused.remote(True))
            run("paused", evaluation)
            ray.get(hub.set_paused.remote(False))
            run("training", evaluation)
        ray.get(hub.set_paused.remote(True))
        run("plain", evaluation, app="plain")  # the target alone on the same requests, for reference
        # side by side: the shipped drafter and the last version alternate on the evaluation set
        base = ray.get(hub.versions.remote())[0]["version"]
        final = _running(hub)
        for _ in range(after_rounds):
            for version, phase in ((base, "ab-base"), (final, "ab-final")):
                _pin(hub, version, progress)
                run(phase, evaluation)
        versions = ray.get(hub.versions.remote())
    finally:
        serving.shutdown()
    return {"config": {"requests": requests, "window": window, "concurrency": concurrency, "max_tokens": max_tokens,
                       "after_rounds": after_rounds, "distill": cfg.distill.model_dump(mode="json")},
            "rows": rows, "versions": versions, "summary": summarize(rows, -(-requests // window), after_rounds)}


def summarize(rows: list[dict], training_windows: int, before_windows: int = 1) -> dict:
    """Before vs after on the evaluation set (after: training paused, the weights learned within
    the training phase), and the throughput ratio of training running vs paused on the same
    weights and requests."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    before_rows = rows[:before_windows]
    after_rows = rows[before_windows + training_windows:]
    paused = [r for r in after_rows if r["phase"] == "paused"]
    plain = [r for r in after_rows if r["phase"] == "plain"]
    training = [r for r in after_rows if r["phase"] == "training"]
    before = {"acceptance_rate": _r(mean([r["acceptance_rate"] for r in before_rows])),
              "tokens_per_s": _r(mean([r["tokens_per_s"] for r in before_rows]))}
    out = {"acceptance_before": before["acceptance_rate"], "tokens_per_s_before": before["tokens_per_s"],
           "acceptance_after": _r(mean([r["acceptance_rate"] for r in paused])),
           "tokens_per_s_after": _r(mean([r["tokens_per_s"] for r in paused])),
           "tokens_per_s_during_training": _r(mean([r["tokens_per_s"] for r in training])),
           "plain_tokens_per_s": _r(mean([r["tokens_per_s"] for r in plain])),
           "failed": sum(r["failed"] for r in rows)}
    if out["acceptance_after"] is not None and before["acceptance_rate"] is not None:
        out["acceptance_gain"] = _r(out["acceptance_after"] - before["acceptance_rate"])
    ab = {side: [r for r in after_rows if r["phase"] == f"ab-{side}"] for side in ("base", "final")}
    if ab["base"] and ab["final"]:
        for side, windows in ab.items():
            out[f"acceptance_ab_{side}"] = _r(mean([r["acceptance_rate"] for r in windows]))
            out[f"tokens_per_s_ab_{side}"] = _r(mean([r["tokens_per_s"] for r in windows]))
        out["speedup_side_by_side"] = _r(out["tokens_per_s_ab_final"] / out["tokens_per_s_ab_base"])
    if out["tokens_per_s_after"]:
        out["speedup_after_vs_before"] = _r(out["tokens_per_s_after"] / before["tokens_per_s"])
        if out["tokens_per_s_during_training"]:
            out["training_throughput_ratio"] = _r(out["tokens_per_s_during_training"] / out["tokens_per_s_after"])
    return out


def plot(report: dict, path: str) -> None:
    """Acceptance and tokens/s against requests served (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["phase"] != "plain" and not r["phase"].startswith("ab-")]
    x = [r["served"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax1.plot(x, [r["acceptance_rate"] for r in rows], marker="o")
    ax1.set_ylabel("acceptance rate")
    ax1.set_title("Online distillation on shifted traffic (demo pair, CPU)")
    ax2.plot(x, [r["tokens_per_s"] for r in rows], marker="o", color="tab:green")
    plain = report["summary"].get("plain_tokens_per_s")
    if plain:
        ax2.axhline(plain, color="grey", linestyle="--", linewidth=0.8, label="target alone")
        ax2.legend(loc="lower right")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("requests served")
    versions = [(r["served"], r["live_version"]) for i, r in enumerate(rows)
                if i and r["live_version"] != rows[i - 1]["live_version"]]
    for served, version in versions:
        for ax in (ax1, ax2):
            ax.axvline(served, color="grey", linestyle=":", linewidth=0.8)
        ax1.annotate(version, (served, ax1.get_ylim()[0]), rotation=90, fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def format_table(report: dict) -> str:
    cols = ["phase", "served", "tokens_per_s", "acceptance_rate", "drafted_per_token", "tokens_per_step",
            "live_version", "train_steps", "gate_candidate", "gate_live", "failed"]
    head = ["phase", "served", "tok/s", "accept", "draft/tok", "tok/step", "live", "steps", "gate_cand",
            "gate_live", "failed"]
    summary = "\n".join(f"{k}: {v}" for k, v in report["summary"].items())
    return text_table(report["rows"], cols, head, 12) + "\n" + summary


def bench_distill_main(args) -> int:
    """CLI entry: run, print the table, write JSON and the plot next to it."""
    report = run_bench_distill(args.requests, args.window, args.clients, args.max_tokens,
                               args.after_rounds, args.port)
    png = str(args.out).removesuffix(".json") + ".png"
    plot(report, png)
    report["plot"] = png
    write_report(report, format_table(report), args.out)
    return 0
