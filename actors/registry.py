"""The drafter registry: one named Ray actor listing the live drafter replicas.

Drafter replicas register their draft-server endpoint and refresh it with a heartbeat that
carries their load and weight version; an entry leaves when its replica deregisters (clean
stop) or when its heartbeats stop for `ttl_s` (a dead replica). Verifiers poll `list()` off
the hot path. The registry holds no state that cannot be rebuilt: if it dies, Ray restarts it
and the next heartbeats fill it again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import ray

REGISTRY_NAME = "specserve-drafter-registry"
NAMESPACE = "specserve"


@dataclass(frozen=True)
class DrafterRecord:
    """One drafter replica as the registry lists it."""

    replica_id: str
    address: str  # host:port of its draft server
    node_id: str
    device: str
    load: int  # live sequences
    weight_version: str
    actor_name: str = ""  # the replica's Ray actor (namespace "serve"), for operators and fault tests
    app: str = ""  # the Serve application it belongs to: verifiers draft only with their own


class DrafterRegistry:
    """Live drafter endpoints (see module docstring)."""

    # generous against heartbeats delayed on a saturated node (a replica beats every second); a
    # dead replica's streams break at once, so the TTL only delays new sequences' choice
    def __init__(self, ttl_s: float = 15.0):
        self.ttl_s = ttl_s
        self._records: dict[str, tuple[DrafterRecord, float]] = {}

    def heartbeat(self, record: DrafterRecord) -> None:
        """Register or refresh a replica."""
        self._records[record.replica_id] = (record, time.monotonic())

    def deregister(self, replica_id: str) -> None:
        self._records.pop(replica_id, None)

    def list(self) -> list[DrafterRecord]:
        """Replicas heard from within ttl_s, least loaded first."""
        now = time.monotonic()
        self._records = {k: v for k, v in self._records.items() if now - v[1] <= self.ttl_s}
        return sorted((r for r, _ in self._records.values()), key=lambda r: (r.load, r.replica_id))

    def list_dicts(self) -> list[dict]:
        """`list()` as plain dicts (for the CLI, which may not share our classes)."""
        return [asdict(r) for r in self.list()]


def get_registry(create: bool = True):
    """Handle of the registry actor, created (detached, restartable) on first use."""
    if not create:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    actor = ray.remote(DrafterRegistry).options(
        name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=-1,
    )
    return actor.remote()
