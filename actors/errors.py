"""The one place that maps errors to gRPC status codes (DESIGN §5)."""

from __future__ import annotations

import grpc

from specserve.actors.engine.kv_cache import CacheBudgetError
from specserve.actors.engine.request import InvalidRequestError
from specserve.actors.security import AuthError


class OverloadedError(RuntimeError):
    """Every batch slot and queue place is taken; the client should retry later."""

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
