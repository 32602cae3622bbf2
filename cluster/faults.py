"""Fault injection under load: kill a part of the running system and count what the clients lost.

A `LoadGenerator` keeps concurrent greedy streams going through the Python client (which
retries UNAVAILABLE before the first token) and records every request: when it was sent, when
its first response arrived, how it ended (a gRPC status code) and the tokens it streamed. A
fault function kills one part and returns once the system has recovered from it:

- `kill_drafter`: a drafter replica's actor; Serve starts a replacement, which registers;
- `kill_registry`: the registry actor, restarted by Ray or (no_restart) recreated by the
  next drafter heartbeat; the drafters fill it again;
- `kill_distiller`: the distiller job's actor (and with it its Ray Train run); Ray restarts
  it and a new training loop starts from the live version;
- `kill_hub`: the distill hub; Ray restarts it from its version store;
- `kill_verifier`: a verifier replica's actor; Serve starts a replacement.

`run_fault_suite` runs each fault under its own load and returns one row per fault. The
targets (DESIGN §7): no request fails and no output changes when a drafter, the registry, the
distiller or the hub dies; when a verifier dies, requests that had not streamed a token yet
are retried and served, streams that were running end with UNAVAILABLE, and what is served
afterwards is unchanged. Outputs are compared with the target's own greedy decoding, so the
served models must be float64 (batching cannot flip an argmax).
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import ray

from specserve.actors.distill.hub import HUB_NAME
from specserve.actors.distill.job import DISTILLER_NAME
from specserve.actors.registry import NAMESPACE, REGISTRY_NAME
from specserve.cluster.client import Client
from specserve.cluster.config import APP_NAME, DRAFTER, VERIFIER

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef walk(path):",
           "    for key, value in items:\n", "return self._cache[", "# Compute the checksum\n",
           "def parse_args(argv):\n    parser = ", "with open(path) as f:\n"]
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors


@dataclass
class RequestRecord:
    """One request as its client saw it (times in seconds since the load started)."""

    prompt: str
    sent_s: float
    first_token_s: float | None = None  # first response; None: nothing streamed
    done_s: float | None = None
    code: str = ""  # "OK", a gRPC status code's name, or the exception's type outside gRPC
    details: str = ""
    token_ids: list[int] = field(default_factory=list)
    drafted: int = 0  # draft tokens verified for it (the last response's running count)

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def streamed(self) -> bool:
        return self.first_token_s is not None


class LoadGenerator:
    """`threads` clients sending greedy requests back to back, bounded in count and time.

    Each client stops after `max_requests` requests, after `max_duration_s`, or at `stop()`;
    each call has a `deadline_s` deadline. Used as a context manager: the load runs inside.
    """

    def __init__(self, address: str, prompts: list[str], max_tokens: int, threads: int = 4,
                 deadline_s: float = 60.0, max_requests: int = 200, max_duration_s: float = 300.0,
                 client_options: dict | None = None):
        self.address, self.prompts, self.max_tokens = address, prompts, max_tokens
        self.deadline_s, self.max_requests, self.max_duration_s = deadline_s, max_requests, max_duration_s
        self.client_options = client_options or {}
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = 0.0
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
                         for i in range(threads)]

    def now(self) -> float:
        """Seconds since the load started (the records' clock)."""
        return time.monotonic() - self._t0

    def start(self) -> LoadGenerator:
        self._t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[RequestRecord]:
        """Send nothing more, let the requests in flight end (each within its deadline), return all."""
        self._stop.set()
        retries = self.client_options.get("retries", 8) + 1
        for t in self._threads:
            t.join(timeout=retries * (self.deadline_s + 10))
        with self._lock:
            return list(self.records)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _client(self, index: int) -> None:
        end = self._t0 + self.max_duration_s
        with Client(self.address, timeout_s=self.deadline_s, **self.client_options) as client:
            for n in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() >= end:
                    return
                record = self._one(client, self.prompts[(index + n) % len(self.prompts)])
                with self._lock:
                    self.records.append(record)

    def _one(self, client: Client, prompt: str) -> RequestRecord:
        record = RequestRecord(prompt, self.now())
        try:
            for msg in client.stream(prompt, max_tokens=self.max_tokens, ignore_eos=True):
                if record.first_token_s is None:
                    record.first_token_s = self.now()
                record.token_ids.extend(msg.token_ids)
                record.drafted = msg.stats.drafted
            record.code = "OK"
        except grpc.RpcError as e:
            record.code, record.details = e.code().name, e.details() or ""
        except Exception as e:  # not a gRPC status: counted as a failure under its own name
            record.code, record.details = type(e).__name__, str(e)
        record.done_s = self.now()
        return record


# -- waiting for recovery --------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.25):
    """Poll `predicate` until it returns something true; TimeoutError naming `what` otherwise.
    An exception raised by `predicate` (the part is still restarting) counts as not yet."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


def replica_actor_names(deployment: str, app: str = APP_NAME) -> list[str]:
    """Live replica actors of one deployment (names in the "serve" namespace)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix))


