"""Property-based fuzzing of `specserve.v1.Generation/Generate` against a running server.

Hypothesis builds the calls:

- structured requests, every field at and past its limits: NaN, infinite, negative, subnormal
  and huge parameters, empty, long and oversized prompts, token ids outside the vocabulary,
  many, empty and over-long stop strings, seeds up to 2^64 - 1, odd and over-long request ids;
- raw bytes sent as the request message (identity serializers, so nothing is checked on the
  way out): arbitrary byte strings, valid requests with unknown fields appended, with invalid
  UTF-8 inside a string field (request_id, prompt, stop), truncated, with negative varints,
  with a flipped bit;

and sends each in one of four ways: read to the end, cancel after the first response, a tiny
deadline, or close the whole channel after the first response (an abrupt disconnect).

A call passes when it ends with a status its way of sending allows (ALLOWED: OK,
INVALID_ARGUMENT naming a field, RESOURCE_EXHAUSTED, and CANCELLED / DEADLINE_EXCEEDED where
the client caused them); INTERNAL, UNKNOWN or anything else fails it. So does a request the
contract calls invalid that was served anyway (`contract_violations`), and an OK stream that
does not end with a finish reason, echoes another request id or exceeds max_tokens.
`run_campaign` runs N examples against an address, sequentially, and counts the outcomes.
"""

from __future__ import annotations

import collections
import math
import operator
import time
from dataclasses import dataclass, field

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from specserve.actors.convert import MAX_PROMPT_CHARS, MAX_REQUEST_ID_CHARS
from specserve.actors.engine.chat import MAX_MESSAGES
from specserve.actors.engine.request import MAX_STOP_CHARS, MAX_STOP_STRINGS, MIN_TEMPERATURE
from specserve.cluster.reporting import text_table
from specserve.v1 import generation_pb2

U32, U64 = 2**32 - 1, 2**64 - 1
DEFAULT_MAX_TOKENS = 128
METHOD = "/specserve.v1.Generation/Generate"
FIELDS = set(generation_pb2.GenerateRequest.DESCRIPTOR.fields_by_name) | {"request"}
CLIENT_CAUSED = {"read": set(), "cancel": {"CANCELLED"}, "deadline": {"DEADLINE_EXCEEDED"},
                 "disconnect": {"CANCELLED"}}
ALLOWED = {action: {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} | extra for action, extra in CLIENT_CAUSED.items()}
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n", "return self._cache[",
           "# Compute the checksum\n", "x = ", "\n"]
BAD_UTF8 = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xfe", b"\xe2\x82", b"\x80abc"]


# -- strategies ------------------------------------------------------------------------------------

