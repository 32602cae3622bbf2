"""A real Ray cluster with Serve and the specserve application, for one test module."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile

import grpc
import ray
import torch

from specserve.cluster import serving
from specserve.cluster.config import parse_config
from specserve.cluster.faults import target_reference


_GIVEN: set[int] = set()  # ports free_port returned in this process: never twice
RAY_WORKER_PORTS_END = 20000  # Ray's workers listen on 10002-19999 by default: stay above


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range, not returned before.

    A port the kernel hands out (bind to port 0) is ephemeral: between this check and Serve's
    proxy binding it, any outgoing connection (Ray opens many) may be given the same port, and
    the proxy then fails to bind. Ports below the ephemeral range are never given out that way;
    the ones chosen here also stay above the range Ray's workers listen on.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(RAY_WORKER_PORTS_END if ephemeral_low > RAY_WORKER_PORTS_END + 1000 else 1024,
                             ephemeral_low)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port below the ephemeral range (from {ephemeral_low})")


def ray_test_env() -> str:
    """Own temp dir (short: Ray's socket paths are length-limited) and no token auth on loopback.
    RAY_TMPDIR points there too: what Ray writes outside a session's temp dir (the address file
    of ray.cluster_utils.Cluster) goes to $RAY_TMPDIR/ray, else /tmp/ray, which need not exist."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = tempfile.mkdtemp(prefix="ssr-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"))  # Ray's default temp dir under RAY_TMPDIR
    return temp_dir


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
def local_cluster(cfg, num_cpus: int = 4, applications: list[dict] | None = None, before_deploy=None):
    """A local Ray cluster (own temp dir, no token auth) with `cfg` deployed (or `applications`,
    see SpecserveConfig.to_serve_config); torn down after. `before_deploy()` runs once Serve
    and its proxies are up, before any application is deployed."""
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
        if before_deploy is not None:
            serving.start_serve(cfg.to_serve_config())
            before_deploy()
        serving.deploy(cfg, timeout_s=300, applications=applications)
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