def _replaced(deployment: str, app: str, victim: str, replicas: int) -> bool:
    """Serve runs `replicas` replicas of `deployment` again, the victim not among them."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status else None
    names = replica_actor_names(deployment, app)
    return (status is not None and status.status == "RUNNING" and dep is not None
            and dep.replica_states.get("RUNNING", 0) == replicas == sum(dep.replica_states.values())
            and victim not in names and len(names) == replicas)


def _kill_replica(deployment: str, app: str, timeout_s: float) -> tuple[str, int, float]:
    """Kill one replica actor of `deployment`; wait until Serve has replaced it."""
    names = replica_actor_names(deployment, app)
    if not names:
        raise RuntimeError(f"no {deployment} replica of {app} is running")
    victim = names[0]
    t0 = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace=SERVE_NAMESPACE), no_restart=True)
    wait_until(lambda: _replaced(deployment, app, victim, len(names)), timeout_s,
               f"Serve replacing {victim}")
    return victim, len(names), t0


def _pid(name: str) -> int:
    """Process id of the named actor (in our namespace): a new one after a restart."""
    actor = ray.get_actor(name, namespace=NAMESPACE)
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=5)


def _registered(app: str) -> dict[str, str]:
    """Registry entries of `app`'s drafters: replica id -> actor name (without recreating it)."""
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    return {r.replica_id: r.actor_name for r in ray.get(registry.list.remote(), timeout=5) if r.app == app}


def _hub_status() -> dict:
    return ray.get(ray.get_actor(HUB_NAME, namespace=NAMESPACE).status.remote(), timeout=10)


# -- the faults: each kills one part and returns the seconds until the system had recovered --


def kill_drafter(app: str = APP_NAME, timeout_s: float = 180.0) -> float:
    """Kill a drafter replica; recovered when Serve has replaced it and the replacement registered."""
    before = set(_registered(app).values())
    _, replicas, t0 = _kill_replica(DRAFTER, app, timeout_s)
    live = lambda: set(replica_actor_names(DRAFTER, app))  # noqa: E731
    wait_until(lambda: live() - before and live() <= set(_registered(app).values()),
               max(1.0, timeout_s - (time.monotonic() - t0)), "the replacement drafter registering")
    return time.monotonic() - t0


def kill_registry(app: str = APP_NAME, no_restart: bool = False, timeout_s: float = 60.0) -> float:
    """Kill the registry actor (no_restart: for good, so that it must be recreated); recovered when
    every live drafter replica is listed again. Nothing here recreates it: the system must."""
    drafters, pid = set(replica_actor_names(DRAFTER, app)), _pid(REGISTRY_NAME)
    t0 = time.monotonic()
    ray.kill(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE), no_restart=no_restart)
    wait_until(lambda: _pid(REGISTRY_NAME) != pid and drafters <= set(_registered(app).values()), timeout_s,
               "every drafter registered again")
    return time.monotonic() - t0


def kill_distiller(timeout_s: float = 240.0) -> float:
    """Kill the distiller job's actor (its Ray Train run dies with it); recovered when Ray has
    restarted it and a new training loop has started (the hub counts the starts)."""
    starts = _hub_status()["trainer"]["starts"]
    t0 = time.monotonic()
    ray.kill(ray.get_actor(DISTILLER_NAME, namespace=NAMESPACE), no_restart=False)
    wait_until(lambda: _hub_status()["trainer"]["starts"] > starts, timeout_s, "a restarted training loop")
    return time.monotonic() - t0


