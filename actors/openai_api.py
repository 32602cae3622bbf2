"""The OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`).

Requests become the same GenerateRequest the gRPC contract takes and run through the same
verifier (one scheduler, one batch); replies take OpenAI's shapes, streamed as server-sent
events with `stream: true`. Errors take OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, with the HTTP status that matches the gRPC code (STATUS_OF_CODE).
Fields OpenAI defines that this server cannot honour (n > 1, logprobs, penalties, echo) are
refused naming them rather than ignored; unknown fields are ignored, as OpenAI's servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specserve.v1 import generation_pb2

STATUS_OF_CODE = {  # the HTTP status of each gRPC code a call can end with
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled", 500: "server_error",
               503: "service_unavailable", 504: "timeout"}
FINISH = {generation_pb2.FINISH_REASON_LENGTH: "length", generation_pb2.FINISH_REASON_STOP: "stop",
          generation_pb2.FINISH_REASON_CANCELLED: "stop", generation_pb2.FINISH_REASON_ERROR: "stop"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def grpc_error(code: grpc.StatusCode, details: str) -> ApiError:
    """The ApiError of a call that ended with gRPC `code`; the field named in `details`
    ("max_tokens: ...") becomes `param`."""
    status = STATUS_OF_CODE.get(code, 500)
    param = details.split(":", 1)[0].split(".", 1)[0] if status == 400 and ":" in details else None
    return ApiError(status, details, param)


class _Request(BaseModel):
    """Fields the two generation endpoints share (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Served model name (GET /v1/models).")
    max_tokens: int | None = Field(None, description="Most tokens to generate.")
    temperature: float | None = Field(None, description="0 = greedy; unset: 1, as OpenAI.")
    top_p: float | None = Field(None, description="Nucleus mass; unset: 1.")
    seed: int | None = Field(None, description="Seed of every random number the request uses.")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings.")
    n: int = Field(1, description="Choices per request; only 1 is served.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: dict | None = Field(None, description="{'include_usage': true} adds a usage chunk.")
    presence_penalty: float = Field(0.0, description="Only 0 is served.")
    frequency_penalty: float = Field(0.0, description="Only 0 is served.")
    logprobs: bool | int | None = Field(None, description="Not served.")

    def check_supported(self) -> None:
        for name, ok in (("n", self.n == 1), ("presence_penalty", self.presence_penalty == 0),
                         ("frequency_penalty", self.frequency_penalty == 0),
                         ("logprobs", self.logprobs in (None, False, 0))):
            if not ok:
                raise ApiError(400, f"{name}: not supported by this server", name)

    def sampling(self, max_tokens: int | None) -> dict:
        """GenerateRequest fields of the sampling parameters (validated by the verifier)."""
        fields = {"temperature": 1.0 if self.temperature is None else self.temperature,
                  "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or [])}
        for name, value, end in (("max_tokens", max_tokens, 2**32), ("seed", self.seed, 2**64)):
            if value is not None and not 0 <= value < end:  # the proto's unsigned range; the verifier checks the rest
                raise ApiError(400, f"{name}: out of range", name)
        optional = {"max_tokens": max_tokens, "top_p": self.top_p, "seed": self.seed}
        return fields | {k: v for k, v in optional.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] = Field(description="Text, one text in a list, or token ids.")
    echo: bool = Field(False, description="Only false is served.")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, description="Most tokens to generate (OpenAI: 16).")

    def to_pb(self) -> generation_pb2.GenerateRequest:
        self.check_supported()
        if self.echo:
            raise ApiError(400, "echo: not supported by this server", "echo")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: only one prompt per request is served", "prompt")
            prompt = prompt[0]
        text = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
        if isinstance(prompt, list) and any(not 0 <= t < 2**32 for t in prompt):
            raise ApiError(400, "prompt: token ids must be in [0, 2^32)", "prompt")
        return _pb(**text, **self.sampling(self.max_tokens))


class ChatContentPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a chat."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ChatContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The chat so far.")
    max_completion_tokens: int | None = Field(None, description="Most tokens to generate (newer name).")

    def to_pb(self) -> generation_pb2.GenerateRequest:
        self.check_supported()
        chat = [generation_pb2.ChatMessage(role=m.role, content=m.text()) for m in self.messages]
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return _pb(messages=chat, **self.sampling(limit))


def _pb(**fields) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(**fields)


def parse(model: type[_Request], body: bytes, served_model: str) -> _Request:
    """The request in `body`, or ApiError 400 naming the first bad field (404 for another model)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}", param and str(err["loc"][0])) from None
    if req.model != served_model:
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {served_model!r}",
                       "model", "model_not_found")
    return req


class Reply:
    """One request's reply in OpenAI's shapes, built up from the verifier's responses."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text, self.finish, self.prompt_tokens, self.completion_tokens = "", None, 0, 0

    def add(self, msg: generation_pb2.GenerateResponse) -> str:
        """Fold in one response; returns its new text."""
        self.prompt_tokens += len(msg.prompt_token_ids)
        self.completion_tokens += len(msg.token_ids)
        self.text += msg.text
        if msg.finish_reason:
            self.finish = FINISH.get(msg.finish_reason, "stop")
        return msg.text

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self) -> dict:
        """The non-streamed reply."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text},
                      "finish_reason": self.finish, "logprobs": None}
            return self._envelope("chat.completion", [choice]) | {"usage": self.usage()}
        choice = {"index": 0, "text": self.text, "finish_reason": self.finish, "logprobs": None}
        return self._envelope("text_completion", [choice]) | {"usage": self.usage()}

    def chunk(self, text: str | None, first: bool = False) -> dict:
        """One streamed chunk carrying `text` (None: the final one, with the finish reason)."""
        finish = self.finish if text is None else None
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", []) | {"usage": self.usage()}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
