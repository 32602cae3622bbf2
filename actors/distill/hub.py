"""The distillation hub: one named Ray actor between the verifiers, the distiller and the drafters.

- **Traffic inbox.** Verifiers push the records their taps drained; the distiller pulls them.
  Bounded: beyond `inbox_capacity` the oldest records are dropped, and counted.
- **Weight store.** Published versions persist in a VersionStore (safetensors + index.json)
  and their weights sit in the object store for the drafters to fetch. A restarted hub, or a
  restarted cluster over the same `store_path`, serves the newest promoted version that was
  not rolled back.
- **Live acceptance per version**, reported by the verifiers (draft tokens verified and kept).
- **Canary.** A new version first goes to `canary_fraction` of the drafter replicas (at least
  one). Once it has had `canary_min_drafted` draft trials verified (see Ledger) it is promoted to every
  replica, or rolled back automatically when its acceptance is below the stable version's by
  more than `rollback_margin`. The stable version's acceptance is taken over the same window
  (other replicas, same traffic) when it had enough drafts there, else over its history. A
  canary that got too few drafts verified within `canary_max_s` (speculation is off where it
  does not pay, so a weak drafter may get few) is promoted on the gate's held-out evidence:
  nothing live spoke against it.

Drafters poll `assignment` with their heartbeat and swap weights between rounds. The base
version (the drafter checkpoint the replicas load) has no stored weights: replicas keep their
own copy of it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray

from specserve.actors.distill.versions import VersionStore
from specserve.actors.registry import NAMESPACE

log = logging.getLogger(__name__)
HUB_NAME = "specserve-distill-hub"
REPLICA_TTL_S = 15.0  # a drafter not heard from for this long no longer counts for the canary
MIN_EVIDENCE = 20  # verified canary drafts below which a timed-out canary is judged on the gate alone


@dataclass(frozen=True)
class HubSettings:
    """What the hub needs from the config."""

    store_path: str  # absolute directory of the VersionStore
    base_version: str  # version name of the drafter checkpoint the replicas start from
    canary_fraction: float = 0.5
    canary_min_drafted: int = 400
    rollback_margin: float = 0.05
    canary_max_s: float = 120.0
    inbox_capacity: int = 20000


@dataclass
class Ledger:
    """Draft tokens verified and accepted for one version, and draft steps that came back empty.

    Live acceptance counts an empty draft step (the drafter asked for tokens and its confidence
    stop, or a deadline, gave none) as one rejected draft token, as the engine's own acceptance
    tracker does: otherwise a drafter too unsure to ever draft would look perfect.
    """

    drafted: int = 0
    accepted: int = 0
    empty: int = 0

    @property
    def trials(self) -> int:
        return self.drafted + self.empty

    @property
    def alpha(self) -> float | None:
        return self.accepted / self.trials if self.trials else None


@dataclass
class TrainerReport:
    """The distiller's latest numbers (for `distill status` and metrics)."""

    steps: int = 0
    loss: float | None = None
    buffer_records: int = 0
    buffer_fill: float = 0.0
    buffer_dropped: int = 0
    candidate_score: float | None = None
    live_score: float | None = None
    rounds: int = 0
    rejected: int = 0  # candidates the gate did not publish
    starts: int = 0  # times the training loop started (more than one: the worker was restarted)
    live_version: str | None = None  # the live version the loop last loaded
    resumed_from: str | None = None  # the live version handed to the loop when it last started
    worker: str | None = None  # node id and pid of the training worker process
    updated_s: float = field(default_factory=time.time)


