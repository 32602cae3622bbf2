"""The deployed application end to end: real Ray, real Serve gRPC proxy, real drafter replicas.

One cluster for the module: a verifier and two drafter replicas of the demo pair (float64, so
that batching can never flip an argmax and outputs compare token for token with the target
decoding alone in this process).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from ray import serve

from specserve.actors.demo import demo_path
from specserve.cluster import serving
from specserve.cluster.client import Client
from specserve.cluster.config import APP_NAME
from specserve.v1 import generation_pb2

from .ray_cluster import demo_config, local_cluster, target_greedy

pytestmark = pytest.mark.ray

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef walk(path):",
           "    for key, value in items:\n", "return self._cache[", "# Compute the checksum\n"]
NEW_TOKENS = 24
LONG = 48  # tokens of the reference continuations; requests take prefixes of them


@pytest.fixture(scope="module")
def cluster():
    # a fixed draft length and no prompt lookup: every step asks the drafters, so they take part
    # in every request whatever the cost model would decide on this loaded machine (the default,
    # lookup in the verifier, is served in test_hardening)
    with local_cluster(demo_config(speculation={"fixed_k": 3, "prompt_lookup": 0})) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def reference():
    """The target's own greedy continuation of each prompt (short, and LONG keyed by (prompt, LONG))."""
    want = target_greedy(PROMPTS, LONG)
    return {p: t[:NEW_TOKENS] for p, t in want.items()} | {(p, LONG): t for p, t in want.items()}


def client(cfg, **kwargs) -> Client:
    return Client(f"127.0.0.1:{cfg.server.grpc_port}", **kwargs)


def run_concurrently(fn, args_list, timeout_s=300):
    """fn(*args) on one thread each; returns results (or the exception raised) in order."""
    results = [None] * len(args_list)

    def work(i, args):
        try:
            results[i] = fn(*args)
        except Exception as e:  # collected and asserted on by the caller
            results[i] = e

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return results


def generate(cfg, prompt, **params):
    with client(cfg) as c:
        return c.generate(prompt, max_tokens=NEW_TOKENS, ignore_eos=True, **params)


def test_greedy_output_through_grpc_equals_the_targets_own(cluster, reference):
    replies = [generate(cluster, p) for p in PROMPTS]
    assert [r.token_ids for r in replies] == [reference[p] for p in PROMPTS]
    assert all(r.finish_reason == "length" for r in replies)
    assert sum(r.drafted for r in replies) > 0  # the drafters really took part
    assert {r.drafter_version for r in replies if r.drafted} == {"demo-v0"}
    assert all(r.prompt_token_ids for r in replies)


