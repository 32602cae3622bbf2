"""The OpenAI-compatible endpoints on Serve's HTTP proxy, served by the verifier replicas.

`OpenAIVerifierIngress` is the verifier deployment with FastAPI routes added (Serve's
`serve.ingress`): an HTTP call runs through the same `Verifier.Generate` as a gRPC call, in
the same replica, scheduler and batch. The shapes live in actors/openai_api.py.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at
# route time, after serve.ingress has rebuilt their signatures without `self`
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from specserve.actors.errors import status_for
from specserve.actors.openai_api import ApiError, ChatRequest, CompletionRequest, Reply, grpc_error, parse, sse
from specserve.cluster.app import VerifierIngress

openai_app = FastAPI(title="specserve OpenAI-compatible API", docs_url=None, redoc_url=None)


@openai_app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths and methods in OpenAI's error shape too."""
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


class _HttpCall:
    """What Verifier.Generate reads of a gRPC call's context, for an HTTP call."""

    def __init__(self, request: Request):
        auth = request.headers.get("authorization")
        self._metadata = [("authorization", auth)] if auth is not None else []

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code) -> None:  # the error is raised as well and answered in OpenAI's shape
        pass

    def set_details(self, details) -> None:
        pass


def _error_response(e: Exception) -> JSONResponse:
    api = e if isinstance(e, ApiError) else grpc_error(*status_for(e))
    return JSONResponse(api.body(), status_code=api.status)


@serve.ingress(openai_app)
class OpenAIVerifierIngress(VerifierIngress):
    """The verifier deployment, also answering the OpenAI API on Serve's HTTP port."""

    @openai_app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        try:
            if self.auth is not None:
                self.auth.check(_HttpCall(request).invocation_metadata())
        except Exception as e:
            return _error_response(e)
        model = {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "specserve"}
        return JSONResponse({"object": "list", "data": [model]})

    @openai_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai_call(CompletionRequest, request, chat=False)

    @openai_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai_call(ChatRequest, request, chat=True)

    async def _openai_call(self, model, request: Request, chat: bool):
        """Run one OpenAI request: a JSON reply, or server-sent events with stream: true."""
        try:
            req = parse(model, await request.body(), self.settings.model_name)
            responses = self.Generate(req.to_pb(), _HttpCall(request)).__aiter__()
            reply = Reply(chat, self.settings.model_name)
            first = await responses.__anext__()  # errors before the first token keep their status
        except StopAsyncIteration:
            first = None
        except Exception as e:
            return _error_response(e)
        if req.stream:
            return StreamingResponse(self._events(reply, first, responses, req.include_usage),
                                     media_type="text/event-stream")
        try:
            if first is not None:
                reply.add(first)
            async for msg in responses:
                reply.add(msg)
        except Exception as e:
            return _error_response(e)
        return JSONResponse(reply.whole())

    @staticmethod
    async def _events(reply: Reply, first, responses, include_usage: bool):
        """The stream of chunks; an error after the first chunk ends it with an error event."""
        try:
            yield sse(reply.chunk(reply.add(first) if first is not None else "", first=True))
            async for msg in responses:
                text = reply.add(msg)
                if text:
                    yield sse(reply.chunk(text))
            yield sse(reply.chunk(None))
            if include_usage:
                yield sse(reply.usage_chunk())
        except Exception as e:
            api = e if isinstance(e, ApiError) else grpc_error(*status_for(e))
            yield sse(api.body())
        yield sse("[DONE]")