def kill_hub(app: str = APP_NAME, timeout_s: float = 60.0) -> float:
    """Kill the distill hub; recovered when Ray has restarted it, the verifiers ship traffic to it
    again and every drafter replica has asked it for its weight version."""
    drafters, pid = len(replica_actor_names(DRAFTER, app)), _pid(HUB_NAME)
    t0 = time.monotonic()
    ray.kill(ray.get_actor(HUB_NAME, namespace=NAMESPACE), no_restart=False)

    def back() -> bool:
        st = _hub_status()
        return _pid(HUB_NAME) != pid and st["received"] > 0 and len(st["replicas"]) >= drafters

    wait_until(back, timeout_s, "the restarted hub receiving traffic and drafter polls")
    return time.monotonic() - t0


def kill_verifier(app: str = APP_NAME, timeout_s: float = 180.0) -> float:
    """Kill a verifier replica; recovered when Serve has replaced it."""
    _, _, t0 = _kill_replica(VERIFIER, app, timeout_s)
    return time.monotonic() - t0


FAULTS: dict[str, Callable[[], float]] = {
    "drafter": kill_drafter,
    "registry": kill_registry,
    "registry-gone": lambda: kill_registry(no_restart=True),
    "distiller": kill_distiller,
    "hub": kill_hub,
    "verifier": kill_verifier,
}


# -- running faults under load ---------------------------------------------------------------


def run_fault(name: str, fault: Callable[[], float], address: str, reference: dict[str, list[int]],
              max_tokens: int, threads: int = 4, lead_s: float = 2.0, tail_s: float = 3.0,
              deadline_s: float = 60.0, max_requests: int = 200) -> dict:
    """Start the load, let it run `lead_s`, inject `fault` (which returns once recovered), keep
    the load `tail_s` longer, and summarize what the clients saw."""
    load = LoadGenerator(address, list(reference), max_tokens, threads, deadline_s, max_requests,
                         max_duration_s=lead_s + tail_s + 600)
    with load:
        time.sleep(lead_s)
        injected_s = load.now()
        recovery_s = fault()
        recovered_s = load.now()
        time.sleep(tail_s)
    return summarize(name, load.records, reference, injected_s, recovered_s, recovery_s)


def summarize(fault: str, records: list[RequestRecord], reference: dict[str, list[int]], injected_s: float,
              recovered_s: float, recovery_s: float) -> dict:
    """One row of the fault table (the records are kept under "records" for closer checks)."""
    failed = [r for r in records if not r.ok]
    # served from the first token on by the recovered system (a request queued through a
    # verifier's restart counts: its first token came from the replacement)
    after = [r for r in records if r.ok and r.streamed and r.first_token_s >= recovered_s]

    def changed(r: RequestRecord) -> bool:  # a failed stream's tokens must still be a prefix
        want = reference[r.prompt]
        return r.token_ids != want if r.ok else r.token_ids != want[: len(r.token_ids)]

    return {
        "fault": fault, "sent": len(records), "completed": len(records) - len(failed),
        "failed_by_code": dict(collections.Counter(r.code for r in failed)),
        "failed_before_first_token": sum(not r.streamed for r in failed),
        "failed_mid_stream": sum(r.streamed for r in failed),
        "changed_outputs": sum(changed(r) for r in records),
        "in_flight_at_fault": sum(r.sent_s <= injected_s < (r.done_s or 0) for r in records),
        # sent before the fault, first token after it: what a dying verifier must not lose
        "waiting_at_fault": sum(r.sent_s <= injected_s < (r.done_s or 0) and
                                (r.first_token_s is None or r.first_token_s > injected_s) for r in records),
        "completed_after_recovery": len(after),
        "drafted_after_recovery": sum(r.drafted for r in after),
        "recovery_s": round(recovery_s, 2),
        "records": records,
    }


def run_fault_suite(address: str, reference: dict[str, list[int]], max_tokens: int,
                    faults: dict[str, Callable[[], float]] | None = None, progress=print, **load) -> list[dict]:
    """Every fault in turn, each under its own load (run_fault's `load` arguments); one row each."""
    rows = []
    for name, fault in (faults or FAULTS).items():
        row = run_fault(name, fault, address, reference, max_tokens, **load)
        progress(f"{name}: sent {row['sent']}, failed {row['failed_by_code'] or 0}, "
                 f"changed {row['changed_outputs']}, recovered in {row['recovery_s']} s")
        rows.append(row)
    return rows


# -- `specserve bench --faults` --------------------------------------------------------------


