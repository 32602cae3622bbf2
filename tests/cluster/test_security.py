"""TLS on the client port, bearer tokens on Generate, mutual TLS on the draft streams.

One cluster for the module (two verifier replicas sharing the client port), deployed with
every security option on: the client port needs a
client certificate of the client CA and a token; verifier and drafter talk over mutual TLS
with certificates of a second CA whose drafter certificate names no IP address (the verifier
checks `server_name`). Everything is real: certificates made here, Ray, Serve, gRPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from specserve.actors.security import TlsFiles, secure_channel
from specserve.cluster import serving
from specserve.cluster.client import Client
from specserve.v1 import drafting_pb2, drafting_pb2_grpc

from .certs import TestCA
from .ray_cluster import demo_config, local_cluster, target_greedy

pytestmark = pytest.mark.ray

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "def zebra_quartz_marker(path):"]
NEW_TOKENS = 16
LONG = 64
TOKEN = "s3cr3t-token-7f1c9a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    client_ca, internal_ca, stranger_ca = TestCA(root / "client"), TestCA(root / "internal", "internal CA"), \
        TestCA(root / "stranger", "stranger CA")
    tokens = root / "tokens.txt"
    tokens.write_text(f"# one token per line\n{TOKEN}\nsecond-token-2b8e\n")
    return {
        "client_ca": client_ca, "server": client_ca.issue("server"), "client": client_ca.issue("client"),
        "internal_ca": internal_ca, "internal": internal_ca.issue("drafter", dns=("specserve-drafter",), ips=()),
        "stranger_ca": stranger_ca, "stranger": stranger_ca.issue("stranger"), "tokens": tokens,
    }


@pytest.fixture(scope="module")
def cluster(pki):
    (server_cert, server_key), (internal_cert, internal_key) = pki["server"], pki["internal"]
    security = {
        "tls": {"cert_file": str(server_cert), "key_file": str(server_key),
                "client_ca_file": str(pki["client_ca"].ca_file)},
        "auth_token_file": str(pki["tokens"]),
        "internal_tls": {"ca_file": str(pki["internal_ca"].ca_file), "cert_file": str(internal_cert),
                         "key_file": str(internal_key), "server_name": "specserve-drafter"},
    }
    cfg = demo_config(security=security, server={"host": "127.0.0.1"}, drafter={"replicas": 1}, verifier={"replicas": 2},
                      speculation={"fixed_k": 4, "prompt_lookup": 0})
    with local_cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """The target's own greedy continuations: NEW_TOKENS by prompt, LONG by (prompt, LONG)."""
    want = target_greedy(PROMPTS, LONG)
    return {p: t[:NEW_TOKENS] for p, t in want.items()} | {(p, LONG): t for p, t in want.items()}


def address(cfg) -> str:
    return f"127.0.0.1:{cfg.server.grpc_port}"


def client_tls(pki, ca="client_ca", cert="client") -> TlsFiles:
    cert_file, key_file = pki[cert] if cert else (None, None)
    return TlsFiles(cert_file and str(cert_file), key_file and str(key_file), str(pki[ca].ca_file))


def test_a_client_with_certificate_and_token_gets_the_targets_output_drafted_over_mutual_tls(cluster, pki,
                                                                                              reference):
    with Client(address(cluster), tls=client_tls(pki), token=TOKEN) as c:
        replies = [c.generate(p, max_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]
    assert [r.token_ids for r in replies] == [reference[p] for p in PROMPTS]
    assert sum(r.drafted for r in replies) > 0  # drafts came over the mutual-TLS draft streams
    assert all(r.drafter_version for r in replies)


def test_the_client_port_speaks_no_plaintext(cluster):
    for _ in range(4):  # several connections: no plaintext listener shares the port
        with grpc.insecure_channel(address(cluster)) as ch:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("ca, cert", [("client_ca", None), ("client_ca", "stranger"), ("stranger_ca", "client")],
                         ids=["no-client-certificate", "client-certificate-of-another-ca", "untrusted-server"])
def test_a_handshake_without_trusted_certificates_on_both_sides_is_refused(cluster, pki, ca, cert):
    with Client(address(cluster), tls=client_tls(pki, ca, cert), token=TOKEN, retries=0) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPTS[0], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong-token")],
                                      [("authorization", f"Basic {TOKEN}")], [("authorization", "Bearer ")]],
                         ids=["none", "wrong", "wrong-scheme", "empty"])
def test_generate_without_a_valid_token_is_unauthenticated(cluster, pki, metadata):
    with Client(address(cluster), tls=client_tls(pki), metadata=metadata, retries=0) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPTS[0], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in (err.value.details() or "")


