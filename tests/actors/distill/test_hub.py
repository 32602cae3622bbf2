"""The distill hub's decisions: inbox bounds, canary assignment, promotion and rollback, restart.

The hub is used as a plain object here (its weights still go through a real object store, so
the module starts one small Ray instance); tests/cluster/test_distill.py runs it as the actor.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
import torch

from specserve.actors.distill.hub import DistillHub, HubSettings, Ledger
from specserve.cluster import serving

from ...cluster.ray_cluster import ray_test_env

pytestmark = pytest.mark.ray
BASE = "demo-v0"


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    serving.connect(None, num_cpus=1, temp_dir=ray_test_env())
    yield
    ray.shutdown()


def hub(tmp_path, **overrides) -> DistillHub:
    return DistillHub(HubSettings(str(tmp_path), BASE, **{"canary_min_drafted": 100, "canary_max_s": 60.0,
                                                          **overrides}))


def weights(value: float) -> dict:
    return {"w": torch.full((2, 2), value)}


def serve(h: DistillHub, version: str, drafted: int, accepted: int, empty: int = 0) -> None:
    h.ingest([], {version: (drafted, accepted, empty)})


def test_empty_draft_steps_count_as_rejected_trials():
    assert Ledger(drafted=10, accepted=8).alpha == 0.8
    assert Ledger(drafted=10, accepted=8, empty=10).alpha == 0.4
    assert Ledger(drafted=0, accepted=0, empty=5).alpha == 0.0


def test_the_inbox_is_bounded_and_counts_what_it_drops(tmp_path):
    h = hub(tmp_path, inbox_capacity=3)
    h.ingest(list(range(5)), {}, tap_dropped=2)
    assert h.pull(10) == [2, 3, 4]
    assert h.counts["inbox_dropped"] == 2 and h.counts["tap_dropped"] == 2 and h.counts["received"] == 5


def test_paused_hub_hands_out_no_records_and_takes_no_publish_unless_forced(tmp_path):
    h = hub(tmp_path)
    h.ingest([1, 2], {})
    h.set_paused(True)
    assert h.pull(10) == [] and not h.can_publish()
    assert h.publish(weights(1.0), {}) is None
    assert h.publish(weights(1.0), {}, force=True) == "distilled-1"
    assert h.publish(weights(2.0), {}, force=True) is None  # a canary is still under evaluation
    h.set_paused(False)
    assert h.pull(10) == [1, 2]


def test_a_canary_goes_to_a_fraction_of_the_replicas_first(tmp_path):
    h = hub(tmp_path, canary_fraction=0.5)
    for r in "abcd":
        assert h.assignment(r, BASE) == {"version": BASE, "weights": None}
    version = h.publish(weights(1.0), {})
    got = {r: h.assignment(r, BASE) for r in "abcd"}
    canaries = [r for r, a in got.items() if a["version"] == version]
    assert len(canaries) == 2
    assert torch.equal(ray.get(got[canaries[0]]["weights"])["w"], weights(1.0)["w"])


def test_a_canary_as_good_as_the_live_version_is_promoted(tmp_path):
    h = hub(tmp_path)
    version = h.publish(weights(1.0), {})
    serve(h, BASE, 100, 50)
    serve(h, version, 60, 29)
    assert h.canary == version  # 60 trials < canary_min_drafted
    serve(h, version, 40, 20)
    assert h.canary is None and h.stable == version and h.counts["promotions"] == 1
    assert h.store.entry(version)["promoted"] is True


def test_a_canary_worse_than_the_live_version_by_more_than_the_margin_is_rolled_back(tmp_path):
    h = hub(tmp_path, rollback_margin=0.05)
    version = h.publish(weights(1.0), {})
    serve(h, BASE, 100, 50)
    serve(h, version, 40, 20, empty=60)  # alpha 0.2: its empty steps count against it
    assert h.canary is None and h.stable == BASE and h.counts["rollbacks"] == 1
    entry = h.store.entry(version)
    assert entry["rolled_back"] and "live acceptance 0.200" in entry["rollback_reason"]


def test_a_canary_with_no_live_evidence_is_promoted_on_the_gate_after_canary_max_s(tmp_path):
    h = hub(tmp_path, canary_max_s=0.05)
    version = h.publish(weights(1.0), {})
    serve(h, BASE, 100, 90)
    time.sleep(0.1)
    serve(h, version, 0, 0)  # nothing drafted with it (e.g. speculation off)
    assert h.stable == version


def test_a_restarted_hub_resumes_from_the_latest_promoted_version(tmp_path):
    h = hub(tmp_path, canary_max_s=0.0)
    good = h.publish(weights(1.0), {})
    h.ingest([], {})  # promoted: no live evidence, canary_max_s passed
    bad = h.publish(weights(2.0), {})
    h.rollback_to(good)
    pending = h.publish(weights(3.0), {})  # a canary never judged before the restart
    again = hub(tmp_path)
    assert (good, bad, pending) == ("distilled-1", "distilled-2", "distilled-3")
    assert again.stable == good and again.canary is None
    assert torch.equal(ray.get(again.live()["weights"])["w"], weights(1.0)["w"])


def test_rollback_to_refuses_unknown_and_rolled_back_versions(tmp_path):
    h = hub(tmp_path)
    v1 = h.publish(weights(1.0), {})
    h.rollback_to(BASE)
    with pytest.raises(KeyError, match="no drafter version"):
        h.rollback_to("nope")
    with pytest.raises(ValueError, match="was rolled back"):
        h.rollback_to(v1)
    assert h.stable == BASE and [v["version"] for v in h.versions()] == [BASE, v1]


def test_pinning_a_version_serves_it_everywhere_and_leaves_the_later_ones_good(tmp_path):
    h = hub(tmp_path, canary_max_s=0.0)
    v1 = h.publish(weights(1.0), {})
    h.ingest([], {})  # promoted
    v2 = h.publish(weights(2.0), {})
    h.ingest([], {})
    h.assignment("r0", v2)
    h.assignment("r1", v2)
    h.pin(BASE)
    assert h.stable == BASE and h.canary is None
    assert {h.assignment(r, v2)["version"] for r in ("r0", "r1")} == {BASE}
    h.pin(v2)  # a rollback to the base would have marked v2 rolled back and refused this
    assert ray.get(h.assignment("r0", BASE)["weights"])["w"].eq(2.0).all()
    assert not any(v.get("rolled_back") for v in h.versions()[1:])
    with pytest.raises(KeyError, match="no drafter version"):
        h.pin("nope")
    h.rollback_to(v1)
    with pytest.raises(ValueError, match="was rolled back"):
        h.pin(v2)


def test_pausing_stops_the_distiller_within_one_step_not_at_the_end_of_its_round(tmp_path):
    from specserve.actors.demo import demo_path
    from specserve.actors.distill.job import Distiller, DistillSpec

    from .synthetic import teacher, teacher_records

    actor = ray.remote(DistillHub).remote(HubSettings(str(tmp_path / "store"), BASE))
    spec = DistillSpec(str(demo_path("drafter")), 8192, str(tmp_path / "train"), steps_per_round=4, duty_cycle=1.0,
                       max_len=32, nice=0)  # nice=0: this is pytest's own thread
    distiller = Distiller(spec, actor, torch.device("cpu"))
    for r in teacher_records(teacher(seed=0), 16, seed=0):
        distiller.buffer.add(r)
    assert distiller.train_round() and distiller.report["steps"] == 4
    ray.get(actor.set_paused.remote(True))
    assert not distiller.train_round() and distiller.report["steps"] == 4
    ray.kill(actor)


def test_the_trainer_thread_runs_at_the_configured_niceness_and_other_threads_keep_theirs():
    from specserve.actors.distill.job import lower_priority

    seen = {}

    def trainer():
        seen["returned"] = lower_priority(19)
        seen["trainer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    assert seen == {"returned": 19, "trainer": 19, "child": 19}  # threads it starts inherit it
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