def target_reference(prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """The demo target's own greedy continuation of each prompt, decoded alone in this process
    (float64, like the benchmark cluster)."""
    import torch

    from specserve.actors.demo import demo_path
    from specserve.actors.engine.build import EngineSpec, build_engine
    from specserve.actors.engine.request import make_params

    engine = build_engine(EngineSpec(demo_path("target"), "none", max_num_seqs=1, max_seq_len=256,
                                     dtype=torch.float64))
    out = {}
    for prompt in prompts:
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        [r] = engine.generate([ids], make_params(max_tokens=max_tokens, ignore_eos=True))
        out[prompt] = r.token_ids
    return out


def bench_config(port: int, store: str, slots: int):
    """A one-node cluster of the demo pair in float64 with distillation on, tuned to train within
    seconds (small rounds and batches) so that the distiller is busy when it is killed; the
    verifier has `slots` batch slots (fewer than clients: some requests wait, unstreamed)."""
    from specserve.cluster.config import parse_config

    return parse_config({
        "models": {"dtype": "float64"},
        "verifier": {"num_cpus": 0.5, "max_num_seqs": slots, "max_queue": 24, "max_seq_len": 256},
        "drafter": {"num_cpus": 0.5, "replicas": 2, "max_num_seqs": 64, "host": "127.0.0.1"},
        # every step asks the drafters (no cost model switching speculation off, no prompt lookup)
        "speculation": {"draft_deadline_ms": 200, "fixed_k": 3, "prompt_lookup": 0},
        "distill": {"enabled": True, "store_path": store, "min_records": 48, "steps_per_round": 4,
                    "batch_size": 8, "max_len": 64, "num_cpus": 0.5, "duty_cycle": 0.5},
        "server": {"grpc_port": port, "http_port": port + 1},
    })


def format_table(rows: list[dict]) -> str:
    from specserve.cluster.reporting import text_table

    shown = [{**r, "failed_by_code": ",".join(f"{c}:{n}" for c, n in sorted(r["failed_by_code"].items())) or None}
             for r in rows]
    cols = ["fault", "sent", "completed", "failed_by_code", "failed_before_first_token", "failed_mid_stream",
            "changed_outputs", "in_flight_at_fault", "waiting_at_fault", "completed_after_recovery", "recovery_s"]
    head = ["fault", "sent", "done", "failed", "fail<1st", "fail-mid", "changed", "inflight", "waiting", "after",
            "recov_s"]
    return text_table(shown, cols, head, 13)


def run_bench_faults(port: int, max_tokens: int, clients: int, lead_s: float, tail_s: float,
                     faults: list[str] | None = None, progress=print) -> dict:
    """Start a local cluster, run the faults under load, tear down."""
    from specserve.cluster import serving

    chosen = {n: FAULTS[n] for n in (faults or FAULTS)}
    reference = target_reference(PROMPTS, max_tokens)
    cfg = bench_config(port, tempfile.mkdtemp(prefix="specserve-faults-"), slots=max(1, clients // 2))
    serving.connect(None, num_cpus=4)
    try:
        serving.deploy(cfg, progress=progress)
        serving.wait_running(300, progress)
        wait_until(lambda: _hub_status()["trainer"]["starts"] > 0, 300, "the distiller's training loop")
        rows = run_fault_suite(f"127.0.0.1:{port}", reference, max_tokens, chosen, progress, threads=clients,
                               lead_s=lead_s, tail_s=tail_s)
    finally:
        serving.shutdown()
    return {"config": {"max_tokens": max_tokens, "clients": clients, "lead_s": lead_s, "tail_s": tail_s,
                       "verifier_slots": cfg.verifier.max_num_seqs, "drafter_replicas": cfg.drafter.replicas,
                       "verifier_replicas": cfg.verifier.replicas},
            "rows": [{k: v for k, v in r.items() if k != "records"} for r in rows]}


def bench_faults_main(args) -> int:
    """CLI entry: run, print the table, write JSON (args: port, max_tokens, clients, lead_s, tail_s,
    fault_list (comma-separated names of FAULTS, or None for all), out)."""
    from specserve.cluster.reporting import write_report

    faults = args.fault_list.split(",") if args.fault_list else None
    unknown = set(faults or []) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULTS)}")
    report = run_bench_faults(args.port, args.max_tokens, args.clients, args.lead_s, args.tail_s, faults)
    write_report(report, format_table(report["rows"]), args.out)
    return 0
