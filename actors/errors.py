"""The one place that maps errors to gRPC status codes (DESIGN §5)."""

from __future__ import annotations

import grpc

from specserve.actors.engine.kv_cache import CacheBudgetError
from specserve.actors.engine.request import InvalidRequestError
from specserve.actors.security import AuthError


RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED: when to retry, integer ms


class OverloadedError(RuntimeError):
    """Every batch slot and queue place is taken; the client should retry later.

    Clients see RESOURCE_EXHAUSTED with details ending "(retry after S s)" and, where the
    server can send trailing metadata with an error, `retry-after-ms` (see retry_metadata).
    """

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s

    def __reduce__(self):
        return type(self), (self.message, self.retry_after_s)


class DrainingError(RuntimeError):
    """The server is shutting down or not ready; another replica (or a retry) will serve."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details a client sees for `exc`."""
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc} (retry after {exc.retry_after_s:g} s)"
    if isinstance(exc, CacheBudgetError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DrainingError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def retry_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with `exc`'s status: the retry hint of an overload, if any.

    Serve's gRPC proxy (Ray 2.60) sends only the code and details of a failed call, so this
    reaches clients where the replicas serve the client port themselves (actors/front.py);
    through the proxy the details carry the same hint.
    """
    if isinstance(exc, OverloadedError):
        return ((RETRY_AFTER_KEY, str(round(exc.retry_after_s * 1000))),)
    return ()
