"""Online distillation on a real cluster: tap -> hub -> Ray Train distiller -> publish -> canary
-> hot swap into the drafter replicas, rollbacks, a killed distiller, a cluster restart.

One cluster for the module (restarted once, by the last test): the demo pair in float64 (so
outputs compare token for token with the target decoding alone), two drafter replicas, and a
distiller tuned to act within seconds: short rounds, a gate that publishes every candidate
(gate_margin -1; the gate's own decisions are tested in tests/actors/distill/test_gate.py) and
short canaries. The tests run in file order and build on each other's versions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
import ray
import torch

from specserve.actors.demo import demo_path
from specserve.actors.distill.hub import get_hub
from specserve.actors.registry import get_registry
from specserve.cluster import serving
from specserve.cluster.client import Client

from .entry import main_here
from .ray_cluster import demo_config, local_cluster, target_greedy

pytestmark = pytest.mark.ray

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef walk(path):",
           "    for key, value in items:\n", "return self._cache[", "# Compute the checksum\n",
           "def parse_args(argv):\n    parser = ", "with open(path) as f:\n"]
NEW_TOKENS = 16
DISTILL = {"enabled": True, "min_records": 48, "steps_per_round": 4, "batch_size": 8, "gate_margin": -1.0,
           "canary_min_drafted": 30, "canary_max_s": 8.0, "canary_fraction": 0.5, "duty_cycle": 1.0,
           "num_cpus": 0.5, "max_len": 64}


@pytest.fixture(scope="module")
def store():
    return tempfile.mkdtemp(prefix="specserve-test-versions-")


@pytest.fixture(scope="module")
def cfg(store):
    # fixed_k, no prompt lookup: the demo drafter drafts every step, so canaries are judged on live acceptance
    return demo_config(distill={**DISTILL, "store_path": store}, speculation={"fixed_k": 3, "prompt_lookup": 0})


@pytest.fixture(scope="module")
def cluster(cfg):
    with local_cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return target_greedy(PROMPTS, NEW_TOKENS)


def hub_status() -> dict:
    return ray.get(get_hub().status.remote(), timeout=30)


def wait_for(predicate, timeout_s: float, what: str, during=None):
    """Poll `predicate` (every 0.5 s, calling `during` between polls) until true or fail naming `what`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if during is not None:
            during()
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; hub: {hub_status()}")


