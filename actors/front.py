"""The client port served by a verifier replica itself, with TLS.

Serve's gRPC proxy cannot terminate TLS, so with `security.tls` each verifier replica runs
this grpc.aio server (Generation, the standard health check, reflection) on the client port,
on an event loop thread of its own. Replicas on one node share the port (SO_REUSEPORT; the
kernel spreads connections over them); clients spread over nodes as they would over Serve's
proxies. Errors get the same status codes as through the proxy (actors/errors.py).
"""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve.actors.convert import add_generation_servicer
from specserve.actors.errors import retry_metadata, status_for
from specserve.actors.security import bind
from specserve.actors.settings import ClientFrontSettings
from specserve.v1 import generation_pb2


class _Generation:
    def __init__(self, verifier):
        self.verifier = verifier

    async def Generate(self, request, context):
        try:
            async for msg in self.verifier.Generate(request, context):
                yield msg
        except Exception as e:  # a cancelled call raises CancelledError, which passes through
            code, details = status_for(e)
            await context.abort(code, details, trailing_metadata=retry_metadata(e))


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, verifier):
        self.verifier = verifier

    async def Check(self, request, context):
        return await self.verifier.Check(request)


class ClientFront:
    """A TLS gRPC server for one verifier replica (see module docstring)."""

    def __init__(self, verifier, settings: ClientFrontSettings):
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="client-front", daemon=True).start()
        self._server: grpc.aio.Server | None = None
        self.port = self._call(self._start(verifier, settings), timeout_s=60)

    def _call(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start(self, verifier, settings: ClientFrontSettings) -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        add_generation_servicer(_Generation(verifier), server)
        health_pb2_grpc.add_HealthServicer_to_server(_Health(verifier), server)
        names = (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        port = bind(server, f"{settings.host}:{settings.port}", settings.tls, "security.tls")
        if port == 0:
            raise OSError(f"cannot bind the client port {settings.host}:{settings.port}")
        await server.start()
        self._server = server
        return port

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting calls; running ones get `grace_s` to finish."""
        if self._server is not None:
            try:
                self._call(self._server.stop(grace_s), timeout_s=grace_s + 5)
            finally:
                self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
