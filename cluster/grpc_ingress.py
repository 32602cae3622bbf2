"""specserve's services on Serve's gRPC proxy, reachable without Serve's `application` metadata.

Serve's proxy picks the application a call goes to from the `application` metadata key. A
call without it is routed only while exactly one application is routable; otherwise the proxy
answers NOT_FOUND "Application metadata not set". A generic client (grpcurl, stubs built from
reflection) sends no such key, so it failed whenever another Serve application shared the
cluster, and on every cluster while the application was still deploying (the proxy listens
on the client port before any application exists), health checks included.

The servicer functions here (named in the Serve config's `grpc_servicer_functions`) register
Generation and the standard health check with the proxy so that:
- a call without `application` goes to the specserve application (`APP_NAME`); a call that
  names an application goes where it says, as before;
- a call without `application` that the proxy cannot route yet (nothing deployed, or no
  application of that name) is UNAVAILABLE, which clients retry, with details naming the
  metadata key; a health check then answers NOT_SERVING.

Everything else (balancing over verifier replicas, streaming, cancellation) is the proxy's own
routing, called for each call: these handlers only choose the route and word the miss.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from specserve.actors.convert import add_generation_servicer, request_from_bytes
from specserve.cluster.config import APP_NAME
from specserve.v1 import generation_pb2

APPLICATION_KEY = "application"  # Serve's metadata key naming the application of a call
GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
UNROUTED = (f"no specserve application is serving on this port yet (still deploying?); where several Serve "
            f"applications share the cluster and specserve's is not named {APP_NAME!r}, send the "
            f"'{APPLICATION_KEY}' metadata key with its name")


class RoutedContext:
    """A call's servicer context as Serve's proxy sees it: `application` defaults to `app`.

    Serve's "no such application" NOT_FOUND on a defaulted call is held back (`unrouted`) for
    the handler to answer in its own words; specserve itself never answers NOT_FOUND.
    """

    def __init__(self, context, app: str = APP_NAME):
        self._context = context
        metadata = tuple(context.invocation_metadata() or ())
        self.defaulted = all(key != APPLICATION_KEY for key, _ in metadata)
        self._metadata = metadata + (((APPLICATION_KEY, app),) if self.defaulted else ())
        self.unrouted = False

    def __getattr__(self, name):
        return getattr(self._context, name)

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code) -> None:
        if self.defaulted and code == grpc.StatusCode.NOT_FOUND:
            self.unrouted = True
            return
        self._context.set_code(code)

    def set_details(self, details) -> None:
        if not self.unrouted:
            self._context.set_details(details)


def _proxy_route(server, service: str, method: str, streaming: str):
    """The proxy's own handler for /service/method (it routes to a replica of an application)."""
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    return server.service_handler_factory(service_method=f"/{service}/{method}",
                                          streaming_type=gRPCStreamingType(streaming))


def _is_serve_proxy(server) -> bool:
    return hasattr(server, "service_handler_factory") and hasattr(server, "add_passthrough_service")


def _register(server, service: str, handlers: dict) -> None:
    """Add `handlers` as they are: the proxy must not swap them for its routing handlers."""
    server.add_passthrough_service(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def add_generation_to_proxy(servicer, server) -> None:
    """Serve servicer function: specserve.v1.Generation/Generate (see module docstring)."""
    if not _is_serve_proxy(server):
        add_generation_servicer(servicer, server)
        return
    route = _proxy_route(server, GENERATION, "Generate", "unary_stream")

    async def generate(request, context):
        routed = RoutedContext(context)
        async for message in route(request, routed):
            yield message
        if routed.unrouted:
            await context.abort(grpc.StatusCode.UNAVAILABLE, UNROUTED)

    # responses come back from the replica already serialized: no response serializer
    _register(server, GENERATION, {"Generate": grpc.unary_stream_rpc_method_handler(
        generate, request_deserializer=request_from_bytes)})


def add_health_to_proxy(servicer, server) -> None:
    """Serve servicer function: grpc.health.v1.Health/Check, answered by the verifiers (see
    module docstring); NOT_SERVING while no specserve application can be reached."""
    if not _is_serve_proxy(server):
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        return
    route = _proxy_route(server, HEALTH, "Check", "unary_unary")
    not_serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check(request, context):
        routed = RoutedContext(context)
        reply = await route(request, routed)
        return not_serving.SerializeToString() if routed.unrouted else reply

    _register(server, HEALTH, {"Check": grpc.unary_unary_rpc_method_handler(
        check, request_deserializer=health_pb2.HealthCheckRequest.FromString)})
