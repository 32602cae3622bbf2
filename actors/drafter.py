"""The drafter replica: a draft model (or n-gram table) behind its own gRPC draft server.

It receives no Serve requests: verifiers find it in the registry and open Drafting streams
to it directly. Serve still owns its lifecycle (replicas, placement, autoscaling from the
load reported by `record_autoscaling_stats`).
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve

from specserve.actors.draft_server import DraftWorker, serve_drafting
from specserve.actors.engine.build import EngineSpec, build_drafter
from specserve.actors.engine.runner import ModelRunner
from specserve.actors.metrics import DrafterMetrics
from specserve.actors.registry import DrafterRecord, get_registry
from specserve.actors.settings import DTYPES, DrafterSettings, assigned_device, use_threads

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0


class Drafter:
    """One drafter replica (see module docstring)."""

    async def __init__(self, settings: DrafterSettings):
        self.settings = settings
        self.device = assigned_device()
        use_threads(settings.threads)
        m = settings.models
        spec = EngineSpec(m.target_path, m.drafter_kind, m.drafter_path, max_num_seqs=settings.max_num_seqs,
                          max_seq_len=settings.max_seq_len, dtype=DTYPES[m.dtype], device=self.device,
                          confidence_threshold=settings.confidence_threshold, tree_nodes=settings.tree_nodes,
                          tree_lookup=settings.tree_lookup, prompt_lookup=0,  # the verifier looks up
                          ahead_lookup=settings.prompt_lookup,
                          kernels=settings.kernels, lean=m.lean)
        vocab = ModelRunner.vocab_size_of(m.target_path)
        self.worker = DraftWorker(build_drafter(spec, vocab), settings.weight_version, settings.max_num_seqs,
                                  settings.pipelined)
        self.worker.start()
        host = settings.host or ray.util.get_node_ip_address()
        self.server, port = await serve_drafting(self.worker, host, tls=settings.internal_tls)
        self.address = f"{host}:{port}"
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.metrics = DrafterMetrics()
        self._drafts_exported = 0
        self._stopping = False
        # the checkpoint's own weights, to go back to when the hub rolls back to the base version
        self._base_state = ({k: v.detach().clone() for k, v in self.worker.drafter.runner.model.state_dict().items()}
                            if settings.hot_swap else None)
        if settings.hot_swap:  # a restarted cluster resumes from the latest good version before serving
            await self._follow_hub()
        await self._heartbeat_once()
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat())
        log.info("drafter %s serving drafts on %s (%s)", self.replica_id, self.address, self.device)

    def record(self) -> DrafterRecord:
        return DrafterRecord(self.replica_id, self.address, self.node_id, self.device, self.worker.load,
                             self.worker.weight_version, ray.get_runtime_context().get_actor_name() or "",
                             serve.get_replica_context().app_name)

    async def _heartbeat_once(self) -> None:
        self.metrics.sequences.set(self.worker.load)
        sent = self.worker.drafts_sent  # counted on the draft worker's thread; exported here
        if sent > self._drafts_exported:
            self.metrics.drafts.inc(sent - self._drafts_exported)
            self._drafts_exported = sent
        await get_registry().heartbeat.remote(self.record())

    async def _heartbeat(self) -> None:
        while not self._stopping:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._heartbeat_once()
            except Exception as e:  # registry restarting: the next beat re-registers us
                log.warning("heartbeat failed: %s", e)
            if self.settings.hot_swap:
                await self._follow_hub()

    async def _follow_hub(self) -> None:
        """Swap in the weight version the distill hub assigns this replica, if it changed.

        The swap happens on the draft worker between waves (DraftWorker.swap_weights); live
        sequences keep drafting with rebuilt caches. Any failure leaves the current weights
        serving and is retried on the next beat.
        """
        from specserve.actors.distill.hub import get_hub

        try:
            hub = get_hub()
            assigned = await hub.assignment.remote(self.replica_id, self.worker.weight_version)
            version = assigned["version"]
            if version == self.worker.weight_version:
                return
            state = self._base_state if assigned["weights"] is None else await assigned["weights"]
            await asyncio.to_thread(self.worker.swap_weights, state, version)
            self.metrics.swaps.inc()
            log.info("drafter %s now runs weight version %s", self.replica_id, version)
        except Exception as e:  # hub restarting, weights not fetchable: keep serving what we have
            log.warning("weight version check failed: %s", e)

    async def record_autoscaling_stats(self) -> dict:
        """Serve autoscaling metric: the sequences this replica drafts for."""
        return {"sequences": float(self.worker.load)}

    def info(self) -> dict:
        """Address, load and weights; drafts sent and, for pipelined drafting, the verdicts that
        confirmed the work drafted ahead (`ahead_hits`) and those that threw it away, and the
        drafts pushed for rejection outcomes (`branch_pushes`) and the verdicts one matched."""
        drafter = self.worker.drafter
        return {"address": self.address, "device": self.device, "sequences": self.worker.load,
                "weight_version": self.worker.weight_version, "drafts": self.worker.drafts_sent,
                "pushes": self.worker.pushes_sent,
                "ahead_hits": getattr(drafter, "ahead_hits", 0), "ahead_misses": getattr(drafter, "ahead_misses", 0),
                "branch_pushes": getattr(drafter, "branch_pushes", 0), "branch_hits": getattr(drafter, "branch_hits", 0)}

    async def check_health(self) -> None:
        if not self.worker.alive:
            raise RuntimeError("the draft worker thread died")

    async def __del__(self):
        """Drain: leave the registry so no new sequence comes, give live ones time, stop."""
        self._stopping = True
        try:
            await get_registry().deregister.remote(self.replica_id)
        except Exception:
            pass
        for _ in range(20):
            if self.worker.load == 0:
                break
            await asyncio.sleep(0.1)
        await self.server.stop(grace=1.0)
        self.worker.stop()