class DistillHub:
    """See the module docstring."""

    def __init__(self, settings: HubSettings):
        self.settings = settings
        self.store = VersionStore(settings.store_path)
        latest = self.store.latest()
        self.stable = latest["version"] if latest else settings.base_version
        self.canary: str | None = None
        self._canary_since = 0.0
        self.paused = False
        self.publishing_held = False
        self.inbox: collections.deque = collections.deque()
        self.counts = {"received": 0, "inbox_dropped": 0, "tap_dropped": 0, "pulled": 0, "publishes": 0,
                       "rollbacks": 0, "promotions": 0}
        self.total: dict[str, Ledger] = collections.defaultdict(Ledger)
        self.window: dict[str, Ledger] = collections.defaultdict(Ledger)  # since the canary started
        self.replicas: dict[str, tuple[str, float]] = {}  # replica id -> (version it runs, last seen)
        self.trainer = TrainerReport()
        self._weights: dict[str, ray.ObjectRef] = {}
        self._metrics = _HubMetrics()
        log.info("distill hub: store %s, stable version %s", settings.store_path, self.stable)

    # -- verifiers ----------------------------------------------------------------------------
    def ingest(self, records: list, by_version: dict[str, tuple[int, int, int]], tap_dropped: int = 0) -> None:
        """Records a verifier's tap drained, and its (drafted, accepted, empty) counts per drafter version."""
        for r in records:
            if len(self.inbox) >= self.settings.inbox_capacity:
                self.inbox.popleft()
                self.counts["inbox_dropped"] += 1
            self.inbox.append(r)
        self.counts["received"] += len(records)
        self.counts["tap_dropped"] += tap_dropped
        for version, (drafted, accepted, empty) in by_version.items():
            for ledger in (self.total[version], self.window[version]):
                ledger.drafted += drafted
                ledger.accepted += accepted
                ledger.empty += empty
        self._metrics.on_ingest(len(records), tap_dropped, self.total)
        self._judge_canary()

    # -- distiller ----------------------------------------------------------------------------
    def pull(self, max_records: int) -> list:
        """Up to `max_records` records, oldest first (none while paused)."""
        if self.paused:
            return []
        n = min(max_records, len(self.inbox))
        out = [self.inbox.popleft() for _ in range(n)]
        self.counts["pulled"] += n
        return out

    def report_training(self, report: dict) -> None:
        """The distiller's latest numbers."""
        self.trainer = TrainerReport(**report, starts=self.trainer.starts, resumed_from=self.trainer.resumed_from)
        self._metrics.on_training(self.trainer)

    def trainer_started(self) -> dict:
        """A training loop (re)started: count it; it resumes from `live()`."""
        self.trainer.starts += 1
        self.trainer.resumed_from = self.stable
        return self.live()

    def live(self) -> dict:
        """The stable version and its weights (None for the base checkpoint), and the canary."""
        return {"version": self.stable, "weights": self._ref(self.stable), "canary": self.canary,
                "paused": self.paused}

    def can_publish(self) -> bool:
        """Whether a new version would be accepted now (no canary under evaluation, not paused
        or held)."""
        return self.canary is None and not self.paused and not self.publishing_held

    def publish(self, state: dict, meta: dict, force: bool = False) -> str | None:
        """Persist a gated candidate as the next version and start its canary; None if busy.

        force: publish even while training is paused or publishing held (an operator's weights);
        a canary under evaluation still refuses it.
        """
        if self.canary is not None or not (force or self.can_publish()):
            return None
        version = f"distilled-{len(self.store.versions()) + 1}"
        self.store.publish(state, version, {**meta, "parent": self.stable, "promoted": False})
        self._weights[version] = ray.put(state)
        self.canary, self._canary_since = version, time.monotonic()
        self.window = collections.defaultdict(Ledger)
        self.counts["publishes"] += 1
        self._metrics.publishes.inc()
        log.info("published drafter version %s (canary on %s of the replicas)", version,
                 self.settings.canary_fraction)
        return version

    # -- drafters -----------------------------------------------------------------------------
    def assignment(self, replica_id: str, running: str) -> dict:
        """The version a drafter replica should run, and its weights (None: the base checkpoint)."""
        now = time.monotonic()
        self.replicas[replica_id] = (running, now)
        self.replicas = {r: v for r, v in self.replicas.items() if now - v[1] <= REPLICA_TTL_S}
        version = self.canary if self.canary and replica_id in self._canary_replicas() else self.stable
        return {"version": version, "weights": self._ref(version)}

    def _canary_replicas(self) -> set[str]:
        live = sorted(self.replicas)
        n = max(1, int(self.settings.canary_fraction * len(live)))
        return set(live[:n])

    # -- operators ----------------------------------------------------------------------------
    def rollback_to(self, version: str, reason: str = "operator") -> dict:
        """Make `version` (a good published version or the base) live again; every version
        published after it is marked rolled back. Returns the new state."""
        names = self._good(version)
        after = names[names.index(version) + 1:] if version in names else names
        for name in after:
            if not self.store.entry(name).get("rolled_back"):
                self.store.rollback(name, f"{reason}: rolled back to {version}")
                self.counts["rollbacks"] += 1
                self._metrics.rollbacks.inc()
        if version in names:
            self.store.mark(version, promoted=True)
        self.stable, self.canary = version, None
        log.warning("drafter version rolled back to %s (%s)", version, reason)
        return self.status()

    def pin(self, version: str) -> dict:
        """Serve `version` (the base or a good published version) on every replica, marking
        nothing: unlike a rollback, the versions after it stay good and can be pinned again. For
        measuring two versions side by side (`specserve bench --distill`); pause training or
        hold publishing first, or the next publish moves on from it."""
        self._good(version)
        self.stable, self.canary = version, None
        log.info("drafter version %s pinned on every replica", version)
        return self.status()

    def set_paused(self, paused: bool) -> None:
        """Pause or resume training and publishing (serving and the inbox go on)."""
        self.paused = paused

    def hold_publishing(self, held: bool) -> None:
        """Keep training but publish nothing (the live weights stay; for side-by-side measurements)."""
        self.publishing_held = held

    def status(self) -> dict:
        """Everything `specserve distill status` shows."""
        return {
            "stable": self.stable, "canary": self.canary, "paused": self.paused,
            "inbox": len(self.inbox), **self.counts,
            "acceptance": {v: {"drafted": lg.drafted, "accepted": lg.accepted, "empty": lg.empty,
                               "alpha": None if lg.alpha is None else round(lg.alpha, 4)}
                           for v, lg in sorted(self.total.items())},
            "replicas": {r: v for r, (v, _) in sorted(self.replicas.items())},
            "trainer": asdict(self.trainer),
            "store": self.settings.store_path,
        }

    def versions(self) -> list[dict]:
        """Every published version's metadata, oldest first, with the base first."""
        return [{"version": self.settings.base_version, "base": True}] + self.store.versions()

    # -- internals ----------------------------------------------------------------------------
    def _good(self, version: str) -> list[str]:
        """Raise unless `version` is the base or a published version not rolled back; returns
        the published versions' names, oldest first."""
        names = [v["version"] for v in self.store.versions()]
        if version != self.settings.base_version and version not in names:
            raise KeyError(f"no drafter version {version!r}; known: {[self.settings.base_version] + names}")
        if version in names and self.store.entry(version).get("rolled_back"):
            raise ValueError(f"version {version} was rolled back; pick a good one")
        return names

    def _ref(self, version: str):
        if version == self.settings.base_version:
            return None
        if version not in self._weights:  # after a restart: back from disk into the object store
            self._weights[version] = ray.put(self.store.load(version))
        return self._weights[version]

    def _judge_canary(self) -> None:
        """Promote or roll back the canary once it has enough verified drafts."""
        if self.canary is None:
            return
        canary = self.window[self.canary]
        if canary.trials < self.settings.canary_min_drafted:
            if time.monotonic() - self._canary_since < self.settings.canary_max_s:
                return
            if canary.trials < MIN_EVIDENCE:
                canary = Ledger()  # no live evidence: promote on the gate's
        here = self.window[self.stable]
        stable = here if here.trials >= self.settings.canary_min_drafted // 4 else self.total[self.stable]
        if None not in (stable.alpha, canary.alpha) and canary.alpha < stable.alpha - self.settings.rollback_margin:
            reason = f"live acceptance {canary.alpha:.3f} below {self.stable}'s {stable.alpha:.3f}"
            self.store.rollback(self.canary, reason)
            self.counts["rollbacks"] += 1
            self._metrics.rollbacks.inc()
            log.warning("canary %s rolled back: %s", self.canary, reason)
        else:
            self.store.mark(self.canary, promoted=True)
            self.stable = self.canary
            self.counts["promotions"] += 1
            log.info("canary %s promoted (live acceptance %s)", self.canary, canary.alpha)
        self.canary = None


