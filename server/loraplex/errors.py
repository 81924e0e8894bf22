"""Domain errors raised by the engine and the adapter store.

Each class names the kind of mistake, not a transport code; the API layer maps
them to gRPC status codes in one table (``loraplex.api.errors``). Messages say
what the caller should change.
"""


class LoraplexError(Exception):
    """Base class of every error a caller can cause or must react to."""


class InvalidArgument(LoraplexError):
    """A request field is malformed or out of range."""


class NotFound(LoraplexError):
    """A named adapter, version or route does not exist."""


class AlreadyExists(LoraplexError):
    """A name that must be new is taken."""


class FailedPrecondition(LoraplexError):
    """The request is well formed but the server's state refuses it now
    (an adapter that cannot be served exactly, an adapter still in use...)."""


class ResourceExhausted(LoraplexError):
    """The queue is full; retry later."""


class PermissionDenied(LoraplexError):
    """A path escapes the adapter root or names something never readable."""


class Unavailable(LoraplexError):
    """The engine is shutting down, not started, or has failed; retry on another replica."""


class Internal(LoraplexError):
    """The server failed while running a request: a bug in the server, not in the request."""


class DeadlineExceeded(LoraplexError):
    """The request's deadline passed before it could finish."""


class Cancelled(LoraplexError):
    """The request was cancelled by its caller."""