def weighted(*options: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn about `weight` times as often as a weight-1 one
    (Hypothesis leans towards the first options, as it does towards small values)."""
    return st.sampled_from([s for weight, s in options for _ in range(weight)]).flatmap(lambda s: s)


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # proto3 strings are UTF-8: no lone surrogates
WILD = st.floats(allow_nan=True, allow_infinity=True)
EDGES = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e-300, 1e-38, -1.0, 1e308]


def hostile_doubles(*special: float) -> st.SearchStrategy:
    return weighted((1, WILD), (2, st.sampled_from(EDGES + list(special))))


def repeated(pieces: list, counts: list[int]) -> st.SearchStrategy:
    return st.builds(operator.mul, st.sampled_from(pieces), st.sampled_from(counts))


def out_of_vocab(vocab: int) -> st.SearchStrategy:
    return weighted((2, st.sampled_from([vocab, vocab + 1, U32])), (1, st.integers(vocab, U32)))


def valid_fields(vocab: int) -> dict[str, st.SearchStrategy]:
    """Each field within the contract (the prompt as text or as ids: "prompt" sets both)."""
    prompt = weighted((3, st.sampled_from(PROMPTS)), (2, TEXT.filter(bool)),
                      (1, repeated(["a", "é", "\U0001F600", "def f(x):\n    return x\n", "\x00"], [8, 40])))
    ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40)
    chat = st.lists(st.builds(generation_pb2.ChatMessage, role=st.sampled_from(["system", "user", "assistant"]),
                              content=prompt), min_size=1, max_size=4)
    return {
        "prompt": weighted((3, prompt.map(lambda t: {"prompt": t, "prompt_token_ids": []})),
                           (2, ids.map(lambda i: {"prompt": "", "prompt_token_ids": i})),
                           (1, chat.map(lambda m: {"prompt": "", "prompt_token_ids": [], "messages": m}))),
        # OK calls stay quick: a few tokens, the default of 128 rarely
        "max_tokens": weighted((12, st.integers(1, 4)), (1, st.none())),
        "temperature": weighted((3, st.none()), (2, st.just(0.0)), (3, st.floats(MIN_TEMPERATURE, 2.0)),
                                (1, st.sampled_from([MIN_TEMPERATURE, 100.0]))),
        "top_k": weighted((3, st.just(0)), (2, st.integers(0, 50)), (1, st.integers(0, U32))),
        "top_p": weighted((2, st.none()), (2, st.floats(0.0, 1.0, exclude_min=True)),
                          (1, st.sampled_from([1.0, 5e-324]))),
        "seed": weighted((2, st.none()), (2, st.integers(0, 2**63 - 1)), (1, st.sampled_from([0, 2**63 - 1]))),
        "stop": weighted((4, st.just([])), (3, st.lists(TEXT.filter(bool), max_size=4)),
                         (1, st.sampled_from([["x" * MAX_STOP_CHARS], ["\n"] * MAX_STOP_STRINGS]))),
        "stop_token_ids": weighted((4, st.just([])), (2, st.lists(st.integers(0, vocab - 1), max_size=4))),
        "ignore_eos": st.booleans(),
        "request_id": weighted((3, st.just("")), (2, TEXT), (1, st.just("r" * MAX_REQUEST_ID_CHARS))),
    }


def hostile_fields(vocab: int) -> dict[str, st.SearchStrategy]:
    """Values of each field at its limits and past them (mostly outside the contract)."""
    def text(t: str) -> dict:
        return {"prompt": t, "prompt_token_ids": []}

    def ids(i: list[int]) -> dict:
        return {"prompt": "", "prompt_token_ids": i}

    prompt = weighted(
        (2, st.just(ids([]))),  # neither
        (2, st.builds(lambda t, i: {"prompt": t, "prompt_token_ids": i}, st.sampled_from(PROMPTS),
                      st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4))),  # both
        (3, st.lists(out_of_vocab(vocab), min_size=1, max_size=4).map(ids)),
        (2, repeated([[1], [vocab - 1]], [200, 247, 248, 100_000]).map(ids)),
        (2, repeated(["a", "é", "\U0001F600", "def f(x):\n    return x\n"], [300, 5_000, 60_000]).map(text)),
        (1, repeated(["a", "é"], [MAX_PROMPT_CHARS, MAX_PROMPT_CHARS + 1]).map(text)),
        (1, st.builds(lambda t: {"prompt": t, "prompt_token_ids": [],  # a prompt and a chat
                                 "messages": [generation_pb2.ChatMessage(role="user", content=t)]},
                      st.sampled_from(PROMPTS))),
        (1, st.sampled_from(["", "user"]).map(lambda role: {  # an empty role; more messages than allowed
            "prompt": "", "prompt_token_ids": [],
            "messages": [generation_pb2.ChatMessage(role=role, content="x")] * (1 if not role else MAX_MESSAGES + 1)})))
    return {
        "prompt": prompt,
        "max_tokens": weighted((2, st.sampled_from([0, 240, 247, 248, 1_000_000, 1_000_001, U32])),
                               (1, st.integers(0, U32))),
        "temperature": hostile_doubles(100.00000000000001, MIN_TEMPERATURE / 2),
        "top_p": hostile_doubles(1.0000000000000002, 0.0),
        "seed": st.integers(2**63, U64),
        "stop": weighted((2, st.lists(TEXT, max_size=4).map(lambda s: s + [""])),
                         (1, st.builds(lambda t, n: [t] * n, TEXT, st.sampled_from([MAX_STOP_STRINGS + 1, 1000]))),
                         (1, st.sampled_from([["x" * (MAX_STOP_CHARS + 1)], ["y" * 100_000]]))),
        "stop_token_ids": st.lists(out_of_vocab(vocab), min_size=1, max_size=4),
        "request_id": st.sampled_from(["r" * (MAX_REQUEST_ID_CHARS + 1), "\x00" * 10_000, "é" * 300]),
    }


@st.composite
def requests(draw, vocab: int) -> generation_pb2.GenerateRequest:
    """A valid GenerateRequest with none, one or two fields replaced by hostile values."""
    fields = {name: draw(s) for name, s in valid_fields(vocab).items()}
    hostile = hostile_fields(vocab)
    count = draw(weighted((3, st.just(0)), (3, st.just(1)), (1, st.just(2))))
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), min_size=count, max_size=count, unique=True)):
        fields[name] = draw(hostile[name])
    prompt = fields.pop("prompt")
    return generation_pb2.GenerateRequest(**prompt, **{k: v for k, v in fields.items() if v is not None})


def _varint(n: int) -> bytes:
    n &= U64  # negative numbers as protobuf writes them: ten bytes of two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 2:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def unknown_fields() -> st.SearchStrategy:
    return st.one_of(
        st.builds(lambda n, v: _field(n, 0, _varint(v)), st.integers(12, 2**29 - 1), st.integers(0, U64)),
        st.builds(lambda n, b: _field(n, 2, b), st.integers(12, 2**29 - 1), st.binary(max_size=16)),
        st.builds(lambda n, b: _field(n, 1, b), st.integers(12, 2**29 - 1), st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, b: _field(n, 5, b), st.integers(12, 2**29 - 1), st.binary(min_size=4, max_size=4)))


def _flip(data: bytes, at: int, bit: int) -> bytes:
    if not data:
        return b"\x80"
    i = at % len(data)
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


def raw_bytes(vocab: int) -> st.SearchStrategy:
    """Request message bytes as a client that does not use our stubs might send them."""
    valid = requests(vocab).map(lambda r: r.SerializeToString())
    return weighted(
        (2, st.binary(max_size=64)),
        (2, st.builds(lambda v, extra: v + b"".join(extra), valid, st.lists(unknown_fields(), min_size=1, max_size=3))),
        (2, st.builds(lambda v, number, bad, text: v + _field(number, 2, text.encode()[:8] + bad), valid,
                      st.sampled_from([1, 2, 9]), st.sampled_from(BAD_UTF8), TEXT)),
        (1, st.builds(lambda v, cut: v[:-cut], valid, st.integers(1, 8))),
        (1, st.builds(lambda v, number, n: v + _field(number, 0, _varint(n)), valid,
                      st.sampled_from([3, 4, 6, 8, 10, 11]), st.integers(-(2**63), -1))),
        (1, st.builds(_flip, valid, st.integers(0, 10**6), st.integers(0, 7))))


@dataclass
class Case:
    """One call: the message bytes, the request they parse as (None: they do not), how to send."""

    payload: bytes
    request: generation_pb2.GenerateRequest | None
    action: str  # read | cancel | deadline | disconnect
    deadline_s: float | None = None

    def describe(self, limit: int = 300) -> str:
        what = repr(self.payload[:limit]) + (f"... ({len(self.payload)} bytes)" if len(self.payload) > limit else "")
        return f"{self.action}{'' if self.deadline_s is None else f' {self.deadline_s:.3f}s'}: {what}"


def _parsed(data: bytes) -> generation_pb2.GenerateRequest | None:
    try:
        return generation_pb2.GenerateRequest.FromString(data)
    except Exception:  # noqa: BLE001 - any parse failure means "not a request"
        return None


def cases(vocab: int) -> st.SearchStrategy:
    """Calls to make: what to send and how."""
    structured = requests(vocab).map(lambda r: (r.SerializeToString(), r))
    raw = raw_bytes(vocab).map(lambda b: (b, _parsed(b)))
    how = weighted((3, st.just(("read", None))), (1, st.just(("cancel", None))), (1, st.just(("disconnect", None))),
                   (1, st.floats(0.001, 0.3).map(lambda s: ("deadline", s))))
    return st.builds(lambda p, h: Case(p[0], p[1], *h), weighted((2, structured), (1, raw)), how)


# -- the contract ----------------------------------------------------------------------------------

def contract_violations(req: generation_pb2.GenerateRequest, vocab: int) -> set[str]:
    """Fields of `req` that the documented contract makes invalid, whatever the server's config."""
    bad = set()
    if bool(req.prompt) + bool(req.prompt_token_ids) + bool(req.messages) != 1 or len(req.prompt) > MAX_PROMPT_CHARS:
        bad.add("prompt")
    if len(req.messages) > MAX_MESSAGES or any(not m.role for m in req.messages):
        bad.add("messages")
    if any(i >= vocab for i in req.prompt_token_ids):
        bad.add("prompt_token_ids")
    if req.HasField("max_tokens") and not 1 <= req.max_tokens <= 1_000_000:
        bad.add("max_tokens")
    temperature = req.temperature
    if req.HasField("temperature") and not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 100):  # NaN: neither
        bad.add("temperature")
    if req.HasField("top_p") and not 0 < req.top_p <= 1:
        bad.add("top_p")
    if req.HasField("seed") and req.seed >= 2**63:
        bad.add("seed")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in req.stop):
        bad.add("stop")
    if any(i >= vocab for i in req.stop_token_ids):
        bad.add("stop_token_ids")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        bad.add("request_id")
    return bad


