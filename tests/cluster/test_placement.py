"""Heterogeneous placement from the config, on a multi-node Ray cluster on this one machine.

Four Ray nodes (`ray.cluster_utils.Cluster`), each offering something a pool asks for:

    head      1 CPU, draft_slot 2                        unlabelled: a drafter's decoy
    drafter   1 CPU, draft_slot 2                        specserve/role=drafter
    verifier  1 CPU, 1 GPU, accelerator_type:A100        specserve/role=verifier
    spare     1 CPU, 1 GPU, accelerator_type:A100        unlabelled: a verifier's decoy

The decoys offer every resource their pool asks for except the label, so only the label
selector keeps the pools off them. The GPUs are declared, not real: the verifier is given one
by Ray, finds no CUDA, and falls back to the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from specserve.cluster import serving
from specserve.cluster.client import Client
from specserve.cluster.config import APP_NAME, SpecserveConfig

from .ray_cluster import demo_config, ray_test_env, target_greedy

pytestmark = pytest.mark.ray

ROLE = "specserve/role"
DRAFT_SLOT = "draft_slot"  # a custom resource only CPU nodes offer
A100 = "accelerator_type:A100"  # the resource Ray schedules `accelerator_type="A100"` on
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 24


@dataclass(frozen=True)
class Placed:
    """The deployed config and the cluster's node ids by role."""

    cfg: SpecserveConfig
    nodes: dict[str, str]


@pytest.fixture(scope="module")
def placed():
    """The cluster of the module docstring with the specserve application deployed on it."""
    temp_dir = ray_test_env()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {DRAFT_SLOT: 2}, "temp_dir": temp_dir, "include_dashboard": False})
    try:
        roles = {
            "head": cluster.head_node.node_id,
            "drafter": cluster.add_node(num_cpus=1, resources={DRAFT_SLOT: 2}, labels={ROLE: "drafter"},
                                        temp_dir=temp_dir).node_id,
            "verifier": cluster.add_node(num_cpus=1, num_gpus=1, resources={A100: 1}, labels={ROLE: "verifier"},
                                         temp_dir=temp_dir).node_id,
            "spare": cluster.add_node(num_cpus=1, num_gpus=1, resources={A100: 1}, temp_dir=temp_dir).node_id,
        }
        cfg = placed_config()
        serving.connect(cluster.address)
        try:
            serving.deploy(cfg, timeout_s=300)
            yield Placed(cfg, roles)
        finally:
            serving.shutdown()
    finally:
        cluster.shutdown()


def placed_config() -> SpecserveConfig:
    """The demo pair with each pool placed by labels, resources and accelerator type."""
    return demo_config(
        verifier={"num_cpus": 0.5, "num_gpus": 1, "accelerator_type": "A100", "labels": {ROLE: "verifier"}},
        drafter={"num_cpus": 0.5, "replicas": 2, "resources": {DRAFT_SLOT: 1}, "labels": {ROLE: "drafter"}},
        speculation={"fixed_k": 3, "prompt_lookup": 0},  # every step asks the drafters, whatever the cost model would decide
    )


def node_info() -> dict[str, dict]:
    """Every live node as Ray's GCS reports it, by node id."""
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def drafter_records() -> list:
    return ray.get(serving.get_registry().list.remote(), timeout=10)


def test_every_drafter_replica_runs_on_a_drafter_labelled_cpu_only_node(placed):
    records = drafter_records()
    assert len(records) == 2
    info = node_info()
    for r in records:
        node = info[r.node_id]
        assert node["Labels"].get(ROLE) == "drafter"
        assert "GPU" not in node["Resources"]
        assert r.device == "cpu"
    assert {r.node_id for r in records} == {placed.nodes["drafter"]}  # not the unlabelled head


def test_the_verifier_runs_on_the_gpu_labelled_node_and_falls_back_to_the_cpu(placed):
    load = serve.get_app_handle(APP_NAME).load.remote().result()
    assert load["node_id"] == placed.nodes["verifier"]  # not the unlabelled spare GPU node
    node = node_info()[load["node_id"]]
    assert node["Labels"].get(ROLE) == "verifier" and node["Resources"].get("GPU") == 1
    assert load["device"] == "cpu"  # Ray gave it a GPU, but there is no CUDA here


def test_the_pools_hold_the_resources_their_config_declares(placed):
    free = ray.available_resources()
    assert free.get(DRAFT_SLOT, 0) == 2  # 4 offered, one per drafter replica taken
    assert free.get("GPU", 0) == 1  # 2 offered, the verifier's taken
    assert free.get(A100, 0) == pytest.approx(1.999)  # accelerator_type asks for a sliver of it


def test_greedy_generation_across_the_nodes_uses_drafts_and_equals_the_targets_own(placed):
    want = target_greedy([PROMPT], NEW_TOKENS)[PROMPT]
    with Client(f"127.0.0.1:{placed.cfg.server.grpc_port}") as c:
        reply = c.generate(PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert reply.finish_reason == "length"
    assert reply.token_ids == want
    assert reply.drafted > 0 and reply.accepted > 0  # drafts crossed from the drafter node
