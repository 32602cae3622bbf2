"""The wire contract (protos/specserve/v1): generated code is fresh, messages round-trip,
every declaration is commented, and the services stream the way clients expect."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from specserve.v1 import drafting_pb2, generation_pb2

PROTOS = Path(__file__).resolve().parents[2] / "protos"
PROTO_FILES = sorted((PROTOS / "specserve" / "v1").glob("*.proto"))
# Lines that declare nothing, so need no comment of their own.
UNDECLARED = re.compile(r"^(//.*|}|syntax .*|package .*|import .*|option .*|)$")


def _load_generator():
    """protos/generate.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("protos_generate", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def uncommented_declarations(text: str) -> list[str]:
    """Declaration lines (message, enum, service, rpc, oneof, field, enum value) with no `//`
    comment line right above them. Anything not known to declare nothing counts, so a new
    kind of line cannot slip through."""
    lines = [line.strip() for line in text.splitlines()]
    missing = []
    for i, line in enumerate(lines):
        if not UNDECLARED.match(line) and (i == 0 or not lines[i - 1].startswith("//")):
            missing.append(line)
    return missing


def test_checked_in_generated_code_is_not_stale():
    assert _load_generator().stale_files() == []


def test_stale_check_notices_an_edited_generated_file(tmp_path, monkeypatch):
    generator = _load_generator()
    copy = tmp_path / "protos"
    (copy / "specserve" / "v1").mkdir(parents=True)
    for path in PROTO_FILES + generator.generated_files(PROTOS):
        (copy / path.relative_to(PROTOS)).write_bytes(path.read_bytes())
    (copy / "specserve" / "v1" / "generation_pb2.py").write_text("# edited by hand\n")
    monkeypatch.setattr(generator, "ROOT", copy)
    assert generator.stale_files() == ["specserve/v1/generation_pb2.py"]


def full_request() -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id="req-1", prompt="Once upon a time", prompt_token_ids=[1, 2, 3], max_tokens=64,
        temperature=0.7, top_k=50, top_p=0.9, seed=2**63 - 1, stop=["\n\n", "END"],
        stop_token_ids=[7, 2**32 - 1], ignore_eos=True,
        messages=[generation_pb2.ChatMessage(role="user", content="Write a haiku.")],
    )


def test_generate_request_round_trips_with_every_field_set():
    request = full_request()
    assert set(f.name for f, _ in request.ListFields()) == set(request.DESCRIPTOR.fields_by_name)
    back = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert back == request
    assert (back.top_p, back.seed, list(back.stop_token_ids)) == (0.9, 2**63 - 1, [7, 2**32 - 1])


def test_generate_request_tells_unset_from_zero():
    request = generation_pb2.GenerateRequest(prompt="hi", temperature=0.0, seed=0)
    back = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert back.HasField("temperature") and back.HasField("seed")
    assert not back.HasField("top_p") and not back.HasField("max_tokens")


def test_generate_response_round_trips_with_every_field_set():
    stats = generation_pb2.SpeculationStats(drafted=12, accepted=9, steps=4, drafter_version="ngram@3")
    response = generation_pb2.GenerateResponse(
        request_id="req-1", token_ids=[5, 6, 7], text=" there", finish_reason=generation_pb2.FINISH_REASON_STOP,
        stats=stats, prompt_token_ids=[1, 2],
    )
    assert set(f.name for f, _ in response.ListFields()) == set(response.DESCRIPTOR.fields_by_name)
    assert set(f.name for f, _ in stats.ListFields()) == set(stats.DESCRIPTOR.fields_by_name)
    back = generation_pb2.GenerateResponse.FromString(response.SerializeToString())
    assert back == response
    assert back.stats.drafter_version == "ngram@3" and back.finish_reason == generation_pb2.FINISH_REASON_STOP


def test_finish_reasons_match_the_engine():
    assert generation_pb2.FinishReason.keys() == [
        "FINISH_REASON_UNSPECIFIED", "FINISH_REASON_LENGTH", "FINISH_REASON_STOP",
        "FINISH_REASON_CANCELLED", "FINISH_REASON_ERROR",
    ]
    assert generation_pb2.FINISH_REASON_UNSPECIFIED == 0  # the proto3 default means "still running"


def test_drafting_messages_round_trip():
    draft = drafting_pb2.DrafterMessage(draft=drafting_pb2.Draft(
        sequence_id=3, tokens=[10, 11], weight_version="v2",
        q=[drafting_pb2.SparseDistribution(token_ids=[10, 4], probs=[0.75, 0.25]),
           drafting_pb2.SparseDistribution(token_ids=[11], probs=[1.0])],
    ))
    assert drafting_pb2.DrafterMessage.FromString(draft.SerializeToString()) == draft
    messages = [
        drafting_pb2.VerifierMessage(start=drafting_pb2.Start(
            sequence_id=3, prompt_token_ids=[1, 2], temperature=0.5, top_k=20, top_p=0.95, seed=9, k=4)),
        drafting_pb2.VerifierMessage(verdict=drafting_pb2.Verdict(sequence_id=3, accepted=1, next_token=12, k=3)),
        drafting_pb2.VerifierMessage(stop=drafting_pb2.Stop(sequence_id=3)),
    ]
    for message, kind in zip(messages, ["start", "verdict", "stop"]):
        back = drafting_pb2.VerifierMessage.FromString(message.SerializeToString())
        assert back == message and back.WhichOneof("message") == kind


@pytest.mark.parametrize("proto", PROTO_FILES, ids=lambda p: p.name)
def test_every_declaration_in_the_protos_has_a_comment(proto):
    assert uncommented_declarations(proto.read_text()) == []


def test_comment_check_catches_an_uncommented_field():
    text = (PROTOS / "specserve" / "v1" / "generation.proto").read_text()
    broken = text.replace("  bool ignore_eos = 11;\n", "  bool ignore_eos = 11;\n  uint32 n = 12;\n")
    assert broken != text and uncommented_declarations(text) == []
    assert uncommented_declarations(broken) == ["uint32 n = 12;"]
    assert uncommented_declarations("// service\nservice S {\n  rpc A(B) returns (C);\n}") == ["rpc A(B) returns (C);"]


def test_every_message_and_field_is_covered_by_the_comment_check():
    """The line check sees each descriptor element: a field it missed would go unchecked."""
    def declared(file) -> int:
        def in_message(m):
            return 1 + len(m.fields) + len([o for o in m.oneofs if not o.name.startswith("_")]) \
                + sum(in_message(n) for n in m.nested_types)
        return (sum(in_message(m) for m in file.message_types_by_name.values())
                + sum(1 + len(e.values) for e in file.enum_types_by_name.values())
                + sum(1 + len(s.methods) for s in file.services_by_name.values()))

    for module in (generation_pb2, drafting_pb2):
        text = (PROTOS / module.DESCRIPTOR.name).read_text()
        lines = [line.strip() for line in text.splitlines()]
        assert sum(1 for line in lines if not UNDECLARED.match(line)) == declared(module.DESCRIPTOR)


@pytest.mark.parametrize("module, service, method, client_streaming, server_streaming", [
    (generation_pb2, "Generation", "Generate", False, True),
    (drafting_pb2, "Drafting", "Draft", True, True),
])
def test_services_stream_as_specified(module, service, method, client_streaming, server_streaming):
    services = module.DESCRIPTOR.services_by_name
    assert list(services) == [service]
    assert list(services[service].methods_by_name) == [method]
    m = services[service].methods_by_name[method]
    assert (m.client_streaming, m.server_streaming) == (client_streaming, server_streaming)


def test_service_method_types():
    generate = generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name["Generate"]
    assert (generate.input_type.full_name, generate.output_type.full_name) == (
        "specserve.v1.GenerateRequest", "specserve.v1.GenerateResponse")
    draft = drafting_pb2.DESCRIPTOR.services_by_name["Drafting"].methods_by_name["Draft"]
    assert (draft.input_type.full_name, draft.output_type.full_name) == (
        "specserve.v1.VerifierMessage", "specserve.v1.DrafterMessage")