class _HubMetrics:
    """The hub's Prometheus metrics (see actors/metrics.py for the serving ones)."""

    def __init__(self):
        from ray.util import metrics

        self.records = metrics.Counter("specserve_distill_records_total", "Traffic records received from verifiers.")
        self.dropped = metrics.Counter("specserve_distill_dropped_total",
                                       "Traffic records dropped (tap full or expired) before training.")
        self.acceptance = metrics.Gauge("specserve_drafter_acceptance", "Live acceptance rate per drafter version.",
                                        tag_keys=("drafter_version",))
        self.loss = metrics.Gauge("specserve_distill_loss", "Distillation loss of the latest training round.")
        self.buffer_fill = metrics.Gauge("specserve_distill_buffer_fill", "Replay buffer fill (0..1).")
        self.gate = metrics.Gauge("specserve_distill_gate_score",
                                  "Expected acceptance on held-out traffic at the latest gate.", tag_keys=("model",))
        self.publishes = metrics.Counter("specserve_distill_publishes_total", "Drafter versions published.")
        self.rollbacks = metrics.Counter("specserve_distill_rollbacks_total", "Drafter versions rolled back.")

    def on_ingest(self, records: int, dropped: int, total: dict[str, Ledger]) -> None:
        if records:
            self.records.inc(records)
        if dropped:
            self.dropped.inc(dropped)
        for version, ledger in total.items():
            if ledger.alpha is not None:
                self.acceptance.set(ledger.alpha, {"drafter_version": version or "none"})

    def on_training(self, t: TrainerReport) -> None:
        if t.loss is not None:
            self.loss.set(t.loss)
        self.buffer_fill.set(t.buffer_fill)
        for model, value in (("candidate", t.candidate_score), ("live", t.live_score)):
            if value is not None:
                self.gate.set(value, {"model": model})


def start_hub(settings: HubSettings):
    """Create (or find) the hub: detached, restarted by Ray if it dies, on this node (its disk)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(settings.store_path).mkdir(parents=True, exist_ok=True)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(DistillHub).options(
        name=HUB_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=-1, scheduling_strategy=here,
    ).remote(settings)


def get_hub():
    """Handle of the running hub (raises ValueError when distillation is not running)."""
    return ray.get_actor(HUB_NAME, namespace=NAMESPACE)
