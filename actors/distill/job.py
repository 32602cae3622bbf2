"""The distiller: a Ray Train job (TorchTrainer) that trains a copy of the live drafter on served traffic.

One training worker runs `Distiller.run` forever: pull the records the verifiers shipped to
the hub into a replay buffer, run a round of KD steps on the student (a copy of the live
drafter), score student and live drafter on the buffer's held-out newest records, and publish
the student through the hub when the gate says it is better. The hub then runs the canary and
promotes or rolls back; the distiller follows whatever the hub says is live, so a rolled-back
student is reset to the live weights.

Training shares machines with serving, so it is throttled to `duty_cycle` of wall time and runs
at the lowest CPU priority (`nice`: on shared cores the kernel serves the verifier and drafters
first), and it never blocks serving: verifiers only ever talk to the hub. If the worker dies,
Ray Train restarts it (FailureConfig(max_failures=-1)) and the loop resumes from the live
version; the records it had buffered are lost, the traffic keeps coming.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import ray
import torch

from specserve.actors.distill.buffer import ReplayBuffer
from specserve.actors.distill.gate import Gate
from specserve.actors.distill.trainer import distill_steps
from specserve.actors.registry import NAMESPACE

log = logging.getLogger(__name__)
DISTILLER_NAME = "specserve-distiller"
GATE_RECORDS = 256  # newest held-out records the gate scores on (bounds its cost)
PULL_BATCH = 2048


@dataclass(frozen=True)
class DistillSpec:
    """Everything the training worker needs (from the config's `distill` section)."""

    drafter_path: str
    vocab: int
    storage_path: str  # Ray Train's run directory
    loss: str = "fkl"
    learning_rate: float = 3e-4
    batch_size: int = 16
    max_len: int = 64
    rejected_weight: float = 3.0
    teacher_temperature: float = 1.0
    steps_per_round: int = 50
    min_records: int = 256
    buffer_capacity: int = 20000
    half_life_records: float = 2000.0
    holdout_fraction: float = 0.1
    gate_margin: float = 0.002
    duty_cycle: float = 0.25
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    nice: int = 19


def load_student(path: str, device: torch.device) -> torch.nn.Module:
    """The drafter checkpoint as a trainable float32 model with transformers' own attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def lower_priority(nice: int) -> int:
    """Run the calling thread (the training loop, and threads it starts later) at CPU niceness
    `nice`: on CPUs shared with serving, the kernel then gives serving the cores first and the
    trainer what is left. Linux niceness is per thread, so Ray's own threads in this worker keep
    theirs. Returns the niceness now in effect (raising it needs no privilege)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except (AttributeError, OSError) as e:  # not Linux-like, or refused: train at the same priority
        log.warning("could not lower the trainer's CPU priority: %s", e)
    return os.getpriority(os.PRIO_PROCESS, tid) if hasattr(os, "getpriority") else 0


class Distiller:
    """The training loop of one worker (see the module docstring)."""

    def __init__(self, spec: DistillSpec, hub, device: torch.device, on_report=None):
        torch.set_num_threads(spec.threads)
        lower_priority(spec.nice)
        self.spec, self.hub, self.device = spec, hub, device
        self.on_report = on_report  # also hand each round's numbers here (ray.train.report)
        self.student = load_student(spec.drafter_path, device)
        self.live = load_student(spec.drafter_path, device)
        self.live.eval()
        self.base_state = {k: v.detach().clone() for k, v in self.live.state_dict().items()}
        self.buffer = ReplayBuffer(spec.buffer_capacity, spec.half_life_records, spec.holdout_fraction)
        self.optimizer = self._optimizer()
        self.gate = Gate(spec.gate_margin)
        self.generator = torch.Generator().manual_seed(0)
        self.live_version: str | None = None
        self.published: str | None = None  # the student's last published version
        self.report = {"steps": 0, "loss": None, "candidate_score": None, "live_score": None, "rounds": 0,
                       "rejected": 0, "live_version": None,
                       "worker": f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"}

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.spec.learning_rate)

    def run(self, stop: threading.Event | None = None) -> None:
        """Train until `stop` is set (forever in the Ray Train worker)."""
        self.follow(ray.get(self.hub.trainer_started.remote()))
        while stop is None or not stop.is_set():
            self.ingest()
            live = ray.get(self.hub.live.remote())
            self.follow(live)
            if live["paused"] or not self.ready():
                time.sleep(1.0)
                continue
            if self.train_round():
                self.gate_and_publish()
            self.send_report()

    def follow(self, live: dict) -> None:
        """Track the hub's live version: the live copy always; the student too unless it is the
        student's own published version (after a rollback or at start, it restarts from live)."""
        if live["version"] == self.live_version:
            return
        state = self.base_state if live["weights"] is None else ray.get(live["weights"])
        self.live.load_state_dict(state)
        if live["version"] != self.published:
            self.student.load_state_dict(state)
            self.optimizer = self._optimizer()
        log.info("distiller follows live drafter version %s", live["version"])
        self.live_version = self.report["live_version"] = live["version"]

    def ingest(self) -> None:
        """Move every record waiting in the hub into the replay buffer."""
        while True:
            records = ray.get(self.hub.pull.remote(PULL_BATCH))
            for r in records:
                self.buffer.add(r)
            if len(records) < PULL_BATCH:
                return

    def ready(self) -> bool:
        return len(self.buffer.train_records()) >= self.spec.min_records and bool(self.buffer.holdout())

    def train_round(self) -> bool:
        """steps_per_round KD steps, each followed by a pause that holds the duty cycle.

        Pausing (`DistillHub.set_paused`) ends the round before its next step, so the training
        stops within one step (a fraction of a second) rather than a round (tens of seconds):
        returns False then, and the round is not scored."""
        s = self.spec
        idle = (1.0 - s.duty_cycle) / s.duty_cycle
        for _ in range(s.steps_per_round):
            if ray.get(self.hub.live.remote())["paused"]:
                return False
            t0 = time.perf_counter()
            [loss] = distill_steps(self.student, self.optimizer, self.buffer, 1, s.batch_size, s.loss, s.vocab,
                                   s.max_len, self.generator, s.rejected_weight, s.teacher_temperature)
            self.report["steps"] += 1
            self.report["loss"] = loss
            time.sleep(idle * (time.perf_counter() - t0))
        return True

    def gate_and_publish(self) -> None:
        """Score student and live on held-out traffic; publish the student if the gate says so."""
        held_out = self.buffer.holdout()[-GATE_RECORDS:]
        result = self.gate.evaluate(self.student, self.live, held_out, self.spec.vocab, self.device,
                                    self.spec.max_len, self.spec.teacher_temperature)
        self.report.update(rounds=self.report["rounds"] + 1, candidate_score=result.candidate_score,
                           live_score=result.live_score)
        if not result.publish or not ray.get(self.hub.can_publish.remote()):
            self.report["rejected"] += int(not result.publish)
            return
        state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        meta = {"candidate_score": result.candidate_score, "live_score": result.live_score,
                "train_steps": self.report["steps"], "records_seen": self.buffer_total()}
        version = ray.get(self.hub.publish.remote(state, meta))
        if version is not None:
            self.published = version

    def buffer_total(self) -> int:
        return len(self.buffer) + self.buffer.dropped

    def send_report(self) -> None:
        report = {**self.report, "buffer_records": len(self.buffer), "buffer_fill": self.buffer.fill,
                  "buffer_dropped": self.buffer.dropped}
        self.hub.report_training.remote(report)
        if self.on_report is not None:
            self.on_report({k: v for k, v in report.items() if v is not None})


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: the distiller on this worker's device."""
    import ray.train
    import ray.train.torch

    from specserve.actors.distill.hub import get_hub

    Distiller(config["spec"], get_hub(), ray.train.torch.get_device(), on_report=ray.train.report).run()


class DistillerJob:
    """A detached actor that drives the TorchTrainer (fit() blocks for the job's lifetime)."""

    def __init__(self, spec: DistillSpec):
        self.spec = spec
        self.error: str | None = None
        self._thread = threading.Thread(target=self._fit, name="distill-fit", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        s = self.spec
        resources = {"CPU": s.num_cpus, **({"GPU": s.num_gpus} if s.num_gpus else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config={"spec": s},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=s.num_gpus > 0, resources_per_worker=resources),
            run_config=RunConfig(name="specserve-distill", storage_path=s.storage_path,
                                 failure_config=FailureConfig(max_failures=-1)),
        )
        try:
            trainer.fit()
        except Exception as e:  # reported by status(); serving is not affected
            log.exception("the distillation job stopped")
            self.error = f"{type(e).__name__}: {e}"

    def status(self) -> dict:
        return {"running": self._thread.is_alive(), "error": self.error, "spec": asdict(self.spec)}


def start_distiller(spec: DistillSpec):
    """Create (or find) the detached distiller job actor."""
    return ray.remote(DistillerJob).options(name=DISTILLER_NAME, namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True, num_cpus=0, max_restarts=-1).remote(spec)
