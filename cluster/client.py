"""A small Python client for the Generation service.

    client = Client("localhost:50051")
    for chunk in client.stream(prompt="def fibonacci(n):", max_tokens=64):
        print(chunk.text, end="")
    reply = client.generate(prompt="def fibonacci(n):")   # the whole reply at once

`UNAVAILABLE` before the first token (a verifier restarting, a replica draining) is retried
with exponential backoff (about 20 s in all by default: long enough for Serve to replace a
dead verifier replica); once tokens have streamed, an error ends the stream, since a retry
would repeat them. A verifier replica that dies under a call counts as UNAVAILABLE too (Serve's
gRPC proxy reports it as INTERNAL; see `ReplicaLostError`). With `overload_retries`,
RESOURCE_EXHAUSTED (every batch slot and queue place taken) is retried too, before the first
token, after the wait the server asks for (`retry_after_s`).

A server with TLS and tokens (config `security`):

    client = Client("specserve.example:50051", tls=TlsFiles(ca_file="ca.pem"), token=token)

(`TlsFiles(ca_file=..., cert_file=..., key_file=...)` also presents a client certificate.)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import grpc

from specserve.actors.errors import RETRY_AFTER_KEY
from specserve.actors.security import TlsFiles, secure_channel
from specserve.v1 import generation_pb2, generation_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_RETRY_AFTER = re.compile(r"retry after ([0-9.]+) s")
# How Serve's gRPC proxy words the INTERNAL it answers when the replica serving a call died
# (ray.exceptions.ActorDiedError / ActorUnavailableError): no server has the call any more.
REPLICA_LOST = ("The actor died unexpectedly before finishing this task.",
                "The task may or may not have been executed on the actor.")


class ReplicaLostError(grpc.RpcError):
    """A call whose verifier replica died: UNAVAILABLE, whatever status the proxy gave it."""

    def __init__(self, cause: grpc.RpcError):
        super().__init__(cause.details())
        self.cause = cause

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self.cause.details()


def _as_unavailable(e: grpc.RpcError) -> grpc.RpcError:
    """`e`, or ReplicaLostError when it says the replica serving the call died."""
    details = e.details() or ""
    if e.code() == grpc.StatusCode.INTERNAL and any(m in details for m in REPLICA_LOST):
        return ReplicaLostError(e)
    return e


def retry_after_s(error: grpc.RpcError) -> float | None:
    """When the server asks a refused call to come back: the `retry-after-ms` trailing metadata
    where the server can send it (its own TLS port), else the "(retry after S s)" that ends the
    details (Serve's gRPC proxy passes only code and details). None: not an overload."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            return int(value) / 1000
    match = _RETRY_AFTER.search(error.details() or "")
    return None if match is None else float(match.group(1))


@dataclass
class Reply:
    """A whole generation as the client saw it."""

    request_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    drafter_version: str = ""
    elapsed_s: float = 0.0
    ttft_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk, s since the call

    def add(self, msg: generation_pb2.GenerateResponse, at_s: float) -> None:
        """Fold in one response that arrived `at_s` seconds after the call."""
        if not self.chunk_times:
            self.ttft_s = at_s
        self.chunk_times.append(at_s)
        self.request_id = msg.request_id
        self.prompt_token_ids.extend(msg.prompt_token_ids)
        self.token_ids.extend(msg.token_ids)
        self.text += msg.text
        self.drafted, self.accepted, self.steps = msg.stats.drafted, msg.stats.accepted, msg.stats.steps
        self.drafter_version = msg.stats.drafter_version or self.drafter_version
        if msg.finish_reason:
            self.finish_reason = finish_name(msg.finish_reason)


def finish_name(reason: int) -> str:
    """'length', 'stop', 'cancelled' or 'error' (the engine's names)."""
    return generation_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def request_pb(prompt: str | None = None, prompt_token_ids: list[int] | None = None, request_id: str = "",
               messages: list[dict] | None = None, **params) -> generation_pb2.GenerateRequest:
    """A GenerateRequest; params are the proto's field names (max_tokens, temperature, ...);
    messages are chat messages, {"role": ..., "content": ...} each."""
    chat = [generation_pb2.ChatMessage(role=m["role"], content=m.get("content", "")) for m in messages or []]
    return generation_pb2.GenerateRequest(request_id=request_id, prompt=prompt or "",
                                          prompt_token_ids=prompt_token_ids or [], messages=chat,
                                          **{k: v for k, v in params.items() if v is not None})


class Client:
    """Calls `specserve.v1.Generation/Generate` on a specserve server."""

    def __init__(self, address: str = "localhost:50051", retries: int = 8, backoff_s: float = 0.2,
                 timeout_s: float | None = None, metadata: list[tuple[str, str]] | None = None,
                 tls: TlsFiles | None = None, token: str | None = None, max_backoff_s: float = 5.0,
                 overload_retries: int = 0):
        self.address = address
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.max_backoff_s, self.overload_retries = max_backoff_s, overload_retries
        self.metadata = list(metadata or []) + ([("authorization", f"Bearer {token}")] if token else [])
        self._channel = secure_channel(address, tls)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stream(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
               **params) -> Iterator[generation_pb2.GenerateResponse]:
        """The responses of one request as they arrive (retrying UNAVAILABLE, and with
        overload_retries RESOURCE_EXHAUSTED, before the first). A chat passes
        `messages=[{"role": "user", "content": ...}]` instead of a prompt."""
        req = request_pb(prompt, prompt_token_ids, **params)
        attempt = overloads = 0
        while True:
            started = False
            try:
                for msg in self._stub.Generate(req, timeout=self.timeout_s, metadata=self.metadata):
                    started = True
                    yield msg
                return
            except grpc.RpcError as e:
                wait_s = None if started else retry_after_s(e)
                if wait_s is not None and overloads < self.overload_retries:
                    overloads += 1
                    time.sleep(wait_s)
                    continue
                error = _as_unavailable(e)
                if started or error.code() not in RETRYABLE or attempt == self.retries:
                    if error is e:
                        raise
                    raise error from e
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
                attempt += 1

    def generate(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None, **params) -> Reply:
        """Run one request to the end and return everything it produced."""
        return self.collect(self.stream(prompt, prompt_token_ids, **params))

    @staticmethod
    def collect(responses: Iterator[generation_pb2.GenerateResponse], on_chunk=None) -> Reply:
        """Fold a request's responses into a Reply (calling on_chunk(msg) as each arrives)."""
        reply, start = Reply(), time.perf_counter()
        for msg in responses:
            reply.add(msg, time.perf_counter() - start)
            if on_chunk is not None:
                on_chunk(msg)
        reply.elapsed_s = time.perf_counter() - start
        return reply
