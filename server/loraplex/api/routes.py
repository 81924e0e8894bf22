"""The Routes service (aliases over adapter versions) and the shadow mirror the
Generation servicer uses. Protobuf <-> loraplex.routing here; the rules live there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.api.errors import status_of
from loraplex.engine.request import FinishReason, GenerationRequest
from loraplex.errors import InvalidArgument, LoraplexError, NotFound
from loraplex.metrics import Metrics
from loraplex.routing import (Decision, Guard, Route, Router, Shadow, Target, split_ref)
from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_SHADOWS_IN_FLIGHT = 32


# ---------------------------------------------------------------- conversion

def _ts(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def _targets_pb(targets) -> list[pb.RouteTarget]:
    return [pb.RouteTarget(adapter=t.ref, weight=t.weight) for t in targets]


def _shadow_pb(shadow: Shadow | None) -> pb.ShadowConfig | None:
    return pb.ShadowConfig(adapter=shadow.ref, fraction=shadow.fraction) if shadow else None


def route_to_pb(route: Route, comparisons) -> pb.RouteInfo:
    msg = pb.RouteInfo(alias=route.alias, targets=_targets_pb(route.targets),
                       primary=route.primary, updated=_ts(route.updated))
    if route.shadow is not None:
        msg.shadow.CopyFrom(_shadow_pb(route.shadow))
    if route.guard is not None:
        g = route.guard
        msg.guard.window = g.window
        for name in ("max_error_rate", "max_latency_ratio", "max_disagreement"):
            if getattr(g, name) is not None:
                setattr(msg.guard, name, getattr(g, name))
    for c in comparisons:
        msg.comparisons.add(primary=c.primary, candidate=c.candidate, compared=c.compared,
                            exact_match_rate=c.exact_match_rate, token_agreement=c.token_agreement,
                            latency_ratio=c.latency_ratio, candidate_errors=c.candidate_errors)
    for t in route.trips:
        msg.trips.add(time=_ts(t.time), adapter=t.candidate, metric=t.metric, value=t.value,
                      limit=t.limit)
    for targets, shadow in route.history:
        h = msg.history.add(targets=_targets_pb(targets))
        if shadow is not None:
            h.shadow.CopyFrom(_shadow_pb(shadow))
    return msg


def guard_from_pb(req: pb.SetRouteRequest) -> Guard | None:
    if not req.HasField("guard"):
        return None
    g = req.guard
    return Guard(max_error_rate=g.max_error_rate if g.HasField("max_error_rate") else None,
                 max_latency_ratio=g.max_latency_ratio if g.HasField("max_latency_ratio") else None,
                 max_disagreement=g.max_disagreement if g.HasField("max_disagreement") else None,
                 window=g.window or 50)


# ---------------------------------------------------------------- shadow traffic

# Shadow requests that ended so for reasons outside the candidate: a shutdown, a deadline,
# an engine that failed before they ran. Not held against it (like the primary path's
# _NOT_THE_VERSIONS_FAULT in api.servicers).
_NOT_THE_CANDIDATES_FAULT = (FinishReason.CANCELLED, FinishReason.DEADLINE,
                             FinishReason.UNAVAILABLE)


class ShadowMirror:
    """Runs shadow requests as fire-and-forget tasks and compares each with its primary.

    The caller's call never awaits anything here: `mirror` submits the shadow and
    returns a future that the caller completes with its own outcome when done.
    """

    def __init__(self, router: Router, metrics: Metrics,
                 max_in_flight: int = MAX_SHADOWS_IN_FLIGHT):
        self.router = router
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task] = set()

    def _pair(self, decision: Decision) -> tuple[str, ...]:
        return (decision.route, *split_ref(decision.ref), *split_ref(decision.shadow_ref))

    def mirror(self, engine, request: GenerationRequest,
               decision: Decision) -> asyncio.Future | None:
        """Start the shadow of `request`; returns the future of the primary's outcome
        (tokens or None, latency in s), or None when no shadow was started."""
        if len(self._tasks) >= self.max_in_flight:
            self.metrics.shadow_requests.labels(*self._pair(decision), "skipped").inc()
            return None
        # one completion, compared with the primary's completion 0 (same seed)
        shadow = replace(request, adapter=decision.shadow_ref, request_id="", shadow=True, n=1)
        try:
            stream = engine.submit(shadow)
        except LoraplexError:  # e.g. the queue is full: real work first
            self.metrics.shadow_requests.labels(*self._pair(decision), "skipped").inc()
            return None
        primary = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(stream, decision, primary))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return primary

    async def _run(self, stream, decision: Decision, primary: asyncio.Future) -> None:
        from loraplex.engine.engine import collect

        start = time.monotonic()
        tokens = None
        try:
            out = await collect(stream)
            if out.finish_reason in _NOT_THE_CANDIDATES_FAULT:  # the replica's, not its own
                self.metrics.shadow_requests.labels(*self._pair(decision), "skipped").inc()
                return
            if out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP):
                tokens = list(out.token_ids)
        except LoraplexError as exc:
            log.debug("shadow request to %s failed: %s", decision.shadow_ref, exc)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        latency = time.monotonic() - start
        pair = self._pair(decision)
        self.metrics.shadow_requests.labels(*pair, "ok" if tokens is not None else "error").inc()
        try:
            primary_tokens, primary_latency = await asyncio.wait_for(primary, 600)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            return
        if primary_tokens is None:
            return  # the primary failed or was cancelled: nothing to compare
        self.router.record_shadow(decision.route, decision.ref, decision.shadow_ref,
                                  primary_tokens, tokens, primary_latency, latency)
        if tokens is not None:
            self.metrics.shadow_comparisons.labels(*pair).inc()
            self.metrics.shadow_exact_matches.labels(*pair).inc(int(tokens == primary_tokens))
            self.metrics.shadow_tokens_compared.labels(*pair).inc(
                max(len(tokens), len(primary_tokens)))
            self.metrics.shadow_tokens_agreeing.labels(*pair).inc(
                sum(a == b for a, b in zip(tokens, primary_tokens)))
            if primary_latency > 0:
                self.metrics.shadow_latency_ratio.labels(*pair).observe(latency / primary_latency)

    async def drain(self, timeout: float) -> None:
        """Wait for the shadows in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def seed_for_shadow(request: GenerationRequest) -> GenerationRequest:
    """Sampled requests without a seed get one, so primary and shadow draw the same
    random numbers and their outputs are comparable (greedy requests are unchanged)."""
    s = request.sampling
    if s.temperature > 0 and s.seed is None:
        return replace(request, sampling=replace(s, seed=random.getrandbits(63)))
    return request


