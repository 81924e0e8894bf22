"""grpc.aio servicers of loraplex.v1: protobuf in, domain call, protobuf out.

Every domain error becomes its status code through `api.errors.status_of`; any
other exception is a bug and answers INTERNAL (logged with its traceback; a failed
engine step was logged by the engine and answers `Internal`'s message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import grpc

from loraplex.api.convert import (adapter_info_to_pb, adapter_label,
                                  generation_request_from_pb, merge_args_from_pb,
                                  prompt_ids_from_pb, response_from_completions,
                                  response_from_outputs, token_ids_from_pb)
from loraplex.api.errors import status_of
from loraplex.api.routes import ShadowMirror, seed_for_shadow
from loraplex.engine.request import FinishReason, RequestOutput
from loraplex.errors import (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition,
                             Internal, InvalidArgument, LoraplexError, NotFound, Unavailable)
from loraplex.metrics import Metrics
from loraplex.routing import Router
from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 30.0


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value (None = no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the request started")
    return time.monotonic() + remaining


def _raise_unless_success(out: RequestOutput) -> None:
    """Finish reasons that are not a successful answer become errors (see the .proto)."""
    if out.finish_reason is FinishReason.CANCELLED:
        raise Cancelled(out.error or "the request was cancelled")
    if out.finish_reason is FinishReason.DEADLINE:
        raise DeadlineExceeded(out.error or "the request's deadline passed")
    if out.finish_reason is FinishReason.ERROR:
        raise Internal(out.error or "the server failed while running the request")
    if out.finish_reason is FinishReason.UNAVAILABLE:
        raise Unavailable(out.error or "the engine failed; retry on another replica")
    if out.finish_reason is FinishReason.INVALID:
        raise InvalidArgument(out.error)


class _Call:
    """Bookkeeping of one Generation call for the metrics: the status it ended with,
    and its adapter label: the reference as the request gave it ("" = base model,
    "name" or "name@version"), so that one kind of request always counts under one
    label whatever moment it ended at; "_invalid" when the reference was malformed
    or unknown (so that bad input cannot grow the label set). A routed call is
    labelled with the version its route chose, and the route."""

    def __init__(self, context: grpc.aio.ServicerContext, adapter: str,
                 on_end: Callable[[_Call], None]):
        self.context = context
        self._on_end = on_end  # records the outcome: metrics, route guard, shadow
        self._ended = False
        self.label = adapter_label(adapter)
        self.route = ""
        self.shadow = None  # future of the primary's outcome, awaited by a shadow task
        self.code = grpc.StatusCode.OK
        self.start = time.monotonic()
        self.tokens: list[int] = []
        self.finished = False  # ended with LENGTH or STOP

    def observe(self, out: RequestOutput) -> None:
        """An output of the call: completion 0's tokens stand for the call (the route's
        guard divides the latency by them; its shadow is compared with them)."""
        if out.index == 0:
            self.tokens.extend(out.token_ids)

    def routed(self, decision) -> None:
        self.label, self.route = decision.ref, decision.route

    def labels(self) -> tuple[str, str, str]:
        """(adapter, version, route) of the metrics."""
        name, _, version = self.label.partition("@")
        return name, version, self.route

    def end(self) -> None:
        """Record the outcome, once. Before the client can hear it: a unary response or a
        stream's status goes out after the handler returns, but `abort` sends at once."""
        if not self._ended:
            self._ended = True
            self._on_end(self)

    async def fail(self, exc: Exception):
        """Abort the call with the status of `exc` (never returns)."""
        if self.context.cancelled():  # e.g. a write after the client went away
            self.interrupted()
            raise exc
        self.code = status_of(exc)
        if self.code is grpc.StatusCode.INTERNAL and not isinstance(exc, Internal):
            log.exception("bug while serving a request", exc_info=exc)
            self.end()
            await self.context.abort(self.code, f"internal error: {type(exc).__name__}")
        if self.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) \
                and not self.route:
            self.label = "_invalid" if self.label else ""
        self.end()
        await self.context.abort(self.code, str(exc))

    def interrupted(self):
        """The call's task is being cancelled: by the client, or by its deadline."""
        remaining = self.context.time_remaining()
        # grpc cancels the task at the deadline; allow for timer granularity
        self.code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0.01
                     else grpc.StatusCode.CANCELLED)


