"""The drafter pool autoscales from drafter load through Serve's own autoscaler.

One cluster for the module: a verifier and an autoscaled drafter pool (1 to 2 replicas, two
live sequences per replica) of the demo pair. Six concurrent long streams ask for three
replicas' worth of drafting, so the pool must grow to its maximum; once they stop, it must
shrink back to one. Delays are short and the look-back window just above the 10 s at which replicas
push their load to Serve, so that both happen within a minute or two.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray import serve

from specserve.cluster import serving
from specserve.cluster.client import Client
from specserve.cluster.config import APP_NAME, DRAFTER, VERIFIER

from .ray_cluster import demo_config, local_cluster, target_greedy

pytestmark = pytest.mark.ray

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef walk(path):"]
STREAMS = 6  # concurrent streams: 6 sequences / 2 per replica asks for 3, capped at max_replicas
NEW_TOKENS = 160  # long streams: several seconds each, so the load stays up between requests
LOAD_LIMIT_S = 150.0  # the load never runs longer, whatever happens
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_sequences_per_replica": 2,
               "upscale_delay_s": 1.0, "downscale_delay_s": 2.0, "look_back_period_s": 12.0}


@pytest.fixture(scope="module")
def reference():
    """The target's own greedy continuation of each prompt, decoded in this process."""
    return target_greedy(PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def cluster(reference):  # the reference first: it would compete with the cluster for the CPUs
    # a fixed draft length: every sequence drafts from its first step, whatever the cost model
    # would decide on this loaded machine (with speculation off, a sequence attaches to no drafter);
    # a long draft deadline: a drafter slowed by this busy machine keeps its sequences (three late
    # drafts in a row would detach one for a second, and the load the policy sees would sag)
    speculation = {"fixed_k": 3, "prompt_lookup": 0, "draft_deadline_ms": 1000.0}
    with local_cluster(demo_config(drafter={"autoscaling": AUTOSCALING}, speculation=speculation)) as cfg:
        yield cfg


class Load:
    """STREAMS threads each generating long greedy streams back to back until stopped."""

    def __init__(self, cfg):
        self.address = f"127.0.0.1:{cfg.server.grpc_port}"
        self.results: list = []  # (prompt, Reply or the exception raised)
        self._stop = threading.Event()
        self._deadline = time.monotonic() + LOAD_LIMIT_S
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(STREAMS)]

    def _run(self, i: int) -> None:
        with Client(self.address) as c:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    self.results.append((prompt, c.generate(prompt, max_tokens=NEW_TOKENS, ignore_eos=True)))
                except Exception as e:  # asserted on by the test
                    self.results.append((prompt, e))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(LOAD_LIMIT_S)


def replica_states(deployment: str) -> dict:
    return dict(serve.status().applications[APP_NAME].deployments[deployment].replica_states)


def wait_for(predicate, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Whether `predicate()` became true within `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def drafter_records() -> list:
    return ray.get(serving.get_registry().list.remote(), timeout=10)


def both_replicas_drafting() -> bool:
    """Both replicas registered and drafting (new sequences go to the least loaded one)."""
    records = drafter_records()
    return len(records) == 2 and all(r.load > 0 for r in records)


def test_drafter_load_scales_the_pool_up_then_back_down_without_touching_the_verifier(cluster, reference):
    verifier_before = serve.get_app_handle(APP_NAME).load.remote().result()["replica_id"]
    assert replica_states(DRAFTER) == {"RUNNING": 1}

    with Load(cluster) as load:
        assert wait_for(lambda: replica_states(DRAFTER) == {"RUNNING": 2}, timeout_s=90), (
            replica_states(DRAFTER), [(r.replica_id, r.load) for r in drafter_records()], len(load.results))
        assert wait_for(both_replicas_drafting, timeout_s=30), [(r.replica_id, r.load) for r in drafter_records()]
        assert load.results  # at least one stream completed while the pool was growing

    errors = [r for _, r in load.results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert all(r.finish_reason == "length" and r.token_ids == reference[p] for p, r in load.results)
    assert sum(r.drafted for _, r in load.results) > 0

    assert wait_for(lambda: replica_states(DRAFTER) == {"RUNNING": 1}, timeout_s=90), replica_states(DRAFTER)
    assert wait_for(lambda: len(drafter_records()) == 1, timeout_s=30), drafter_records()
    assert replica_states(VERIFIER) == {"RUNNING": 1}
    assert serve.get_app_handle(APP_NAME).load.remote().result()["replica_id"] == verifier_before