def test_every_listed_token_is_accepted_and_health_needs_none(cluster, pki, reference):
    with Client(address(cluster), tls=client_tls(pki), token="second-token-2b8e") as c:
        assert c.generate(PROMPTS[0], max_tokens=NEW_TOKENS, ignore_eos=True).token_ids == reference[PROMPTS[0]]
    with secure_channel(address(cluster), client_tls(pki)) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def draft_call(address_: str, tls: TlsFiles | None) -> list:
    """Open a Draft stream, send nothing, read to the end (the server ends it when we do)."""
    with secure_channel(address_, tls) as ch:
        return list(drafting_pb2_grpc.DraftingStub(ch).Draft(iter([]), timeout=10))


def test_draft_servers_accept_only_peers_with_the_internal_certificate(cluster, pki):
    [record] = ray.get(serving.get_registry().list.remote())
    assert record.address.startswith("127.0.0.1:")  # bound to the configured node address
    internal_cert, internal_key = pki["internal"]
    ca = str(pki["internal_ca"].ca_file)
    assert draft_call(record.address, TlsFiles(str(internal_cert), str(internal_key), ca, "specserve-drafter")) == []
    refused = [None, TlsFiles(ca_file=ca, server_name="specserve-drafter"),
               TlsFiles(*map(str, pki["client"]), ca, "specserve-drafter")]
    for tls in refused:  # plaintext, no client certificate, a certificate of another CA
        with pytest.raises(grpc.RpcError) as err:
            draft_call(record.address, tls)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_generate_with_tls_and_a_token_file_and_without_the_token(cluster, pki, reference):
    (cert, key), ca = pki["client"], pki["client_ca"].ca_file
    token_file = pki["tokens"].parent / "my-token"
    token_file.write_text(TOKEN + "\n")
    base = [sys.executable, "-m", "specserve.cluster.cli", "generate", PROMPTS[1], "--server", address(cluster),
            "--max-tokens", str(NEW_TOKENS), "--json", "--tls-ca", str(ca), "--tls-cert", str(cert),
            "--tls-key", str(key)]
    env = {k: v for k, v in os.environ.items() if k != "SPECSERVE_TOKEN"}
    ok = subprocess.run(base + ["--token-file", str(token_file)], capture_output=True, text=True, timeout=120,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["token_ids"] == reference[PROMPTS[1]][: len(json.loads(ok.stdout)["token_ids"])]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_secrets_and_prompts_stay_out_of_logs_and_the_deployed_config(cluster, pki):
    with Client(address(cluster), tls=client_tls(pki), token=TOKEN) as c:
        c.generate(PROMPTS[2], max_tokens=4)
    with Client(address(cluster), tls=client_tls(pki), token="not-a-valid-token-91d3", retries=0) as c:
        with pytest.raises(grpc.RpcError):
            c.generate(PROMPTS[2], max_tokens=4)
    key_pem = pki["server"][1].read_text().splitlines()[1]  # a line of the private key's body
    secrets = [TOKEN, "not-a-valid-token-91d3", key_pem, "zebra_quartz_marker"]
    from ray.serve.context import _get_global_client

    deployed = json.dumps(_get_global_client().get_serve_details(), default=str)
    assert str(pki["tokens"]) in deployed  # the config names the file ...
    assert not [s for s in secrets if s in deployed]  # ... never its contents
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs
    leaked = {str(p): s for p in logs for s in secrets if s in p.read_text(errors="replace")}
    assert not leaked
    assert serve.status().applications["specserve"].status == "RUNNING"


def test_scaling_verifiers_down_lets_running_streams_finish_and_new_calls_go_elsewhere(cluster, pki, reference):
    """Runs last: a verifier replica stops while streams run on both and new calls keep coming."""
    results, errors = [], []

    def call(prompt, max_tokens):
        try:  # a client (connection) of its own: the kernel spreads connections over both replicas
            with Client(address(cluster), tls=client_tls(pki), token=TOKEN, timeout_s=180) as c:
                results.append((prompt, max_tokens, c.generate(prompt, max_tokens=max_tokens, ignore_eos=True)))
        except Exception as e:  # collected and asserted on below
            errors.append(e)

    running = [threading.Thread(target=call, args=(PROMPTS[i % len(PROMPTS)], LONG)) for i in range(10)]
    for t in running:
        t.start()
    time.sleep(1.0)
    stopping = threading.Thread(target=serving.deploy, args=(cluster.model_copy(
        update={"verifier": cluster.verifier.model_copy(update={"replicas": 1})}),))
    stopping.start()
    late = []
    for i in range(15):  # new calls while one replica drains (bounded)
        late.append(threading.Thread(target=call, args=(PROMPTS[i % len(PROMPTS)], NEW_TOKENS)))
        late[-1].start()
        time.sleep(0.4)
    for t in running + late + [stopping]:
        t.join(240)
    assert not errors
    assert len(results) == 25
    for prompt, n, reply in results:
        assert reply.token_ids == (reference[(prompt, LONG)] if n == LONG else reference[prompt])
    end = time.monotonic() + 120
    while serve.status().applications["specserve"].deployments["Verifier"].replica_states != {"RUNNING": 1}:
        assert time.monotonic() < end, serve.status().applications["specserve"].deployments["Verifier"]
        time.sleep(1)