def test_text_streams_in_pieces_that_add_up_to_the_decoded_tokens(cluster):
    with client(cluster) as c:
        msgs = list(c.stream("def fibonacci(n):", max_tokens=NEW_TOKENS, ignore_eos=True))
    assert len(msgs) > 1 and msgs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert all(m.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    tokens = [t for m in msgs for t in m.token_ids]
    from specserve.actors.engine.build import load_tokenizer

    text = load_tokenizer(demo_path("target")).decode(tokens, skip_special_tokens=True)
    assert "".join(m.text for m in msgs) == text
    assert msgs[-1].stats.steps == len(msgs) or msgs[-1].stats.steps >= len(msgs) - 1


def test_32_concurrent_streams_complete_with_the_targets_output(cluster, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    replies = run_concurrently(lambda p: generate(cluster, p), [(p,) for p in prompts])
    errors = [r for r in replies if isinstance(r, Exception)]
    assert not errors
    assert [r.token_ids for r in replies] == [reference[p] for p in prompts]


@pytest.mark.parametrize("params, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"prompt_token_ids": [1, 2, 10**9]}, "prompt_token_ids"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_requests_get_invalid_argument_naming_the_field(cluster, params, field):
    params = {"prompt": "def f():", **params}
    prompt, ids = params.pop("prompt"), params.pop("prompt_token_ids", None)
    if ids is not None:
        prompt = None
    with client(cluster) as c, pytest.raises(grpc.RpcError) as err:
        c.generate(prompt, ids, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_both_prompt_and_token_ids_is_invalid_and_the_server_keeps_serving(cluster, reference):
    with client(cluster) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("def f():", [1, 2, 3])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert generate(cluster, PROMPTS[0]).token_ids == reference[PROMPTS[0]]


def test_a_full_queue_answers_resource_exhausted_and_loses_nothing_else(cluster, reference):
    """8 batch slots + 24 queue places: of 44 simultaneous long requests some must be refused."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(44)]
    replies = run_concurrently(lambda p: generate(cluster, p), [(p,) for p in prompts])
    refused = [r for r in replies if isinstance(r, grpc.RpcError)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert all("retry" in r.details() for r in refused)
    served = [(p, r) for p, r in zip(prompts, replies) if not isinstance(r, Exception)]
    assert len(served) + len(refused) == len(prompts) and len(served) >= 32
    assert all(r.token_ids == reference[p] for p, r in served)


def test_a_reflection_client_without_our_stubs_lists_and_calls_generate(cluster):
    from google.protobuf import descriptor_pool, message_factory

    with grpc.insecure_channel(f"127.0.0.1:{cluster.server.grpc_port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "specserve.v1.Generation" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)  # a separate pool: nothing from specserve.v1
        method = pool.FindServiceByName("specserve.v1.Generation").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_stream("/specserve.v1.Generation/Generate", request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
        responses = list(call(request_cls(prompt="def f():", max_tokens=5, ignore_eos=True), timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 5


def test_a_chat_request_streams_the_greedy_output_of_its_rendered_prompt(cluster):
    from specserve.actors.engine.build import load_tokenizer
    from specserve.actors.engine.chat import render_chat

    chat = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": PROMPTS[0]}]
    ids = render_chat(load_tokenizer(demo_path("target")), chat)
    with client(cluster) as c:
        by_chat = c.generate(messages=chat, max_tokens=NEW_TOKENS, ignore_eos=True)
        by_ids = c.generate(prompt_token_ids=ids, max_tokens=NEW_TOKENS, ignore_eos=True)
        with pytest.raises(grpc.RpcError) as err:
            c.generate(messages=chat, prompt="also text", max_tokens=2)
    assert by_chat.prompt_token_ids == ids and by_chat.token_ids == by_ids.token_ids
    assert len(by_chat.token_ids) == NEW_TOKENS
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in err.value.details()


def test_the_standard_health_check_reports_serving(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{cluster.server.grpc_port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_deadline_cancels_the_request_and_frees_its_slots(cluster):
    with client(cluster, timeout_s=0.3, retries=0) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("def f():", max_tokens=200, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    handle = serve.get_app_handle(APP_NAME)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        load = handle.load.remote().result()
        drafters = ray.get(serving.get_registry().list.remote())
        if load["running"] == 0 and load["waiting"] == 0 and all(d.load == 0 for d in drafters):
            break
        time.sleep(0.5)
    assert load["running"] == 0 and load["waiting"] == 0
    assert all(d.load == 0 for d in drafters)  # the drafter freed its KV slot too


def test_cli_generate_against_the_server_prints_the_json_shape(cluster, reference):
    out = subprocess.run(
        [sys.executable, "-m", "specserve.cluster.cli", "generate", PROMPTS[0], "--server",
         f"127.0.0.1:{cluster.server.grpc_port}", "--max-tokens", str(NEW_TOKENS), "--json"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["finish_reason"] in ("length", "stop")
    assert data["token_ids"] == reference[PROMPTS[0]][: len(data["token_ids"])]
    for key in ("prompt_token_ids", "text", "elapsed_s", "tokens_per_s", "drafted", "accepted",
                "acceptance_rate", "mean_accepted_length"):
        assert key in data


def drafter_actor_names() -> list[str]:
    return [r.actor_name for r in ray.get(serving.get_registry().list.remote())]


def test_a_drafter_replica_killed_mid_stream_changes_no_output(cluster, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    victims = drafter_actor_names()

    def kill_soon():
        time.sleep(0.5)
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with_long = lambda p: client(cluster).generate(p, max_tokens=LONG, ignore_eos=True)  # noqa: E731
    replies = run_concurrently(with_long, [(p,) for p in prompts])
    killer.join()
    assert not [r for r in replies if isinstance(r, Exception)]
    assert [r.token_ids for r in replies] == [reference[(p, LONG)] for p in prompts]
    serving.wait_running(120, recovering=True)  # Serve replaces the dead replica


def registry_size_becomes(n: int, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while len(ray.get(serving.get_registry().list.remote())) != n and time.monotonic() < end:
        time.sleep(0.5)
    return len(ray.get(serving.get_registry().list.remote())) == n


def test_scaling_drafters_up_and_down_under_load_fails_nothing(cluster, reference):
    stop = threading.Event()
    results: list = []

    def load():
        i = 0
        while not stop.is_set() and i < 200:
            p = PROMPTS[i % len(PROMPTS)]
            try:
                results.append((p, generate(cluster, p)))
            except Exception as e:  # asserted below
                results.append((p, e))
            i += 1

    verifier_before = serve.get_app_handle(APP_NAME).load.remote().result()["replica_id"]
    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        serving.scale_drafters(3, timeout_s=180)
        # a replica killed by an earlier test stays listed until its heartbeats time out
        assert registry_size_becomes(3, timeout_s=30)
        serving.scale_drafters(1, timeout_s=180)
    finally:
        stop.set()
        for w in workers:
            w.join(300)
    assert registry_size_becomes(1, timeout_s=30)
    assert results and not [r for _, r in results if isinstance(r, Exception)]
    assert all(r.token_ids == reference[p] for p, r in results)
    verifier = serve.status().applications[APP_NAME].deployments["Verifier"]
    assert verifier.replica_states == {"RUNNING": 1}
    assert serve.get_app_handle(APP_NAME).load.remote().result()["replica_id"] == verifier_before


def test_cli_status_shows_pools_drafters_and_live_acceptance(cluster):
    generate(cluster, PROMPTS[1])  # something for the acceptance figures
    out = subprocess.run(
        [sys.executable, "-m", "specserve.cluster.cli", "status", "--address", ray.get_runtime_context().gcs_address,
         "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info["pools"]) == {"Verifier", "Drafter"}
    assert info["pools"]["Verifier"]["replicas"] == {"RUNNING": 1}
    assert len(info["drafters"]) == sum(info["pools"]["Drafter"]["replicas"].values())
    assert all(d["address"].startswith("127.0.0.1:") and d["device"] == "cpu" for d in info["drafters"])
    assert info["verifier"]["drafted"] > 0 and 0 < info["verifier"]["acceptance_rate"] <= 1
