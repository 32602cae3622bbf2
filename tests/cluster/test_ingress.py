"""A generic gRPC client, with no Ray-specific metadata, through Serve's proxy as `specserve
serve` starts it: while the application deploys, and with another Serve application beside it.

One cluster for the module: Serve's proxies are started first and called before anything is
deployed (what a client sees during startup); then two applications share the cluster, the
specserve application (model drafter, fixed draft length) and `plain` (no drafter), so that a
call Serve's proxy would route by itself (exactly one application) is not what is tested.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from specserve.cluster.config import APP_NAME
from specserve.cluster.grpc_ingress import APPLICATION_KEY

from .ray_cluster import demo_config, local_cluster, target_greedy

pytestmark = pytest.mark.ray

PROMPT = "def fibonacci(n):"
NEW_TOKENS = 16
BEFORE_DEPLOY: dict = {}  # what a plain client got from the proxy before any application existed


def _plain_calls(port: int) -> dict:
    """A Generate and a health check with no metadata: (code, details) or the health status."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        except grpc.RpcError as e:
            health = e.code()
        try:
            list(reflected_generate(ch, prompt=PROMPT, max_tokens=2))
            generate = (grpc.StatusCode.OK, "")
        except grpc.RpcError as e:
            generate = (e.code(), e.details())
    return {"health": health, "generate": generate}


@pytest.fixture(scope="module")
def cluster():
    cfg = demo_config(speculation={"fixed_k": 3, "prompt_lookup": 0}, drafter={"replicas": 1})
    plain = demo_config(models={"dtype": "float64", "drafter": "none"})
    apps = [cfg.application(), plain.application("plain", "/plain")]

    def before_deploy():
        BEFORE_DEPLOY.update(_plain_calls(cfg.server.grpc_port))

    with local_cluster(cfg, applications=apps, before_deploy=before_deploy) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return target_greedy([PROMPT], NEW_TOKENS)[PROMPT]


def reflected_generate(ch: grpc.Channel, metadata=None, **fields):
    """Generate through message classes built from the server's reflection alone (nothing of
    specserve.v1 imported), as grpcurl or any language's generic client does."""
    db = ProtoReflectionDescriptorDatabase(ch)
    assert "specserve.v1.Generation" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("specserve.v1.Generation").FindMethodByName("Generate")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = ch.unary_stream("/specserve.v1.Generation/Generate", request_serializer=request_cls.SerializeToString,
                           response_deserializer=response_cls.FromString)
    return call(request_cls(**fields), timeout=120, metadata=metadata)


def _generate(cluster, metadata=None) -> tuple[list[int], str]:
    """(token ids, drafter version of the last response) of the test prompt."""
    with grpc.insecure_channel(f"127.0.0.1:{cluster.server.grpc_port}") as ch:
        responses = list(reflected_generate(ch, metadata, prompt=PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True))
    return [t for r in responses for t in r.token_ids], responses[-1].stats.drafter_version


def test_a_plain_call_before_the_application_is_deployed_is_unavailable_naming_the_metadata(cluster):
    code, details = BEFORE_DEPLOY["generate"]
    assert code == grpc.StatusCode.UNAVAILABLE, details  # retryable: the client waits for the deploy
    assert f"'{APPLICATION_KEY}' metadata key" in details
    assert BEFORE_DEPLOY["health"] == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_reflection_client_without_metadata_streams_the_targets_greedy_output(cluster, reference):
    tokens, version = _generate(cluster)
    assert tokens == reference
    assert version == "demo-v0"  # the specserve application (drafting), not `plain`


def test_the_application_metadata_still_picks_the_application(cluster, reference):
    assert _generate(cluster, [(APPLICATION_KEY, "plain")]) == (reference, "")
    assert _generate(cluster, [(APPLICATION_KEY, APP_NAME)]) == (reference, "demo-v0")
    with pytest.raises(grpc.RpcError) as err:
        _generate(cluster, [(APPLICATION_KEY, "no-such-app")])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-app" in err.value.details()


def test_health_check_and_reflection_answer_without_metadata(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{cluster.server.grpc_port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {"specserve.v1.Generation", "grpc.health.v1.Health"} <= set(services)


def test_a_generic_client_from_the_registry_calls_generate_with_json_fields(cluster, reference):
    from grpc_requests import Client as ReflectionClient

    client = ReflectionClient.get_by_endpoint(f"127.0.0.1:{cluster.server.grpc_port}")
    generation = client.service("specserve.v1.Generation")
    responses = list(generation.Generate({"prompt": PROMPT, "max_tokens": NEW_TOKENS, "ignore_eos": True}))
    assert [t for r in responses for t in r.get("token_ids", [])] == reference
    assert client.request("grpc.health.v1.Health", "Check", {}) == {"status": "SERVING"}
