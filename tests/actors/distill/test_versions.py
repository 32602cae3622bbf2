"""Drafter weight versions persist as safetensors with metadata and survive a restart."""

from __future__ import annotations

import pytest
import torch

from specserve.actors.distill.versions import VersionStore


def weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 3, generator=gen), "layer.bias": torch.randn(4, generator=gen)}


def test_published_versions_load_back_exactly_and_the_newest_is_latest(tmp_path):
    store = VersionStore(tmp_path)
    assert store.latest() is None
    store.publish(weights(0), "v1", {"score": 0.40})
    store.publish(weights(1), "v2", {"score": 0.45, "parent": "v1"})
    assert store.latest()["version"] == "v2" and store.latest()["parent"] == "v1"
    for version, seed in (("v1", 0), ("v2", 1)):
        loaded = store.load(version)
        assert all(torch.equal(loaded[k], t) for k, t in weights(seed).items())


def test_versions_survive_a_restart_and_a_rollback_is_remembered(tmp_path):
    store = VersionStore(tmp_path)
    store.publish(weights(0), "v1")
    store.publish(weights(1), "v2")
    assert store.rollback("v2", "live acceptance fell")["version"] == "v1"
    restarted = VersionStore(tmp_path)  # a new process over the same directory
    assert restarted.latest()["version"] == "v1"
    assert [v["version"] for v in restarted.versions()] == ["v1", "v2"]
    assert restarted.versions()[1]["rollback_reason"] == "live acceptance fell"
    assert torch.equal(restarted.load("v1")["layer.bias"], weights(0)["layer.bias"])


def test_bad_names_duplicates_and_unknown_versions_are_clear_errors(tmp_path):
    store = VersionStore(tmp_path)
    store.publish(weights(0), "v1")
    with pytest.raises(ValueError, match="already exists"):
        store.publish(weights(1), "v1")
    with pytest.raises(ValueError, match="version name"):
        store.publish(weights(1), "../escape")
    with pytest.raises(KeyError, match="no drafter version 'v9'"):
        store.load("v9")
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind
