"""Protobuf <-> engine objects. Protobuf stops here: the engine sees tensors and dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch
from google.protobuf.message import DecodeError

from specserve.actors.engine.chat import render_chat
from specserve.actors.engine.drafters import Draft
from specserve.actors.engine.request import InvalidRequestError, SamplingParams, SpecStats, make_params
from specserve.v1 import drafting_pb2, generation_pb2

FINISH_REASONS = {
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "stop": generation_pb2.FINISH_REASON_STOP,
    "cancelled": generation_pb2.FINISH_REASON_CANCELLED,
    "error": generation_pb2.FINISH_REASON_ERROR,
}
FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}
MAX_PROMPT_CHARS = 1_000_000  # longer text is refused before tokenizing (the token limit decides the rest)
MAX_REQUEST_ID_CHARS = 256  # every response echoes it: a long one would multiply the reply's size


# -- Generation (client-facing) --------------------------------------------------------------------

@dataclass(frozen=True)
class UndecodableRequest:
    """Request bytes that are not a GenerateRequest; `prompt_from_pb` refuses it naming `field`.

    gRPC answers a request its deserializer cannot parse with UNKNOWN before any of our code
    runs, so the Generation service is registered with `request_from_bytes`, which hands this
    on instead and the call fails like any other bad field: INVALID_ARGUMENT.
    """

    field: str
    reason: str
    request_id: str = ""  # read by the handler before validation, like a GenerateRequest's


def request_from_bytes(data: bytes) -> generation_pb2.GenerateRequest | UndecodableRequest:
    """The request deserializer of the Generation service (see UndecodableRequest)."""
    try:
        return generation_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return UndecodableRequest(*_wire_problem(data))


def add_generation_servicer(servicer, server) -> None:
    """`generation_pb2_grpc.add_GenerationServicer_to_server` with `request_from_bytes`."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=request_from_bytes,
        response_serializer=generation_pb2.GenerateResponse.SerializeToString)}
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _wire_problem(data: bytes) -> tuple[str, str]:
    """(field, reason) for bytes that do not parse: a string field that is not UTF-8, by
    name, else the message's wire format as a whole ("request")."""
    fields = generation_pb2.GenerateRequest.DESCRIPTOR.fields_by_number
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            start = pos
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, start = _varint(data, pos)
                pos = start + size
            else:  # groups (3, 4) are not proto3; 6 and 7 do not exist
                raise ValueError(wire_type)
            if number == 0 or pos > len(data):
                raise ValueError(number)
            field = fields.get(number)
            if wire_type == 2 and field is not None and field.type == field.TYPE_STRING:
                try:
                    data[start:pos].decode("utf-8")
                except UnicodeDecodeError:
                    return field.name, "not valid UTF-8"
    except (ValueError, IndexError):
        pass
    return "request", "not a valid specserve.v1.GenerateRequest (wire format corrupt)"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The base-128 varint at data[pos:] and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError: truncated
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def params_from_pb(req: generation_pb2.GenerateRequest) -> SamplingParams:
    """SamplingParams of a request; InvalidRequestError names the bad field."""
    kwargs: dict = {"top_k": req.top_k, "stop": list(req.stop), "stop_token_ids": list(req.stop_token_ids),
                    "ignore_eos": req.ignore_eos}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if req.HasField(name):
            kwargs[name] = getattr(req, name)
    return make_params(**kwargs)


def prompt_from_pb(req: generation_pb2.GenerateRequest | UndecodableRequest, tokenizer) -> list[int]:
    """Prompt token ids: the given ids, the tokenized text or the rendered chat (exactly one).

    Checks the request as a whole first (it parsed; its request_id is not too long), since the
    handler calls this before anything else.
    """
    if isinstance(req, UndecodableRequest):
        raise InvalidRequestError(req.field, req.reason)
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    if (bool(req.prompt) + bool(req.prompt_token_ids) + bool(req.messages)) != 1:
        raise InvalidRequestError("prompt", "set exactly one of prompt, prompt_token_ids and messages")
    if req.prompt_token_ids:
        return list(req.prompt_token_ids)
    if req.messages:
        return render_chat(tokenizer, [{"role": m.role, "content": m.content} for m in req.messages])
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    if tokenizer is None:
        raise InvalidRequestError("prompt", "this model has no tokenizer; send prompt_token_ids")
    return tokenizer.encode(req.prompt, add_special_tokens=False)


def response_pb(request_id: str, token_ids: list[int], text: str, finish_reason: str | None,
                stats: SpecStats, drafter_version: str) -> generation_pb2.GenerateResponse:
    """One streamed chunk."""
    return generation_pb2.GenerateResponse(
        request_id=request_id, token_ids=token_ids, text=text,
        finish_reason=FINISH_REASONS.get(finish_reason or "", generation_pb2.FINISH_REASON_UNSPECIFIED),
        stats=generation_pb2.SpeculationStats(drafted=stats.drafted, accepted=stats.accepted, steps=stats.steps,
                                              drafter_version=drafter_version),
    )


# -- Drafting (internal) ---------------------------------------------------------------------------

def start_pb(sequence_id: int, context: list[int], params: SamplingParams, seed: int, k: int, nodes: int = 0,
             push: bool = False, push_outcomes: int = 1):
    """The Start message of a sequence whose drafter context is `context`."""
    start = drafting_pb2.Start(sequence_id=sequence_id, prompt_token_ids=context, temperature=params.temperature,
                               top_k=params.top_k, top_p=params.top_p, seed=seed, k=k, tree_nodes=nodes, push=push,
                               push_outcomes=push_outcomes if push else 0)
    return drafting_pb2.VerifierMessage(start=start)


def verdict_pb(sequence_id: int, accepted: int, next_token: int, k: int, path: list[int] | None = None,
               nodes: int = 0, then_tokens: list[int] | None = None, taken: list[int] | None = None):
    return drafting_pb2.VerifierMessage(verdict=drafting_pb2.Verdict(
        sequence_id=sequence_id, accepted=accepted, next_token=next_token, k=k, path=path or [], tree_nodes=nodes,
        then_tokens=then_tokens or [], taken=taken or []))


def speculation_to_pb(sequence_id: int, context_length: int, last_token: int, draft: Draft,
                      version: str, seconds: float) -> drafting_pb2.DrafterMessage:
    """A Speculation message: `draft` for the state of `context_length` tokens ending in `last_token`."""
    pb = draft_to_pb(sequence_id, draft, version, seconds).draft
    return drafting_pb2.DrafterMessage(speculation=drafting_pb2.Speculation(
        sequence_id=sequence_id, context_length=context_length, last_token=last_token, draft=pb))


def stop_pb(sequence_id: int):
    return drafting_pb2.VerifierMessage(stop=drafting_pb2.Stop(sequence_id=sequence_id))


def start_params(start: drafting_pb2.Start) -> SamplingParams:
    """The sampling parameters a drafter needs (it never decides when to stop)."""
    top_p = start.top_p if start.HasField("top_p") else 1.0
    seed = start.seed if start.HasField("seed") else None
    return SamplingParams(temperature=start.temperature, top_k=start.top_k, top_p=top_p, seed=seed,
                          max_tokens=1_000_000)


def draft_to_pb(sequence_id: int, draft: Draft, version: str, seconds: float) -> drafting_pb2.DrafterMessage:
    """A Draft message; q rows are sent without their zero-probability padding."""
    pb = drafting_pb2.Draft(sequence_id=sequence_id, tokens=draft.tokens, weight_version=version,
                            draft_seconds=seconds, forward_passes=draft.forwards, parents=draft.parents or [])
    if draft.q_ids is not None and draft.tokens:
        for ids, probs in zip(draft.q_ids.tolist(), draft.q_probs.tolist()):
            keep = [(i, p) for i, p in zip(ids, probs) if p > 0]
            pb.q.add(token_ids=[i for i, _ in keep], probs=[p for _, p in keep])
    return drafting_pb2.DrafterMessage(draft=pb)


def draft_from_pb(pb: drafting_pb2.Draft, requested: int, vocab_size: int, sampled: bool, nodes: int = 0) -> Draft:
    """An engine Draft from the wire, checked so a broken drafter cannot break verification.

    Rows of q are padded to the longest with probability-zero entries (harmless to
    sparse_to_dense). Tokens past what was asked for (k for a chain, `nodes` for a tree) are cut
    off. A draft with out-of-vocabulary tokens, a tree nobody asked for or whose parents do not
    come before their children, or a q that does not match its tokens (or is missing when
    `sampled`) is dropped (empty draft).
    """
    is_tree = len(pb.parents) > 0
    tokens = list(pb.tokens)[: max(requested, nodes) if is_tree else requested]
    parents = list(pb.parents)[: len(tokens)] if is_tree else None
    broken_tree = is_tree and (nodes <= 0 or len(parents) != len(tokens)
                               or any(not -1 <= par < i for i, par in enumerate(parents)))
    if broken_tree or any(t >= vocab_size for t in tokens) or (sampled and tokens and len(pb.q) < len(tokens)):
        return Draft([], requested=requested, seconds=pb.draft_seconds)
    draft = Draft(tokens, forwards=pb.forward_passes, requested=requested, seconds=pb.draft_seconds, parents=parents)
    if pb.q and tokens:
        rows = list(pb.q)[: len(tokens)]
        if len(rows) != len(tokens) or any(len(r.token_ids) != len(r.probs) or not r.token_ids for r in rows):
            return Draft([], requested=requested)
        m = max(len(r.token_ids) for r in rows)
        ids = torch.zeros(len(rows), m, dtype=torch.long)
        probs = torch.zeros(len(rows), m, dtype=torch.float32)
        for i, r in enumerate(rows):
            ids[i, : len(r.token_ids)] = torch.tensor(list(r.token_ids), dtype=torch.long)
            probs[i, : len(r.probs)] = torch.tensor(list(r.probs), dtype=torch.float32)
        if bool((ids >= vocab_size).any()):
            return Draft([], requested=requested)
        draft.q_ids, draft.q_probs = ids, probs
    return draft
