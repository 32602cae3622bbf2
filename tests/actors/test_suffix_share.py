"""Finished requests shared between verifier replicas (actors/suffix_share.py) on a real Ray
cluster: a request on replica B drafts from what replica A served, outputs stay the target's,
and a replica whose share actor is gone keeps drafting from its local index."""

from __future__ import annotations

import time

import pytest
import ray

from specserve.actors.engine.request import make_params
from specserve.actors.remote_drafter import RemoteDrafterPool
from specserve.actors.suffix_share import SHARE_NAME, SuffixShare, SuffixSync
from specserve.actors.registry import NAMESPACE
from specserve.cluster import serving

from ..cluster.ray_cluster import ray_test_env
from .engine.tiny import always_drafting_engine, build_model, family_config, hf_greedy, runner

pytestmark = pytest.mark.ray

PROMPT = [5, 17, 3, 40, 41, 42, 8, 9]  # no token repeats: its own context drafts nothing at first
NEW_TOKENS = 8  # short, before the tiny target's output starts repeating itself


@pytest.fixture(scope="module")
def cluster():
    serving.connect(None, num_cpus=2, temp_dir=ray_test_env())
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    target = build_model(family_config("llama"), seed=0)
    return target, hf_greedy(target, PROMPT, NEW_TOKENS)


def replica(target, name: str, app: str = "app"):
    """A verifier replica's engine drafting by suffix lookup only (no drafter replicas), and
    its sync with the share actor (stepped by hand: no background exchange)."""
    pool = RemoteDrafterPool(lambda: [], target.config.vocab_size, lookup_min_n=1)
    sync = SuffixSync(app, name, pool.add_finished, every_s=3600.0)
    pool.on_finished = sync.finished
    return always_drafting_engine(runner(target), pool, 4), pool, sync


def generate(engine):
    [result] = engine.generate([PROMPT], make_params(max_tokens=NEW_TOKENS))
    return result


def test_a_request_on_one_replica_drafts_from_what_another_replica_served(cluster, model):
    target, want = model
    a, _, sync_a = replica(target, "A")
    b, pool_b, sync_b = replica(target, "B")
    alone, _, _ = replica(target, "C", app="other")  # another application: shares nothing with A
    assert generate(a).token_ids == want
    sync_a.sync_once()  # A publishes the request it finished
    sync_b.sync_once()  # B receives it
    assert sync_b.received == 1
    got, control = generate(b), generate(alone)
    assert got.token_ids == control.token_ids == want
    assert got.stats.accepted > control.stats.accepted  # B drafted A's continuation
    assert got.stats.accepted >= NEW_TOKENS // 2
    sync_b.sync_once()
    assert sync_a.received == 0 and sync_b.received == 1  # nothing comes back to its publisher


def test_the_share_keeps_within_its_token_bound(cluster):
    share = ray.remote(num_cpus=0)(SuffixShare).remote(max_tokens=100)
    ray.get(share.publish.remote("app", "A", [list(range(40))] * 5))
    stats = ray.get(share.stats.remote())
    assert stats["tokens"] <= 100 and stats["requests"] == 2  # the oldest three went
    requests, cursor = ray.get(share.since.remote("app", "B", 0))
    assert len(requests) == 2 and cursor == 5


def test_a_replica_whose_share_is_gone_keeps_drafting_from_its_local_index(cluster, model):
    target, want = model
    b, _, sync_b = replica(target, "B2", app="alone")  # no other replica of its application
    sync_b.sync_once()  # it holds the share actor's handle
    ray.kill(ray.get_actor(SHARE_NAME, namespace=NAMESPACE), no_restart=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:  # the kill is asynchronous: wait until the actor is gone
        try:
            ray.get_actor(SHARE_NAME, namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.1)
    with pytest.raises(Exception):
        sync_b.sync_once()  # the background thread logs this and looks the actor up again
    first, second = generate(b), generate(b)
    assert first.token_ids == second.token_ids == want
    assert second.stats.accepted > first.stats.accepted  # its own finished request drafted the second
