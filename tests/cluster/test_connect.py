"""Starting a local Ray node: a node start that times out (Ray's fixed 30 s wait for its raylet,
missed on a loaded machine) is tried again; other failures are not hidden."""

from __future__ import annotations

import pytest
import ray

from specserve.cluster import serving

from .ray_cluster import ray_test_env

pytestmark = pytest.mark.ray

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


def test_a_timed_out_node_start_is_tried_again(monkeypatch):
    real_init, calls = ray.init, []

    def init(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise TIMEOUT
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", init)
    try:
        serving.connect(None, num_cpus=1, temp_dir=ray_test_env())
        assert ray.is_initialized() and len(calls) == 2
        assert ray.get(ray.put(7)) == 7  # the second start is a working node
    finally:
        ray.shutdown()


def test_repeated_timeouts_and_other_errors_are_raised(monkeypatch):
    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise TIMEOUT if kwargs.get("num_cpus") == 1 else ValueError("bad num_cpus")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(serving.time, "sleep", lambda s: None)
    with pytest.raises(Exception, match="timed out during startup"):
        serving.connect(None, num_cpus=1)
    assert len(calls) == serving.LOCAL_START_ATTEMPTS
    calls.clear()
    with pytest.raises(ValueError, match="bad num_cpus"):
        serving.connect(None, num_cpus=3)
    assert len(calls) == 1
