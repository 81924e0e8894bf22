"""Server interceptor in front of the loraplex services: bearer tokens, and a count
of the calls whose handler is running (logged when a shutdown starts).

Health checking and reflection are never guarded. Tokens are compared in constant
time. Missing token -> UNAUTHENTICATED, wrong token -> PERMISSION_DENIED.

Shutdown needs no gate here: grpc's graceful stop closes the port and sends GOAWAY,
and every call grpc accepted before that is served. (Refusing a call that reached a
handler during the stop lost it: a proxy cannot send a call that got a status to
another replica.)
"""

from __future__ import annotations

import hmac
import inspect

import grpc

GENERATION_SERVICE = "loraplex.v1.Generation"
ADAPTERS_SERVICE = "loraplex.v1.Adapters"
ROUTES_SERVICE = "loraplex.v1.Routes"


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that ends the call with `code`."""

    async def unary_response(request, context):
        await context.abort(code, message)

    async def stream_response(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kw)
    return grpc.stream_stream_rpc_method_handler(stream_response, **kw)


class InFlight:
    """Number of accepted calls not finished yet (logged when a shutdown starts)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.count += 1

    def __exit__(self, *exc):
        self.count -= 1


def _tracked_handler(handler: grpc.RpcMethodHandler, in_flight: InFlight):
    """`handler` with its behavior counted in `in_flight` while it runs."""
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k))
    inner = getattr(handler, kind)
    if inspect.isasyncgenfunction(inner):
        async def behavior(request, context):
            with in_flight:
                async for response in inner(request, context):
                    yield response
    else:
        async def behavior(request, context):
            with in_flight:
                return await inner(request, context)
    return getattr(grpc, f"{kind}_rpc_method_handler")(behavior, **kw)


class GateInterceptor(grpc.aio.ServerInterceptor):
    """tokens: service full name -> required bearer token ("" = open).
    in_flight: counts the accepted calls of those services."""

    def __init__(self, tokens: dict[str, str], in_flight: InFlight | None = None):
        self._tokens = tokens
        self.in_flight = in_flight or InFlight()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        service = details.method.split("/")[1] if details.method.count("/") == 2 else ""
        if service not in self._tokens:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED
            return None
        expected = self._tokens[service]
        if expected:
            sent = ""
            for key, value in details.invocation_metadata or ():
                if key == "authorization":
                    sent = value if isinstance(value, str) else value.decode()
            if not sent:
                return _rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                          "send the metadata 'authorization: Bearer <token>'")
            scheme, _, token = sent.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), expected.encode()):
                return _rejecting_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                          f"the bearer token is not valid for {service}")
        return _tracked_handler(handler, self.in_flight)
