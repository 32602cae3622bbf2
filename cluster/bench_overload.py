"""`specserve bench --overload`: the deployed system driven at several times its capacity.

A local cluster serves the demo pair (float64, so outputs compare token for token with the
target's own greedy decoding) with a small admission limit: `SLOTS` batch slots and `SLOTS`
queue places. `clients` threads send greedy requests back to back for `duration` seconds, each
call bounded by a deadline, each client by a request count. Everything past capacity must be
refused at once with RESOURCE_EXHAUSTED and a retry hint; a refused client comes back after
`PAUSE_S` (well before the hint, so the offered load stays several times what is served).

Every `sample_s` the resident memory (RSS) of each Ray worker process hosting a Verifier or
Drafter replica and of Serve's proxy is sampled (processes found by the titles Ray gives its
actor workers, `ray::ServeReplica:<app>:<Deployment>`, `ray::ProxyActor`). Growth is measured
from the first sample after the `warmup` seconds to the last one: a bounded server holds
still once its queues, caches and pools are full, whatever the load. After the load the server
must answer as before: the standard health check SERVING, greedy outputs identical.

Reported: memory per process kind at start, after warm-up and at the end with the growth;
requests by status code; latency percentiles of the served (OK) requests; the refusals that
carried a retry hint; served outputs that differed from the target's.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc
import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files) and puts it on sys.path
import psutil  # noqa: E402

from specserve.cluster.client import Client, retry_after_s
from specserve.cluster.faults import target_reference
from specserve.cluster.reporting import percentile, text_table, write_report

SLOTS = 8  # batch slots, and as many queue places: capacity 16 requests
PAUSE_S = 0.05
KINDS = ("Verifier", "Drafter", "Proxy")
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef walk(path):",
           "    for key, value in items:\n", "return self._cache[", "# Compute the checksum\n"]


@dataclass
class LoadTotals:
    """What the clients saw."""

    codes: collections.Counter = field(default_factory=collections.Counter)
    ok_latency_s: list[float] = field(default_factory=list)
    refused_latency_s: list[float] = field(default_factory=list)
    refused_with_hint: int = 0
    retry_hints_ms: collections.Counter = field(default_factory=collections.Counter)  # hint -> refusals
    mismatched: int = 0  # served outputs that differ from the reference
    other_errors: list[str] = field(default_factory=list)  # details of unexpected codes (first few)
    seconds: float = 0.0

    def add_error(self, error: grpc.RpcError, elapsed_s: float) -> None:
        code = error.code().name
        self.codes[code] += 1
        if code == "RESOURCE_EXHAUSTED":
            self.refused_latency_s.append(elapsed_s)
            hint_s = retry_after_s(error)
            self.refused_with_hint += hint_s is not None
            self.retry_hints_ms[None if hint_s is None else round(1000 * hint_s)] += 1
        elif len(self.other_errors) < 20:
            self.other_errors.append(f"{code}: {error.details()}")


def drive(address: str, clients: int, duration_s: float, max_tokens: int, deadline_s: float = 60.0,
          reference: dict[str, list[int]] | None = None, max_requests_per_client: int = 10_000) -> LoadTotals:
    """`clients` threads of back-to-back greedy requests for `duration_s` (see module docstring)."""
    totals, lock = LoadTotals(), threading.Lock()
    end = time.monotonic() + duration_s

    def client(index: int) -> None:
        with Client(address, retries=0, timeout_s=deadline_s) as c:
            for i in range(max_requests_per_client):
                if time.monotonic() >= end:
                    return
                prompt = PROMPTS[(index + i) % len(PROMPTS)]
                t0 = time.monotonic()
                try:
                    reply = c.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
                except grpc.RpcError as e:
                    with lock:
                        totals.add_error(e, time.monotonic() - t0)
                    time.sleep(PAUSE_S)
                    continue
                with lock:
                    totals.codes["OK"] += 1
                    totals.ok_latency_s.append(time.monotonic() - t0)
                    totals.mismatched += reference is not None and reply.token_ids != reference[prompt]

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + deadline_s + 30)
    totals.seconds = time.monotonic() - start
    return totals


# -- memory ----------------------------------------------------------------------------------------

def server_processes(app: str) -> dict[int, str]:
    """pid -> kind (Verifier, Drafter, Proxy) of this node's Ray workers that serve `app`."""
    titles = {f"ray::ServeReplica:{app}:Verifier": "Verifier", f"ray::ServeReplica:{app}:Drafter": "Drafter",
              "ray::ProxyActor": "Proxy"}
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = (proc.info["cmdline"] or [""])[0]
        kind = next((k for prefix, k in titles.items() if title.startswith(prefix)), None)
        if kind is not None:
            found[proc.info["pid"]] = kind
    return found


class MemorySampler:
    """Samples the RSS (MiB) of the server's processes every `every_s` on a thread of its own."""

    def __init__(self, app: str, every_s: float = 5.0):
        self.app, self.every_s = app, every_s
        self.samples: list[dict] = []  # {"t": s since start, kind: MiB summed over its processes, "pids": {...}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sample()  # the end point, after the load

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        row: dict = {"t": round(time.monotonic() - self._t0, 1), "pids": {}}
        for pid, kind in server_processes(self.app).items():
            try:
                mib = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.NoSuchProcess:  # a replica replaced between listing and reading
                continue
            row[kind] = round(row.get(kind, 0.0) + mib, 1)
            row["pids"].setdefault(kind, []).append(pid)
        self.samples.append(row)