class Load:
    """Greedy requests from `threads` clients until stopped (or `max_requests` each); every reply
    is checked against the target's own output and every failure is kept."""

    def __init__(self, cfg, reference, threads: int = 4, max_requests: int = 400):
        self.cfg, self.reference = cfg, reference
        self.replies, self.failures, self.mismatches = [], [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, max_requests)) for i in range(threads)]

    def _run(self, index: int, max_requests: int) -> None:
        with Client(f"127.0.0.1:{self.cfg.server.grpc_port}", timeout_s=120) as client:
            for n in range(max_requests):
                if self.stop.is_set():
                    return
                prompt = PROMPTS[(index + n) % len(PROMPTS)]
                try:
                    reply = client.generate(prompt=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
                except grpc.RpcError as e:
                    self.failures.append(e.code().name)
                    continue
                self.replies.append(reply)
                if reply.token_ids != self.reference[prompt]:
                    self.mismatches.append(prompt)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def registry_versions(cfg) -> set[str]:
    return {r["weight_version"] for r in ray.get(get_registry().list_dicts.remote(), timeout=10)}


def test_served_traffic_reaches_the_distiller_and_it_trains(cluster, reference):
    with Load(cluster, reference, threads=2, max_requests=60):
        wait_for(lambda: hub_status()["trainer"]["steps"] > 0, 180, "the distiller's first training steps")
    st = hub_status()
    assert st["received"] > 0 and st["pulled"] > 0
    assert st["trainer"]["loss"] is not None and st["trainer"]["candidate_score"] is not None
    assert st["trainer"]["live_version"] == "demo-v0"
    verifier = serve_load()
    assert verifier["tap"]["recorded"] > 0 and verifier["tap"]["drained"] > 0


def serve_load() -> dict:
    from ray import serve

    return serve.get_app_handle("specserve").load.remote().result(timeout_s=30)


def test_a_published_version_is_hot_swapped_under_load_with_identical_outputs(cluster, reference):
    with Load(cluster, reference, threads=4) as load:
        wait_for(lambda: hub_status()["promotions"] >= 1, 240, "a promoted distilled version")
        promoted = hub_status()["stable"]
        wait_for(lambda: registry_versions(cluster) == {promoted} or
                 hub_status()["stable"] != promoted, 60, "every drafter replica on the promoted version")
        time.sleep(3)  # keep serving across the swap
    assert promoted.startswith("distilled-")
    assert load.failures == [] and load.mismatches == []
    assert len(load.replies) > 20
    # drafts were verified from both the shipped weights and a distilled version while the load ran
    versions = {r.drafter_version for r in load.replies if r.drafted}
    assert any(v.startswith("distilled-") for v in versions), versions


def cli(*args: str) -> subprocess.CompletedProcess:
    address = ray.get_runtime_context().gcs_address
    return subprocess.run([sys.executable, "-m", "specserve.cluster.cli", "distill", *args, "--address", address],
                          capture_output=True, text=True, timeout=120)


def cli_here(*args: str) -> tuple[int, str, str]:
    """`specserve distill ...` through the entry point in this process, already connected."""
    return main_here("distill", *args, "--address", ray.get_runtime_context().gcs_address)


def test_operator_rollback_returns_every_replica_to_the_chosen_version(cluster, reference):
    ray.get(get_hub().set_paused.remote(True))  # or the distiller would publish its next candidate right after
    try:
        before = hub_status()
        out = cli("rollback", "demo-v0")  # as an operator runs it: a process of its own joining the cluster
        assert out.returncode == 0, out.stderr
        assert "live drafter version: demo-v0" in out.stdout
        wait_for(lambda: registry_versions(cluster) == {"demo-v0"}, 30, "drafters back on demo-v0")
        versions = {v["version"]: v for v in ray.get(get_hub().versions.remote())}
        published = [v for v in versions if v.startswith("distilled-")]
        assert published and all(versions[v].get("rolled_back") for v in published)
        assert hub_status()["rollbacks"] > before["rollbacks"] and hub_status()["stable"] == "demo-v0"
        status, _, err = cli_here("rollback", "no-such-version")
        assert status == 2 and "no drafter version" in err
        status, listing, _ = cli_here("versions")
        assert status == 0 and "rolled back" in listing
        status, shown, _ = cli_here("status")
        assert status == 0 and "live version demo-v0" in shown
    finally:
        resumed, _, err = cli_here("resume")
    assert resumed == 0 and not hub_status()["paused"], err


def scrambled_drafter_state() -> dict:
    """The demo drafter with its vocabulary rows permuted: a drafter that is almost always wrong."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_path("drafter"), dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perm = torch.randperm(state["model.embed_tokens.weight"].shape[0], generator=torch.Generator().manual_seed(0))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][perm]
    if "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"][perm]
    return state


def test_a_canary_worse_than_the_live_version_is_rolled_back_automatically(cluster, reference):
    hub = get_hub()
    ray.get(hub.set_paused.remote(True))  # the distiller publishes nothing while we test
    try:
        wait_for(lambda: ray.get(hub.status.remote())["canary"] is None, 60, "no canary in flight")
        stable = hub_status()["stable"]
        version = ray.get(hub.publish.remote(scrambled_drafter_state(), {"note": "scrambled"}, True))
        assert version is not None
        with Load(cluster, reference, threads=4) as load:
            wait_for(lambda: hub_status()["canary"] is None, 120, "the canary's verdict")
        st = hub_status()
        entry = next(v for v in ray.get(hub.versions.remote()) if v["version"] == version)
        assert entry.get("rolled_back") and "live acceptance" in entry["rollback_reason"], entry
        assert st["stable"] == stable
        wait_for(lambda: registry_versions(cluster) == {stable}, 30, "drafters back on the stable version")
        assert load.failures == [] and load.mismatches == []
    finally:
        ray.get(hub.set_paused.remote(False))


def test_killing_the_distiller_loses_no_request_and_training_resumes_from_the_live_version(cluster, reference):
    worker = wait_for(lambda: hub_status()["trainer"]["worker"], 30, "the training worker's report")
    starts = hub_status()["trainer"]["starts"]
    live = hub_status()["stable"]
    with Load(cluster, reference, threads=3) as load:
        time.sleep(2)
        os.kill(int(worker.split(":")[1]), signal.SIGKILL)  # the training worker's process dies mid-training
        wait_for(lambda: hub_status()["trainer"]["starts"] > starts, 180, "the restarted training loop")
        steps = hub_status()["trainer"]["steps"]
        wait_for(lambda: hub_status()["trainer"]["steps"] > steps, 120, "training steps after the restart")
    assert load.failures == [] and load.mismatches == []
    # it resumed from the version live when it was killed, or one promoted after it
    versions = ray.get(get_hub().versions.remote())
    names = [v["version"] for v in versions]
    resumed = hub_status()["trainer"]["resumed_from"]
    assert names.index(resumed) >= names.index(live)
    assert versions[names.index(resumed)].get("promoted", True), versions


def test_published_versions_survive_a_cluster_restart(cluster, reference):
    wait_for(lambda: hub_status()["stable"].startswith("distilled-") and hub_status()["canary"] is None, 240,
             "a promoted distilled version", during=lambda: _one_request(cluster))
    stable = hub_status()["stable"]
    serving.shutdown()
    with local_cluster(cluster):
        assert hub_status()["stable"] == stable
        wait_for(lambda: registry_versions(cluster) == {stable}, 60, f"drafters restarted on {stable}")
        with Client(f"127.0.0.1:{cluster.server.grpc_port}", timeout_s=120) as client:
            reply = client.generate(prompt=PROMPTS[0], max_tokens=NEW_TOKENS, ignore_eos=True)
        assert reply.token_ids == reference[PROMPTS[0]]


def _one_request(cfg) -> None:
    with Client(f"127.0.0.1:{cfg.server.grpc_port}", timeout_s=120) as client:
        client.generate(prompt=PROMPTS[1], max_tokens=NEW_TOKENS, ignore_eos=True)