# Outcomes that say nothing about the version that served (the caller's doing).
_NOT_THE_VERSIONS_FAULT = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           grpc.StatusCode.UNAVAILABLE)


class GenerationServicer(pb_grpc.GenerationServicer):
    """Requests naming a route's alias are resolved by the router (loraplex.routing)
    to one version before they reach the engine; a share of them is mirrored to the
    route's shadow candidate (api.routes.ShadowMirror), which the caller never waits for."""

    def __init__(self, get_engine: Callable, metrics: Metrics, router: Router | None = None):
        self._get_engine = get_engine  # raises Unavailable until the model is ready
        self._metrics = metrics
        self._router = router
        self.shadows = ShadowMirror(router, metrics) if router is not None else None

    async def _submit(self, request: pb.GenerateRequest, context, call: _Call):
        engine = self._get_engine()
        greq = generation_request_from_pb(request, engine.tokenizer, _deadline(context),
                                          engine.max_model_len)
        if request.guided_regex or request.guided_choice or request.guided_json:
            # compiling a guide is Python for up to hundreds of ms: not on the event loop
            await asyncio.to_thread(engine.prepare_guide, greq.sampling)
        decision = (self._router.resolve(request.adapter, request.routing_key)
                    if self._router is not None and request.adapter else None)
        if decision is None:
            return engine.submit(greq)
        call.routed(decision)
        greq = replace(greq, adapter=decision.ref)
        if decision.shadow_ref:
            greq = seed_for_shadow(greq)
        stream = engine.submit(greq)
        if decision.shadow_ref:
            call.shadow = self.shadows.mirror(engine, greq, decision)
        return stream

    def _done(self, call: _Call) -> None:
        """Metrics, the route's guard and the shadow comparison of one ended call."""
        latency = time.monotonic() - call.start
        labels = call.labels()
        self._metrics.requests.labels(*labels, call.code.name).inc()
        ok = call.code is grpc.StatusCode.OK and call.finished
        if ok:
            self._metrics.request_latency.labels(*labels).observe(latency)
        if call.route:
            if call.code not in _NOT_THE_VERSIONS_FAULT:
                self._router.record(call.route, call.label, ok, latency, len(call.tokens))
            if call.shadow is not None and not call.shadow.done():
                call.shadow.set_result((list(call.tokens) if ok else None, latency))

    async def Generate(self, request, context):
        call, stream, outputs = _Call(context, request.adapter, self._done), None, []
        try:
            stream = await self._submit(request, context, call)
            async for out in stream:
                outputs.append(out)
                call.observe(out)
                if out.finished:
                    _raise_unless_success(out)
            call.finished = True
            engine = self._get_engine()
            resp = response_from_completions(outputs, stream.request.n, engine.token_bytes,
                                             engine.special_ids)
            resp.route = call.route
            return resp
        except asyncio.CancelledError:
            call.interrupted()
            raise
        except Exception as exc:
            await call.fail(exc)
        finally:
            if stream is not None:
                stream.cancel()  # (no-op once it has finished)
            call.end()

    async def GenerateStream(self, request, context):
        # context.write (not `yield`) so that a cancellation lands inside this
        # coroutine, where the finally below cancels the engine request at once.
        call, stream = _Call(context, request.adapter, self._done), None
        try:
            stream = await self._submit(request, context, call)
            engine = self._get_engine()
            async for out in stream:
                call.observe(out)
                if out.finished:
                    _raise_unless_success(out)
                resp = response_from_outputs([out], engine.token_bytes, engine.special_ids)
                resp.route = call.route
                await context.write(resp)
            call.finished = True
        except asyncio.CancelledError:
            call.interrupted()
            raise
        except Exception as exc:
            await call.fail(exc)
        finally:
            if stream is not None:
                stream.cancel()  # (no-op once it has finished)
            call.end()

    async def Tokenize(self, request, context):
        try:
            engine = self._get_engine()
            ids = prompt_ids_from_pb(request, engine.tokenizer)
        except LoraplexError as exc:
            await context.abort(status_of(exc), str(exc))
        return pb.TokenizeResponse(token_ids=ids, max_model_len=engine.max_model_len)

    async def Detokenize(self, request, context):
        try:
            engine = self._get_engine()
            ids = token_ids_from_pb(request, engine.loaded.vocab_size)
        except LoraplexError as exc:
            await context.abort(status_of(exc), str(exc))
        # (Generate decodes after the prompt's last tokens: see the .proto)
        return pb.DetokenizeResponse(text=engine.tokenizer.decode(ids, skip_special_tokens=True))


