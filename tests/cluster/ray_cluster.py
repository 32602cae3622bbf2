"""A real Ray cluster with Serve and the specserve application, for one test module."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

import grpc
import ray
import torch

from specserve.cluster import serving
from specserve.cluster.config import parse_config
from specserve.cluster.faults import target_reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_test_env() -> str:
    """Own temp dir (short: Ray's socket paths are length-limited) and no token auth on loopback."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return tempfile.mkdtemp(prefix="ssr-", dir="/tmp")


def demo_config(**overrides):
    """The demo pair in float64 (batching cannot flip an argmax) on free ports, small caches."""
    data = {
        "models": {"dtype": "float64"},
        "verifier": {"num_cpus": 0.5, "max_num_seqs": 8, "max_queue": 24, "max_seq_len": 256},
        "drafter": {"num_cpus": 0.5, "replicas": 2, "max_num_seqs": 64, "host": "127.0.0.1"},
        "speculation": {"draft_deadline_ms": 200},
        "server": {"grpc_port": free_port(), "http_port": free_port()},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


def channel(cfg) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{cfg.server.grpc_port}")


@contextlib.contextmanager
def local_cluster(cfg, num_cpus: int = 4):
    """A local Ray cluster (own temp dir, no token auth) with `cfg` deployed; torn down after."""
    try:
        serving.connect(None, num_cpus=num_cpus, temp_dir=ray_test_env())
    except Exception as e:
        # Ray gives its raylet 30 s to register; right after the previous module's cluster went
        # down, on a loaded 2-core machine, it sometimes needs longer: start once more
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        serving.connect(None, num_cpus=num_cpus, temp_dir=ray_test_env())
    try:
        serving.deploy(cfg, timeout_s=300)
        yield cfg
    finally:
        # the local cluster goes down with its processes: no graceful drain of Serve first,
        # which would cost seconds per module and is exercised by `specserve demo`
        ray.shutdown()


def target_greedy(prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """The demo target's own greedy continuation of each prompt, decoded alone in this process
    (float64, like the served models in these tests)."""
    torch.set_num_threads(1)
    return target_reference(prompts, max_tokens)