def kind(case: Case, vocab: int) -> str:
    """"valid", "invalid" (by the contract) or "undecodable" (not a GenerateRequest at all)."""
    if case.request is None:
        return "undecodable"
    return "invalid" if contract_violations(case.request, vocab) else "valid"


def named_field(details: str) -> str:
    """The field an INVALID_ARGUMENT's details name ("stop.0: ..." -> "stop")."""
    return details.split(":", 1)[0].split(".", 1)[0].strip()


def judge(case: Case, code: str, details: str, responses: list, vocab: int) -> str | None:
    """Why this outcome breaks the contract, or None."""
    if code not in ALLOWED[case.action]:
        return f"status {code} is not allowed for a {case.action} call"
    if code == "INVALID_ARGUMENT" and named_field(details) not in FIELDS:
        return "INVALID_ARGUMENT without a field name"
    req = case.request
    if req is None:
        return "undecodable bytes were served" if code == "OK" or responses else None
    bad = contract_violations(req, vocab)
    if bad and (code == "OK" or responses):
        return f"invalid {sorted(bad)} was served"
    if code == "INVALID_ARGUMENT" and bad and named_field(details) not in bad | {"max_tokens"}:
        return f"INVALID_ARGUMENT names {named_field(details)!r}, the bad fields are {sorted(bad)}"
    if any(r.request_id != req.request_id for r in responses if req.request_id):
        return "a response echoes another request id"
    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if sum(len(r.token_ids) for r in responses) > max_tokens:
        return "more tokens than max_tokens"
    if code == "OK" and case.action == "read" and (not responses or not responses[-1].finish_reason):
        return "an OK stream ended without a finish reason"
    return None


