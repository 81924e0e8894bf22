"""Errors raised by the loraplex client: one class per gRPC status code.

Every error carries the ``grpc.StatusCode`` in ``code`` and the server's message
in ``message``, so callers can either catch a class (``except NotFound``) or
switch on the code.
"""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A call failed. ``code`` is the grpc.StatusCode, ``message`` the server's reason."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(LoraplexError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""


class NotFound(LoraplexError):
    """Unknown adapter or version (NOT_FOUND)."""


class AlreadyExists(LoraplexError):
    """A name that must be new is taken (ALREADY_EXISTS)."""


class FailedPrecondition(LoraplexError):
    """Refused in the server's current state (FAILED_PRECONDITION)."""


class ResourceExhausted(LoraplexError):
    """The server's queue is full; retry with backoff (RESOURCE_EXHAUSTED)."""


class PermissionDenied(LoraplexError):
    """Wrong token, or a path outside the adapter root (PERMISSION_DENIED)."""


class Unauthenticated(LoraplexError):
    """The server wants a bearer token and none was sent (UNAUTHENTICATED)."""


class Unavailable(LoraplexError):
    """The server is starting, stopping or unreachable (UNAVAILABLE)."""


class DeadlineExceeded(LoraplexError):
    """The call's timeout passed (DEADLINE_EXCEEDED)."""


class Cancelled(LoraplexError):
    """The call was cancelled (CANCELLED)."""


class Unimplemented(LoraplexError):
    """The server does not offer this method (UNIMPLEMENTED)."""


class Internal(LoraplexError):
    """A server bug (INTERNAL or UNKNOWN)."""


_BY_CODE: dict[grpc.StatusCode, type[LoraplexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
}


def from_rpc_error(err: grpc.RpcError) -> LoraplexError:
    """The LoraplexError subclass for a failed gRPC call (sync or asyncio)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return _BY_CODE.get(code, LoraplexError)(code, details or "")