# ---------------------------------------------------------------- the service

class RoutesServicer(pb_grpc.RoutesServicer):
    """SetRoute checks every target against the loaded adapters (a worker thread:
    listing takes the cache's lock); `persist` runs after every change."""

    def __init__(self, router: Router, get_engine: Callable, metrics: Metrics,
                 persist: Callable[[], Awaitable[None]] | None = None):
        self._router = router
        self._get_engine = get_engine
        self._metrics = metrics
        self._persist = persist
        self._holds: dict[str, object] = {}  # name@version -> AdapterVersion held for routes

    async def _guarded(self, context, coro_fn):
        try:
            return await coro_fn()
        except Exception as exc:  # noqa: BLE001  (mapped to a status; bugs are logged)
            code = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("bug in a routes call", exc_info=exc)
                await context.abort(code, f"internal error: {type(exc).__name__}")
            await context.abort(code, str(exc))

    def _info(self, route: Route) -> pb.RouteInfo:
        return route_to_pb(route, self._router.comparisons(route.alias))

    async def _hold_routed_versions(self) -> None:
        """Hold every version a route may send traffic to (targets, shadow, rollback
        history) in the adapter cache, like a request does: a swap of that name then
        retires the old version without freeing it, so `support@v3` 95 / `support@v4` 5
        works across a swap. Versions no route names any more are released."""
        cache = self._get_engine().cache
        wanted = set().union(*(r.refs() for r in self._router.list()))
        for ref in wanted - self._holds.keys():
            try:
                self._holds[ref] = (cache.acquire_resident(ref)
                                    or await asyncio.to_thread(cache.acquire, ref))
            except LoraplexError as exc:  # e.g. a restored route naming a version now gone
                log.warning("route target %s is not held: %s", ref, exc)
        for ref in self._holds.keys() - wanted:
            cache.release(self._holds.pop(ref), served=False)

    async def restored(self, holds: dict[str, object]) -> None:
        """After a restart: adopt the holds the restore took on versions that are not
        current (`AdapterCache.hold_version`), then hold the rest the routes name."""
        self._holds.update(holds)
        await self._hold_routed_versions()

    async def _changed(self, route: Route | None, removed: Route | None = None) -> None:
        await self._hold_routed_versions()
        for r in (removed, route):
            if r is None:
                continue
            for t in r.targets:
                name, version = split_ref(t.ref)
                self._metrics.route_weight.labels(r.alias, name, version).set(
                    0 if r is removed else t.weight)
        if self._persist is not None:
            await self._persist()

    async def _resolve_refs(self, refs: list[str]) -> tuple[dict[str, str], set[str]]:
        """{given ref: name@version} of loaded adapters, and the loaded names."""
        engine = self._get_engine()
        infos = await asyncio.to_thread(engine.adapters.list)
        loaded = {f"{i.name}@{i.version}" for i in infos if i.version}
        current = {i.name: f"{i.name}@{i.version}" for i in infos if i.current and i.version}
        names = {i.name for i in infos if i.version}
        out = {}
        for ref in refs:
            name, version = split_ref(ref)
            if not name:
                raise InvalidArgument(f"adapter {ref!r} must be 'name@version' or 'name'")
            if version:
                if ref not in loaded:
                    have = sorted(k for k in loaded if k.startswith(name + "@"))
                    raise NotFound(f"adapter version {ref!r} is not loaded; load it first "
                                   f"(loaded versions of {name!r}: {', '.join(have) or 'none'})")
                out[ref] = ref
            elif name in current:
                out[ref] = current[name]
            else:
                raise NotFound(f"adapter {name!r} is not loaded; load it first or name an "
                               "exact loaded version as 'name@version'")
        return out, names

    async def SetRoute(self, request, context):
        async def run():
            targets = [Target(t.adapter, float(t.weight)) for t in request.targets]
            shadow = (Shadow(request.shadow.adapter, float(request.shadow.fraction))
                      if request.HasField("shadow") else None)
            guard = guard_from_pb(request)
            from loraplex.routing import validate_route
            validate_route(request.alias, targets, shadow, guard)  # shape first, then lookups
            refs = [t.ref for t in targets] + ([shadow.ref] if shadow else [])
            resolved, names = await self._resolve_refs(refs)
            targets = [Target(resolved[t.ref], t.weight) for t in targets]
            if shadow is not None:
                shadow = Shadow(resolved[shadow.ref], shadow.fraction)
            old = self._router.get(request.alias) if self._router.is_route(request.alias) else None
            route = self._router.set_route(request.alias, targets, shadow, guard, names)
            await self._changed(route, old)
            return self._info(route)
        return await self._guarded(context, run)

    async def GetRoute(self, request, context):
        async def run():
            return self._info(self._router.get(request.alias))
        return await self._guarded(context, run)

    async def ListRoutes(self, request, context):
        async def run():
            return pb.ListRoutesResponse(routes=[self._info(r) for r in self._router.list()])
        return await self._guarded(context, run)

    async def DeleteRoute(self, request, context):
        async def run():
            route = self._router.delete(request.alias)
            await self._changed(None, route)
            return self._info(route)
        return await self._guarded(context, run)

    async def PromoteRoute(self, request, context):
        async def run():
            before = list(self._router.get(request.alias).targets)
            route = self._router.promote(request.alias, request.adapter)
            await self._changed(route, Route(route.alias, tuple(before)))
            return self._info(route)
        return await self._guarded(context, run)

    async def RollbackRoute(self, request, context):
        async def run():
            before = list(self._router.get(request.alias).targets)
            route = self._router.rollback(request.alias)
            await self._changed(route, Route(route.alias, tuple(before)))
            return self._info(route)
        return await self._guarded(context, run)