# -- the driver ------------------------------------------------------------------------------------

def _generate(channel: grpc.Channel):
    return channel.unary_stream(METHOD, request_serializer=lambda b: b,
                                response_deserializer=generation_pb2.GenerateResponse.FromString)


def send(channel: grpc.Channel, address: str, case: Case, timeout_s: float) -> tuple[str, str, list]:
    """Make the call as `case` says; (status code name, details, responses received)."""
    own = grpc.insecure_channel(address) if case.action == "disconnect" else None
    call = _generate(own or channel)(case.payload, timeout=case.deadline_s or timeout_s)
    responses: list = []
    try:
        for msg in call:
            responses.append(msg)
            if case.action == "cancel":
                call.cancel()
            elif own is not None:
                own.close()
        return "OK", "", responses
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", responses
    except Exception as e:  # noqa: BLE001 - anything else the client library raises is a finding
        return f"CLIENT:{type(e).__name__}", str(e)[:300], responses
    finally:
        if own is not None:
            own.close()


@dataclass
class CampaignReport:
    """Outcomes of a campaign: calls by status code (and by way of sending), and the failures."""

    examples: int = 0
    seconds: float = 0.0
    skipped: int = 0  # examples not sent because the time bound ran out
    counts: collections.Counter = field(default_factory=collections.Counter)
    by_action: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    by_kind: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list[dict] = field(default_factory=list)
    failure_count: int = 0
    keep_failures: int = 50

    def add(self, case: Case, kind: str, code: str, details: str, problem: str | None) -> None:
        self.examples += 1
        self.counts[code] += 1
        self.by_action[case.action][code] += 1
        self.by_kind[kind][code] += 1
        if problem is not None:
            self.failure_count += 1
            if len(self.failures) < self.keep_failures:
                self.failures.append({"problem": problem, "code": code, "details": details[:300],
                                      "case": case.describe()})

    def to_json(self) -> dict:
        return {"examples": self.examples, "seconds": round(self.seconds, 1), "skipped": self.skipped,
                "counts": dict(self.counts), "by_action": {a: dict(c) for a, c in self.by_action.items()},
                "by_kind": {k: dict(c) for k, c in self.by_kind.items()},
                "failure_count": self.failure_count, "failures": self.failures}

    def table(self) -> str:
        actions, kinds = sorted(self.by_action), sorted(self.by_kind)
        rows = [{"code": code, "calls": n, "share": round(n / max(self.examples, 1), 4),
                 **{a: self.by_action[a].get(code, 0) for a in actions},
                 **{k: self.by_kind[k].get(code, 0) for k in kinds}} for code, n in self.counts.most_common()]
        head = ["status", "calls", "share"] + actions + kinds
        return (text_table(rows, ["code", "calls", "share"] + actions + kinds, head, 16)
                + f"\n{self.examples} examples in {self.seconds:.0f} s, {self.failure_count} failures"
                + (f", {self.skipped} skipped (time bound)" if self.skipped else ""))


def run_campaign(address: str, examples: int, vocab: int, rng_seed: int = 0, call_timeout_s: float = 30.0,
                 max_seconds: float = 600.0) -> CampaignReport:
    """Send `examples` generated calls to `address` one after another; count and judge them.

    Reproducible: the examples depend only on `rng_seed` (no example database). Bounded: each
    call by `call_timeout_s`, the campaign by `max_seconds` (later examples are skipped).
    """
    report = CampaignReport()
    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        @seed(rng_seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(cases(vocab))
        def one(case: Case) -> None:
            if time.monotonic() - start > max_seconds:
                report.skipped += 1
                return
            code, details, responses = send(channel, address, case, call_timeout_s)
            report.add(case, kind(case, vocab), code, details, judge(case, code, details, responses, vocab))

        one()
    report.seconds = time.monotonic() - start
    return report