def _need(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is empty")
    return value


class AdaptersServicer(pb_grpc.AdaptersServicer):
    """Adapter management. The store's calls block (disk, copies), so they run in a
    worker thread."""

    def __init__(self, get_engine: Callable, on_change: Callable | None = None,
                 router: Router | None = None):
        self._get_engine = get_engine
        self._on_change = on_change  # async; after every change of the registry (persistence)
        self._router = router  # an adapter may not take a route's alias, nor go while routed

    def _new_name(self, name: str) -> str:
        name = _need(name, "name")
        if self._router is not None and self._router.is_route(name):
            raise AlreadyExists(f"{name!r} is a route alias; delete the route or pick another "
                                "adapter name")
        return name

    def _refuse_if_routed(self, name: str) -> None:
        """Called by the cache under its lock as an unload begins: a route's hold would
        keep the drain waiting until the route changes."""
        routes = self._router.naming(name) if self._router is not None else []
        if routes:
            raise FailedPrecondition(
                f"adapter {name!r} is named by route(s) {', '.join(routes)} (a target, "
                "shadow or version to roll back to); set those routes without it or "
                "delete them first")

    async def _run(self, context, fn, *args, **kwargs):
        try:
            result = await asyncio.to_thread(fn, *args, **kwargs)
            if self._on_change is not None and fn.__name__ != "list":
                await self._on_change()
            return result
        except Exception as exc:
            code = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("bug in an adapter call", exc_info=exc)
                await context.abort(code, f"internal error: {type(exc).__name__}")
            await context.abort(code, str(exc))

    async def _fail(self, context, exc: LoraplexError):
        await context.abort(status_of(exc), str(exc))

    async def ListAdapters(self, request, context):
        try:
            adapters = self._get_engine().adapters
        except LoraplexError as exc:
            await self._fail(context, exc)
        infos = await self._run(context, adapters.list)
        if request.name:
            infos = [i for i in infos if i.name == request.name]
            if not infos:
                await self._fail(context, NotFound(f"no adapter named {request.name!r}"))
        infos = sorted(infos, key=lambda i: (i.name, not i.current, i.version))
        return pb.ListAdaptersResponse(adapters=[adapter_info_to_pb(i) for i in infos])

    async def LoadAdapter(self, request, context):
        try:
            adapters = self._get_engine().adapters
            name = self._new_name(request.name)
        except LoraplexError as exc:
            await self._fail(context, exc)
        info = await self._run(context, adapters.load, name, request.path or None)
        return adapter_info_to_pb(info)

    async def UnloadAdapter(self, request, context):
        try:
            adapters = self._get_engine().adapters
            name = _need(request.name, "name")
        except LoraplexError as exc:
            await self._fail(context, exc)
        remaining = context.time_remaining()
        timeout = DEFAULT_DRAIN_TIMEOUT if remaining is None else max(0.0, remaining)
        infos = await self._run(context, adapters.unload, name, drain=request.drain,
                                timeout=timeout, refuse=self._refuse_if_routed)
        return pb.UnloadAdapterResponse(unloaded=[adapter_info_to_pb(i) for i in infos])

    async def SwapAdapter(self, request, context):
        try:
            adapters = self._get_engine().adapters
            name = self._new_name(request.name)
            path = _need(request.path, "path")
        except LoraplexError as exc:
            await self._fail(context, exc)
        info = await self._run(context, adapters.swap, name, path)
        return adapter_info_to_pb(info)

    async def MergeAdapters(self, request, context):
        try:
            adapters = self._get_engine().adapters
            args = merge_args_from_pb(request)
            self._new_name(args["name"])
        except LoraplexError as exc:
            await self._fail(context, exc)
        # a client that cancels (or whose deadline passes) stops the merge between modules
        info = await self._run(context, adapters.merge, should_stop=context.cancelled, **args)
        return adapter_info_to_pb(info)
