"""Python client of the loraplex multi-adapter inference server."""

from loraplex_client.client import AsyncClient, Client, GenerateStream
from loraplex_client.errors import (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition,
                                    Internal, InvalidArgument, LoraplexError, NotFound,
                                    PermissionDenied, ResourceExhausted, Unauthenticated,
                                    Unavailable, Unimplemented)
from loraplex_client.types import (AdapterInfo, Chunk, Completion, GuardTrip, Result,
                                   RouteInfo, ShadowComparison, TokenLogprob, Tokens)

__all__ = ["AsyncClient", "Client", "GenerateStream", "AdapterInfo", "Chunk", "Completion",
           "Result", "TokenLogprob", "Tokens", "RouteInfo", "ShadowComparison", "GuardTrip",
           "LoraplexError", "AlreadyExists", "Cancelled", "DeadlineExceeded",
           "FailedPrecondition", "Internal", "InvalidArgument", "NotFound", "PermissionDenied",
           "ResourceExhausted", "Unauthenticated", "Unavailable", "Unimplemented"]
