"""The verifier replica: target model, scheduler, and the client-facing `Generation` service.

Serve's gRPC proxy routes `specserve.v1.Generation/Generate` (and the standard health check)
to these methods; the class itself is plain and becomes a Serve deployment in cluster/app.py.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
import uuid

import ray
from ray import serve
from grpc_health.v1 import health_pb2

from specserve.actors.convert import params_from_pb, prompt_from_pb, response_pb
from specserve.actors.engine.build import load_tokenizer
from specserve.actors.engine.draft_length import DraftLengthConfig
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.actors.engine.tap import TrafficTap
from specserve.actors.errors import status_for
from specserve.actors.metrics import VerifierMetrics
from specserve.actors.registry import get_registry
from specserve.actors.remote_drafter import DrafterEndpoint, RemoteDrafterPool
from specserve.actors.scheduler import Scheduler
from specserve.actors.security import TokenAuth
from specserve.actors.settings import DTYPES, VerifierSettings, assigned_device, use_threads

log = logging.getLogger(__name__)
DRAIN_S = 30.0  # longest wait for running requests when a replica stops (Serve's own timeout is longer)


class Verifier:
    """One verifier replica (see module docstring)."""

    def __init__(self, settings: VerifierSettings):
        self.settings = settings
        self.app_name = serve.get_replica_context().app_name
        self.device = assigned_device()
        use_threads(settings.threads)
        models = settings.models
        cfg = RunnerConfig(settings.max_num_seqs, settings.max_seq_len, None, DTYPES[models.dtype], self.device,
                           settings.kernels, models.lean)
        target = ModelRunner.from_pretrained(models.target_path, cfg)
        self.tokenizer = load_tokenizer(models.target_path)
        self._endpoints: list[DrafterEndpoint] = []
        self.pool = None
        if models.drafter_kind != "none":
            self.pool = RemoteDrafterPool(lambda: self._endpoints, target.vocab_size,
                                          deadline_s=settings.draft_deadline_ms / 1000,
                                          node_id=ray.get_runtime_context().get_node_id(),
                                          tls=settings.internal_tls, lookup_min_n=settings.prompt_lookup,
                                          suffix=settings.suffix, speculation_cache=settings.speculation_cache,
                                          speculation_outcomes=settings.speculation_outcomes)
        tree_nodes = settings.tree_nodes if models.drafter_kind == "model" else 0
        self.tap = TrafficTap(settings.tap) if settings.tap.enabled else None
        engine = SpeculativeEngine(target, self.tokenizer, self.pool,
                                   DraftLengthConfig(k_max=settings.k_max, tree_nodes=tree_nodes, fixed_k=settings.fixed_k), kernels=settings.kernels,
                                   tap=self.tap)
        self.metrics = VerifierMetrics()
        self.totals = {"steps": 0, "drafted": 0, "accepted": 0}  # since the replica started
        self._by_version: dict[str, list[int]] = {}  # drafted/accepted/empty per drafter version, not yet shipped
        self._by_version_lock = threading.Lock()
        self.auth = TokenAuth(settings.auth_token_file) if settings.auth_token_file else None
        self.scheduler = Scheduler(engine, settings.max_queue, on_step=self._on_step)
        self.front = None
        if settings.front is not None:
            from specserve.actors.front import ClientFront

            self.front = ClientFront(self, settings.front)
        self.share = None
        if self.pool is not None and self.pool.lookup is not None and settings.tap.enabled:
            # finished requests' token ids reach the other replicas' suffix indexes (sampled as the tap is)
            from specserve.actors.suffix_share import SuffixSync

            self.share = SuffixSync(self.app_name, serve.get_replica_context().replica_id.unique_id,
                                    self.pool.add_finished, settings.tap.sample_rate)
            self.pool.on_finished = self.share.finished
        if self.pool is not None:
            threading.Thread(target=self._poll_registry, name="registry-poll", daemon=True).start()
        if self.tap is not None:
            threading.Thread(target=self._ship_traffic, name="traffic-ship", daemon=True).start()

    def _poll_registry(self) -> None:
        """Keep a fresh copy of the drafter list, off the hot path."""
        registry = None
        while not self.scheduler.draining:
            try:
                registry = registry or get_registry()
                records = ray.get(registry.list.remote(), timeout=5)
                self._endpoints = [DrafterEndpoint(r.address, r.node_id, r.load, r.weight_version)
                                   for r in records if r.app == self.app_name]
                self.metrics.drafter_pool_size.set(len(self._endpoints))
            except Exception as e:  # the registry restarting: keep the last list, look it up again
                log.warning("drafter registry unavailable: %s", e)
                registry = None
            time.sleep(0.5)

    def _ship_traffic(self) -> None:
        """Every second, hand the tap's records and the acceptance per drafter version to the
        distill hub, off the hot path. If the hub is away the batch is dropped (and counted):
        the tap stays bounded and serving never waits for distillation."""
        from specserve.actors.distill.hub import get_hub

        hub, shipped_drops = None, 0
        while not self.scheduler.draining:
            time.sleep(1.0)
            records = self.tap.drain()
            with self._by_version_lock:
                by_version, self._by_version = self._by_version, {}
            dropped = self.tap.stats.dropped + self.tap.stats.expired
            try:
                hub = hub or get_hub()
                ray.get(hub.ingest.remote(records, by_version, dropped - shipped_drops), timeout=10)
                shipped_drops = dropped
            except Exception as e:  # the hub restarting or gone: this batch is lost, serving goes on
                self.tap.lose(len(records))
                log.warning("distill hub unavailable, %d traffic records dropped: %s", len(records), e)
                hub = None

    def _on_step(self, report) -> None:
        self.totals["steps"] += 1
        self.totals["drafted"] += report.drafted
        self.totals["accepted"] += sum(report.accepted_per_position)
        self.metrics.on_step(report)
        if self.tap is not None:
            with self._by_version_lock:
                for version, counts in report.by_version.items():
                    totals = self._by_version.setdefault(version, [0, 0, 0])
                    for i, n in enumerate(counts):
                        totals[i] += n
        if self.pool is not None:
            self.metrics.observe_overheads(self.pool)

    async def Generate(self, request, grpc_context=None):
        """Stream the continuation of one prompt (specserve.v1.Generation/Generate)."""
        request_id = request.request_id or uuid.uuid4().hex
        timer = self.metrics.request_timer()
        try:
            if self.auth is not None:
                self.auth.check(grpc_context.invocation_metadata() if grpc_context is not None else None)
            prompt = prompt_from_pb(request, self.tokenizer)
            req = self.scheduler.submit(prompt, params_from_pb(request))
            first = True
            async for chunk in self.scheduler.stream(req):
                timer.tokens(len(chunk.token_ids))
                msg = response_pb(request_id, chunk.token_ids, chunk.text, chunk.finish_reason, chunk.stats,
                                  chunk.drafter_version)
                if first:
                    msg.prompt_token_ids.extend(prompt)
                    first = False
                yield msg
            timer.done("ok")
        except Exception as e:
            code, details = status_for(e)
            timer.done(code.name)
            if code.name == "INTERNAL":
                log.exception("request %s failed", request_id)
            if grpc_context is not None:
                grpc_context.set_code(code)
                grpc_context.set_details(details)
            raise

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check: NOT_SERVING once draining."""
        status = health_pb2.HealthCheckResponse.NOT_SERVING if self.scheduler.draining else \
            health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse(status=status)

    def load(self, recent_waits: bool = False) -> dict:
        """Load, live acceptance and cost model of this replica (for `specserve status`);
        `recent_waits`: also the last waits for drafts, one per drafting step (benchmarks)."""
        running, waiting = self.scheduler.load
        drafted, accepted = self.totals["drafted"], self.totals["accepted"]
        return {"running": running, "waiting": waiting, "device": self.device, **self.totals,
                "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                "node_id": ray.get_runtime_context().get_node_id(),
                "replica_id": serve.get_replica_context().replica_id.unique_id,
                "draft_misses": self.pool.misses if self.pool else 0,
                "lookup_drafts": self.pool.lookup_drafts if self.pool else 0,  # drafts by the pool's prompt lookup
                "cache_hits": self.pool.cache_hits if self.pool else 0,  # drafts taken from the speculation cache
                "pushes": self.pool.pushes if self.pool else 0, "stale_pushes": self.pool.stale_pushes if self.pool else 0,
                # outcomes with a pushed draft waiting when a step's draft was chosen, and those steps
                "cached_outcomes": self.pool.cached_outcomes if self.pool else 0,
                "cache_decisions": self.pool.cache_decisions if self.pool else 0,
                "draft_wait_ms": self._draft_waits(),
                "draft_wait_count": self.pool.wait_count if self.pool else 0,  # drafting steps that waited or not
                "shared_requests_received": self.share.received if self.share else 0,  # other replicas' finished requests
                "recent_draft_waits_ms": [round(1000 * w, 3) for w in self.pool.waits] if self.pool and recent_waits else [],
                "tap": None if self.tap is None else vars(self.tap.stats),
                "cost_model": self._cost_model(),
                "engine": dataclasses.asdict(self.scheduler.engine.timing),
                "draft_overhead_p50_ms": (round(1000 * statistics.median(self.pool.overheads), 3)
                                          if self.pool and self.pool.overheads else None)}

    def _draft_waits(self) -> dict | None:
        """Median and 90th percentile of the time a drafting step waited for remote drafts."""
        waits = sorted(self.pool.waits) if self.pool else []
        if not waits:
            return None
        at = lambda q: round(1000 * waits[min(len(waits) - 1, int(q * len(waits)))], 3)  # noqa: E731
        return {"p50": at(0.5), "p90": at(0.9), "steps": len(waits)}

    def _cost_model(self) -> dict:
        """What the draft-length policy goes by now: the cost model's estimates at the last
        step's batch size and the acceptance rates (first draft, later drafts) pooled over
        this replica's sequences."""
        engine = self.scheduler.engine
        cost = engine.cost
        ms = lambda s: None if s is None else round(1000 * s, 3)  # noqa: E731
        return {"draft_step_ms": ms(cost.draft_step_s), "rtt_ms": ms(cost.rtt_s),
                "verify_ms": {n: ms(t) for n, t in sorted(cost.verify_s.items())},
                "acceptance_rates": [round(r, 3) for r in engine.pooled.rates]}

    def __del__(self):
        """Graceful drain: health goes NOT_SERVING, admitted requests finish, then stop.

        With its own client port the replica first stops taking calls (its clients reconnect to
        the port's other listeners), giving running streams DRAIN_S to end; either way the
        engine then finishes what it admitted before it stops.
        """
        self.scheduler.drain(timeout_s=0)  # NOT_SERVING and no admissions from here on
        if self.front is not None:
            self.front.stop(grace_s=DRAIN_S)
        self.scheduler.drain(timeout_s=DRAIN_S)
        self.scheduler.shutdown()
        if self.share is not None:
            self.share.stop()
        if self.pool is not None:
            self.pool.close()