def memory_rows(samples: list[dict], warmup_s: float) -> list[dict]:
    """Per process kind (and all together): MiB at start, after warm-up, at the end; growth %."""
    warm = next((s for s in samples if s["t"] >= warmup_s), samples[-1])
    first, last = samples[0], samples[-1]
    rows = []
    for kind in KINDS + ("total",):
        def mib(s, k=kind):
            return round(sum(s.get(x, 0.0) for x in KINDS), 1) if k == "total" else s.get(k)
        w, e = mib(warm), mib(last)
        growth = round(100 * (e - w) / w, 2) if w and e is not None else None
        rows.append({"process": kind, "start_mib": mib(first), "warm_mib": w, "end_mib": e, "growth_pct": growth,
                     "pids": len(last["pids"].get(kind, [])) if kind != "total" else None})
    return rows


# -- the benchmark ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overload_config(port: int):
    from specserve.cluster.config import parse_config

    return parse_config({
        "models": {"dtype": "float64"},  # batching cannot flip an argmax: outputs compare exactly
        "verifier": {"num_cpus": 1, "max_num_seqs": SLOTS, "max_queue": SLOTS, "max_seq_len": 256},
        "drafter": {"num_cpus": 0.5, "replicas": 1, "host": "127.0.0.1"},
        "server": {"grpc_port": port, "http_port": _free_port()},
    })


def serves_as_before(address: str, reference: dict[str, list[int]], max_tokens: int) -> dict:
    """Health SERVING and every reference prompt's greedy output unchanged."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    with Client(address, timeout_s=120) as c:
        same = [c.generate(p, max_tokens=max_tokens, ignore_eos=True).token_ids == want
                for p, want in reference.items()]
    return {"health": health_pb2.HealthCheckResponse.ServingStatus.Name(status), "identical": all(same)}


def _pct(values: list[float], q: float) -> float | None:
    """Quantile q of latencies in seconds, as milliseconds to 0.1 (None when empty)."""
    return None if not values else round(1000 * percentile(values, q), 1)


def run_bench_overload(port: int, clients: int, duration_s: float, warmup_s: float, max_tokens: int,
                       sample_s: float = 5.0, deadline_s: float = 60.0, progress=print) -> dict:
    """Deploy, overload, sample memory, check the server afterwards, tear down."""
    from specserve.cluster import serving
    from specserve.cluster.config import APP_NAME

    cfg = overload_config(port)
    reference = target_reference(PROMPTS, max_tokens)
    address = f"127.0.0.1:{port}"
    serving.connect(None, num_cpus=4)
    try:
        serving.deploy(cfg, progress=progress)
        drive(address, 2, 5, max_tokens, deadline_s, reference)  # first requests pay for lazy initialisation
        progress(f"overload: {clients} clients for {duration_s:.0f} s, capacity {2 * SLOTS}")
        with MemorySampler(APP_NAME, sample_s) as sampler:
            totals = drive(address, clients, duration_s, max_tokens, deadline_s, reference)
        after = serves_as_before(address, reference, max_tokens)
    finally:
        serving.shutdown()
    return build_report(cfg, clients, duration_s, warmup_s, max_tokens, totals, sampler.samples, after)


def build_report(cfg, clients, duration_s, warmup_s, max_tokens, totals: LoadTotals, samples, after) -> dict:
    """The JSON report: config, memory rows, requests by status, summary, raw samples."""
    memory = memory_rows(samples, warmup_s)
    served = totals.codes["OK"]
    return {
        "config": {"clients": clients, "duration_s": duration_s, "warmup_s": warmup_s, "max_tokens": max_tokens,
                   "capacity": cfg.verifier.max_num_seqs + cfg.verifier.max_queue},
        "memory": memory,
        "requests": dict(totals.codes),
        "summary": {"requests_per_s": round(sum(totals.codes.values()) / totals.seconds, 1),
                    "served_per_s": round(served / totals.seconds, 2),
                    "ok_p50_ms": _pct(totals.ok_latency_s, 0.5), "ok_p99_ms": _pct(totals.ok_latency_s, 0.99),
                    "refused_p50_ms": _pct(totals.refused_latency_s, 0.5),
                    "refused_with_retry_hint": totals.refused_with_hint,
                    "retry_hints_ms": {str(k): n for k, n in totals.retry_hints_ms.items()},
                    "mismatched_outputs": totals.mismatched,
                    "memory_growth_pct": memory[-1]["growth_pct"], "health_after": after["health"],
                    "identical_after": after["identical"]},
        "other_errors": totals.other_errors,
        "samples": samples,
    }


def format_table(rep: dict) -> str:
    mem = text_table(rep["memory"], ["process", "pids", "start_mib", "warm_mib", "end_mib", "growth_pct"],
                     ["process", "pids", "start MiB", "warm MiB", "end MiB", "growth %"], 10)
    codes = text_table([{"status": k, "requests": v} for k, v in sorted(rep["requests"].items())],
                       ["status", "requests"], ["status", "requests"], 18)
    summary = "\n".join(f"{k}: {v}" for k, v in rep["summary"].items())
    return f"{mem}\n\n{codes}\n\n{summary}"


def bench_overload_main(args) -> int:
    """CLI entry: run, print the table, write JSON."""
    rep = run_bench_overload(args.port, args.clients, args.duration, getattr(args, "warmup", 60.0),
                             args.max_tokens or 32)
    write_report(rep, format_table(rep), args.out or "runs/bench_overload.json")
    return 0
