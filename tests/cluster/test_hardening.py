"""Hardening of the client-facing service: fuzzed bad input and overload.

The cluster tests share one small deployment (4 batch slots and 4 queue places, one drafter;
float64, so outputs compare token for token with the target decoding alone in this process).
The fuzz campaign runs SPECSERVE_FUZZ_EXAMPLES examples (default 300, seed 0, no example
database: the same calls every run); set it (e.g. 10000) for a long campaign, which also
writes its summary to runs/fuzz.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
from ray import serve
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoConfig

from specserve.actors.convert import UndecodableRequest, prompt_from_pb, request_from_bytes
from specserve.actors.demo import demo_path
from specserve.actors.engine.request import InvalidRequestError, make_params
from specserve.actors.errors import OverloadedError, retry_metadata, status_for
from specserve.cluster.bench_overload import drive
from specserve.cluster.client import Client
from specserve.cluster.config import APP_NAME
from specserve.v1 import generation_pb2

from .fuzzing import run_campaign
from .ray_cluster import demo_config, local_cluster, target_greedy

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef walk(path):",
           "    for key, value in items:\n", "return self._cache[", "# Compute the checksum\n"]
NEW_TOKENS = 16
EXAMPLES = int(os.environ.get("SPECSERVE_FUZZ_EXAMPLES", "300"))
RUNS = Path(__file__).resolve().parents[2] / "runs"


@pytest.fixture(scope="module")
def cluster():
    cfg = demo_config(verifier={"max_num_seqs": 4, "max_queue": 4}, drafter={"replicas": 1})
    with local_cluster(cfg, num_cpus=3) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def reference():
    return target_greedy(PROMPTS, NEW_TOKENS)


def address(cfg) -> str:
    return f"127.0.0.1:{cfg.server.grpc_port}"


def assert_serves_as_before(cfg, reference):
    with grpc.insecure_channel(address(cfg)) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with Client(address(cfg), timeout_s=120) as c:
        for p in PROMPTS:
            assert c.generate(p, max_tokens=NEW_TOKENS, ignore_eos=True).token_ids == reference[p]


# -- without a cluster -----------------------------------------------------------------------------

@pytest.mark.parametrize("data, field", [
    (b"\x12\x02\xff\xfe", "prompt"),  # field 2 (prompt) is not UTF-8
    (b"\x0a\x01\x80\x12\x01x", "request_id"),
    (generation_pb2.GenerateRequest(prompt="x").SerializeToString() + b"\x4a\x02\xed\xa0", "stop"),
    (b"\xff\xff\xff", "request"),  # no message at all
    (generation_pb2.GenerateRequest(prompt="hello").SerializeToString()[:-2], "request"),  # truncated
])
def test_bytes_that_do_not_parse_become_a_request_refused_naming_the_field(data, field):
    req = request_from_bytes(data)
    assert isinstance(req, UndecodableRequest) and req.field == field
    with pytest.raises(InvalidRequestError) as err:
        prompt_from_pb(req, tokenizer=None)
    assert status_for(err.value)[0] == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == field


def test_unknown_fields_are_ignored_as_proto3_says():
    data = generation_pb2.GenerateRequest(prompt="x", max_tokens=2).SerializeToString() + b"\xa0\x06\x01"
    req = request_from_bytes(data)
    assert isinstance(req, generation_pb2.GenerateRequest) and (req.prompt, req.max_tokens) == ("x", 2)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": 1e-38}, "temperature"),  # would overflow float32 logits / temperature: p of NaNs
    ({"temperature": 5e-324}, "temperature"),
    ({"stop": ["\n"] * 17}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
])
def test_parameters_that_would_break_or_stall_decoding_are_refused(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        make_params(**kwargs)
    assert err.value.field == field
    make_params(temperature=1e-6, stop=["x" * 256] * 16)  # the limits themselves are fine


def test_an_overload_carries_its_retry_hint_in_the_details_and_as_trailing_metadata():
    exc = OverloadedError("8 requests running and 8 queued", retry_after_s=1.5)
    code, details = status_for(exc)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.endswith("(retry after 1.5 s)")
    assert retry_metadata(exc) == (("retry-after-ms", "1500"),)
    assert retry_metadata(ValueError()) == ()


# -- against a cluster -----------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_fuzzed_requests_get_ok_or_a_documented_status_and_the_server_stays_healthy(cluster, reference):
    vocab = AutoConfig.from_pretrained(demo_path("target")).vocab_size
    report = run_campaign(address(cluster), EXAMPLES, vocab, rng_seed=0, max_seconds=max(300.0, EXAMPLES * 0.6))
    print("\n" + report.table())
    if "SPECSERVE_FUZZ_EXAMPLES" in os.environ:
        RUNS.mkdir(exist_ok=True)
        (RUNS / "fuzz.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    assert not report.failures, json.dumps(report.failures[:5], indent=2)
    assert report.examples >= min(EXAMPLES, 100)
    assert report.counts["OK"] and report.counts["INVALID_ARGUMENT"]  # both sides of the contract were reached
    assert_serves_as_before(cluster, reference)


@pytest.mark.ray
@pytest.mark.slow
def test_overload_refuses_the_excess_with_a_retry_hint_and_serves_the_rest_identically(cluster, reference):
    """24 clients on a capacity of 8 (4 slots + 4 queue places) for 12 s."""
    totals = drive(address(cluster), clients=24, duration_s=12, max_tokens=NEW_TOKENS, deadline_s=60,
                   reference=reference, max_requests_per_client=500)
    assert set(totals.codes) == {"OK", "RESOURCE_EXHAUSTED"}, totals.other_errors
    assert set(totals.retry_hints_ms) == {1000}  # every refusal: "(retry after 1 s)" or retry-after-ms: 1000
    assert totals.codes["OK"] >= 8 and totals.mismatched == 0
    assert_serves_as_before(cluster, reference)



@pytest.mark.ray
def test_the_default_config_drafts_by_prompt_lookup_in_the_verifier_and_serves_identically(cluster, reference):
    # this module's cluster runs the default speculation settings: the verifier's own lookup drafts
    assert_serves_as_before(cluster, reference)
    load = serve.get_app_handle(APP_NAME).load.remote().result(timeout_s=60)
    assert load["lookup_drafts"] > 0
