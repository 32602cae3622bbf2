"""Faults under load (cluster/faults.py): kill a drafter replica, the registry, the distill hub,
the distiller or a verifier replica while concurrent greedy streams run, and count what the
clients lost.

One cluster for the module: the demo pair in float64 (outputs compare token for token with the
target decoding alone), two drafter replicas, one verifier with fewer batch slots than there
are clients (so that some requests are always waiting, unstreamed, when it dies), and
distillation on with short training rounds (so that the distiller is training when killed).
Each test runs its own short load window around one fault; the fault function returns once
the system has recovered (or raises TimeoutError).
"""

from __future__ import annotations

import tempfile

import pytest
import ray
from ray import serve

from specserve.actors.distill.hub import get_hub
from specserve.actors.distill.job import DISTILLER_NAME
from specserve.actors.registry import NAMESPACE
from specserve.cluster import faults
from specserve.cluster.config import APP_NAME

from .ray_cluster import demo_config, local_cluster, target_greedy

pytestmark = pytest.mark.ray

PROMPTS = faults.PROMPTS[:6]
NEW_TOKENS = 16
CLIENTS = 4  # the verifier's batch slots (below): every slot busy, none waiting
DISTILL = {"enabled": True, "min_records": 48, "steps_per_round": 4, "batch_size": 8, "max_len": 64,
           "num_cpus": 0.5, "duty_cycle": 0.5}


@pytest.fixture(scope="module")
def cluster():
    # fixed_k, no prompt lookup: every step asks the drafters, so they are on every request's path when they die
    cfg = demo_config(verifier={"max_num_seqs": CLIENTS}, speculation={"fixed_k": 3, "prompt_lookup": 0},
                      distill={**DISTILL, "store_path": tempfile.mkdtemp(prefix="specserve-test-faults-")})
    with local_cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return target_greedy(PROMPTS, NEW_TOKENS)


def under_load(cfg, reference, name, fault, clients=CLIENTS) -> dict:
    return faults.run_fault(name, fault, f"127.0.0.1:{cfg.server.grpc_port}", reference, NEW_TOKENS,
                            threads=clients, lead_s=1.5, tail_s=2.0, deadline_s=60, max_requests=100)


def failures(row) -> list[tuple]:
    return [(r.code, r.streamed, r.details[:200]) for r in row["records"] if not r.ok]


def assert_nothing_lost(row) -> None:
    assert row["in_flight_at_fault"] > 0  # the fault hit running streams
    assert row["failed_by_code"] == {}, failures(row)
    assert row["changed_outputs"] == 0
    assert row["completed_after_recovery"] > 0


def test_a_killed_drafter_replica_loses_no_request_and_is_replaced(cluster, reference):
    before = faults.replica_actor_names("Drafter")
    row = under_load(cluster, reference, "drafter", faults.kill_drafter)
    assert_nothing_lost(row)
    after = faults.replica_actor_names("Drafter")
    assert len(after) == len(before) and after != before
    assert row["drafted_after_recovery"] > 0  # the verifier drafts again once it is back


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted", "gone"])
def test_a_killed_registry_comes_back_refilled_and_loses_no_request(cluster, reference, no_restart):
    row = under_load(cluster, reference, "registry", lambda: faults.kill_registry(no_restart=no_restart))
    assert_nothing_lost(row)
    assert row["drafted_after_recovery"] > 0


def test_a_killed_distiller_restarts_training_and_loses_no_request(cluster, reference):
    faults.wait_until(lambda: ray.get(get_hub().status.remote())["trainer"]["starts"] > 0, 180,
                      "the distiller's training loop")
    row = under_load(cluster, reference, "distiller", faults.kill_distiller)
    assert_nothing_lost(row)
    job = ray.get_actor(DISTILLER_NAME, namespace=NAMESPACE)
    assert ray.get(job.status.remote(), timeout=30)["error"] is None


def test_a_killed_distill_hub_restarts_on_the_stable_version_and_loses_no_request(cluster, reference):
    stable = ray.get(get_hub().status.remote(), timeout=30)["stable"]
    row = under_load(cluster, reference, "hub", faults.kill_hub)
    assert_nothing_lost(row)
    status = ray.get(get_hub().status.remote(), timeout=30)
    # it comes back on the newest promoted version in its store: the one live before, or one
    # promoted since, never the base again once a distilled version was live
    assert status["stable"] == stable or status["stable"].startswith("distilled-")


def test_a_killed_verifier_fails_only_running_streams_with_unavailable(cluster, reference):
    before = faults.replica_actor_names("Verifier")
    row = under_load(cluster, reference, "verifier", faults.kill_verifier, clients=CLIENTS + 2)
    assert row["failed_before_first_token"] == 0, failures(row)  # retried by the client, then served
    assert row["failed_mid_stream"] > 0 and set(row["failed_by_code"]) == {"UNAVAILABLE"}, failures(row)
    assert row["waiting_at_fault"] > 0  # requests that had not streamed when it died were served
    assert row["changed_outputs"] == 0  # neither what completed nor the prefixes the failed ones streamed
    assert row["completed_after_recovery"] > 0
    assert faults.replica_actor_names("Verifier") != before
    assert serve.status().applications[APP_NAME].deployments["Verifier"].replica_states == {"RUNNING": 1}
