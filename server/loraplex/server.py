"""The gRPC server: loraplex services, health, reflection, auth, metrics, shutdown.

    server = LoraplexServer(config)
    await server.start()        # binds, loads the model, warms up, then SERVING
    ...
    await server.shutdown()     # NOT_SERVING, refuse new calls, drain, engine.stop()

`serve(config)` runs one until SIGTERM / SIGINT. Lifecycle:

1. The gRPC port is bound first, with health NOT_SERVING (probes answer while
   the model loads; Generation and Adapters calls get UNAVAILABLE); with
   --http-port, the OpenAI-compatible HTTP API too (loraplex.openai_api), whose
   calls reach the gRPC services over a Unix socket of the same server.
2. The engine is built (in a thread), adapters given with --preload are loaded,
   then, with --data-dir, the adapters and routes saved there are restored
   (an adapter whose files changed since is refused, with a log line), and a
   two-token warm-up request (a prefill, a decode) runs through the base model
   and each preloaded adapter. Only then are "" and the services SERVING.
3. On SIGTERM/SIGINT: health NOT_SERVING (for watchers), and grpc's graceful
   stop starts at once: the port closes (new connections refused, which nginx
   fails over to another replica), open connections get GOAWAY (new streams go
   elsewhere), and every call grpc accepted (started or not, and the last
   status of one that just ended) gets `grace_period` seconds to finish (the
   stop ends as soon as the last call does; a long-lived stream such as a health
   Watch holds it until the deadline, when grpc cancels what is left). The HTTP
   listener closes at the same time; its requests in flight end with their gRPC
   calls. Then the engine stops and the metrics endpoint closes. grpc core itself drops
   (CANCELLED) a stream that reaches it in the instant of the stop, before any
   handler.
4. If `max_step_failures` engine steps fail in a row (a bug; a CUDA error, which
   poisons the process, at once), the engine ends every request with an error and
   refuses new ones, and the server shuts down as in 3; so it does when one step
   runs longer than `step_timeout` (a hung GPU). `serve` then returns exit status
   1, for the supervisor to restart the replica.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from loraplex.api.auth import (ADAPTERS_SERVICE, GENERATION_SERVICE, ROUTES_SERVICE,
                               GateInterceptor, InFlight)
from loraplex.api.routes import RoutesServicer
from loraplex.api.servicers import AdaptersServicer, GenerationServicer
from loraplex.config import Config
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.engine.threads import helper_executor
from loraplex.errors import Unavailable
from loraplex.metrics import Metrics, response_store_gauges
from loraplex.routing import Route, Router
from loraplex.state import AdapterEntry, State, StateStore
from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = (GENERATION_SERVICE, ADAPTERS_SERVICE, ROUTES_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CannotServe(Exception):
    """The engine refused the model or its options at start-up (a ValueError that says
    why: a model family loraplex does not serve, a KV cache too small, ...)."""


def _default_engine_factory(config: Config, metrics: Metrics):
    from loraplex.engine.engine import Engine  # torch: import only when serving

    return Engine.build(config.model, config.engine, config.server.adapter_root, metrics=metrics)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class LoraplexServer:
    def __init__(self, config: Config,
                 engine_factory: Callable[[Config, Metrics], object] = _default_engine_factory,
                 routing_rng: random.Random | None = None):
        self.config = config
        self.metrics = Metrics()
        self.engine = None  # set once warm
        self.port: int | None = None  # the bound gRPC port (useful with port 0)
        self.metrics_port: int | None = None
        self._engine_factory = engine_factory
        self._in_flight = InFlight()
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self.http = None  # the OpenAI-compatible API (loraplex.openai_api), with --http-port
        self.http_port: int | None = None
        self._socket_dir: str | None = None  # its way to the gRPC services: a Unix socket
        self.shutting_down = asyncio.Event()  # set once shutdown has begun
        self._stopped = asyncio.Event()
        self.router = Router(routing_rng, metrics=self.metrics, on_change=self._state_changed)
        self.state = StateStore(config.server.data_dir) if config.server.data_dir else None
        self.generation: GenerationServicer | None = None
        self._save_task: asyncio.Task | None = None
        self.engine_failed = False  # the engine gave up or hung; the server shuts itself down
        self._failure_shutdown: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self.engine_hung = False  # its thread did not stop: run_until_signal exits hard

    def _ready_engine(self):
        if self.engine is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine

    async def _set_health(self, status) -> None:
        for service in ("",) + SERVICES:
            await self._health.set(service, status)

    def _build_grpc_server(self) -> grpc.aio.Server:
        s = self.config.server
        tokens = {GENERATION_SERVICE: s.generate_token, ADAPTERS_SERVICE: s.admin_token,
                  ROUTES_SERVICE: s.admin_token}
        server = grpc.aio.server(
            interceptors=[GateInterceptor(tokens, in_flight=self._in_flight)],
            options=[("grpc.so_reuseport", 0)])
        self.generation = GenerationServicer(self._ready_engine, self.metrics, self.router)
        pb_grpc.add_GenerationServicer_to_server(self.generation, server)
        pb_grpc.add_AdaptersServicer_to_server(
            AdaptersServicer(self._ready_engine, on_change=self.save_state,
                             router=self.router), server)
        self.routes = RoutesServicer(self.router, self._ready_engine, self.metrics,
                                     persist=self.save_state)
        pb_grpc.add_RoutesServicer_to_server(self.routes, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [pb.DESCRIPTOR.services_by_name[n].full_name
                 for n in ("Generation", "Adapters", "Routes")]
        reflection.enable_server_reflection(
            names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = _address(s.host, s.port)
        if s.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if s.http_port:
            self._socket_dir = tempfile.mkdtemp(prefix="loraplex-")  # (mode 0700)
            server.add_insecure_port(f"unix:{self._socket_dir}/grpc.sock")
        return server

    async def start(self) -> None:
        """Bind, load the model, warm up; returns once the server is SERVING."""
        s = self.config.server
        # blocking work (adapter loads, merges, state) runs torch on one thread: the
        # engine thread owns the CPU's intra-op threads (engine/threads.py)
        asyncio.get_running_loop().set_default_executor(helper_executor("loraplex-worker"))
        await self._set_health(_NOT_SERVING)
        self._server = self._build_grpc_server()
        await self._server.start()
        log.info("gRPC listening on %s (TLS %s)", _address(s.host, self.port),
                 "on" if s.tls_cert else "off")
        if s.metrics_port:
            self._metrics_httpd, _ = start_http_server(s.metrics_port, addr=s.host,
                                                       registry=self.metrics.registry)
            self.metrics_port = self._metrics_httpd.server_port
            log.info("Prometheus metrics on http://%s/metrics",
                     _address(s.host, self.metrics_port))
        if s.http_port:
            from loraplex.openai_api import HttpServer  # (aiohttp: only when asked for)

            self.http = HttpServer(f"unix:{self._socket_dir}/grpc.sock", s.host, s.http_port,
                                   s.served_model_name or self.config.model.path,
                                   list_token=s.admin_token,
                                   tls=(s.tls_cert, s.tls_key) if s.tls_cert else None,
                                   requests=self.metrics.http_requests,
                                   tool_call_parser=s.tool_call_parser,
                                   reasoning_parser=s.reasoning_parser,
                                   response_store_mb=s.response_store_mb)
            if self.http.store is not None:
                response_store_gauges(self.metrics.registry, self.http.store)
            await self.http.start()
            self.http_port = self.http.port
            log.info("OpenAI-compatible API on %s://%s/v1", "https" if s.tls_cert else "http",
                     _address(s.host, self.http_port))
        try:
            engine = await asyncio.to_thread(self._engine_factory, self.config, self.metrics)
        except ValueError as exc:  # (the model, or the engine's options for it)
            raise CannotServe(str(exc)) from exc
        loop = asyncio.get_running_loop()
        engine.start(on_failure=lambda: loop.call_soon_threadsafe(
            lambda: self._stop_on_failure(engine.failure)))
        for name, path in s.preload:
            info = await asyncio.to_thread(engine.adapters.load, name, path or None)
            log.info("preloaded adapter %s@%s from %s", info.name, info.version, info.path)
        holds = {}
        if self.state is not None:
            holds = await asyncio.to_thread(self._restore, engine)
        await self._warm_up(engine, [""] + [name for name, _ in s.preload])
        self.engine = engine
        if self.config.engine.step_timeout:
            self._watchdog = asyncio.ensure_future(
                self._watch_steps(engine, self.config.engine.step_timeout))
        await self.routes.restored(holds)
        await self._set_health(_SERVING)
        log.info("serving %s", getattr(engine, "model_name", self.config.model.path))

    def _stop_on_failure(self, why: str) -> None:
        """The engine gave up or hung: stop serving, so that probes and proxies see
        NOT_SERVING and `serve` exits with status 1 for its supervisor (systemd, Docker,
        Kubernetes) to restart it. During start, the warm-up fails start() instead."""
        self.engine_failed = True
        if self.engine is not None and not self.shutting_down.is_set():
            log.error("stopping: %s", why)
            self._failure_shutdown = asyncio.ensure_future(self.shutdown())

    async def _watch_steps(self, engine, timeout: float) -> None:
        """`_stop_on_failure` once one engine step has run `timeout` seconds: a hung GPU
        never returns, and the engine thread cannot be interrupted."""
        while not self.shutting_down.is_set():
            await asyncio.sleep(min(timeout / 4, 5.0))
            busy = engine.busy_for()
            if busy > timeout:
                self._stop_on_failure(f"an engine step has run for {busy:.0f} s "
                                      f"(--step-timeout {timeout:g} s): the engine is hung")

    async def _warm_up(self, engine, adapters: list[str]) -> None:
        """One two-token request per adapter (a prefill step, a decode step), so the first
        real request pays no first-call costs (a kernel's compile among them, which then
        runs before the step watchdog starts) and a broken model or adapter fails the
        start."""
        ids = list(engine.tokenizer.encode("Hello")) or [0]
        for adapter in adapters:
            req = GenerationRequest(prompt_ids=ids, adapter=adapter,
                                    sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
            async for out in engine.submit(req):
                if out.finished and out.error:
                    raise RuntimeError(f"warm-up of adapter {adapter!r} failed: {out.error}")

    async def shutdown(self, grace: float | None = None) -> None:
        """Close the port, NOT_SERVING, let calls in flight finish for `grace` seconds
        (default: the configured grace period), stop the engine."""
        if self.shutting_down.is_set():
            await self._stopped.wait()
            return
        self.shutting_down.set()
        grace = self.config.server.grace_period if grace is None else grace
        log.info("shutting down: %d call(s) in flight get %.1f s", self._in_flight.count, grace)
        stopping = None
        try:
            if self._server is not None:
                # grpc's graceful stop, first thing: the listener closes (new connections
                # are refused, which a proxy fails over to another replica), open
                # connections get GOAWAY (new streams go elsewhere; gRPC clients retry
                # them transparently), and grpc lets every call it has accepted finish:
                # also one accepted a moment ago whose handler has not run yet, and
                # the status of one whose handler just returned.
                stopping = asyncio.ensure_future(self._server.stop(grace))
                await asyncio.sleep(0)  # the stop starts (the port closes) now
            if self.http is not None:
                await self.http.stop_listening()  # (its requests in flight go on)
            await self._health.enter_graceful_shutdown()
            if self.generation is not None and self.generation.shadows is not None:
                await self.generation.shadows.drain(min(grace, 5.0))
        finally:
            try:
                if stopping is not None:
                    # One stop call only: grpc ends it when the last call ends, or cancels
                    # what is left at the grace deadline. (A second, shorter stop while
                    # the first is pending crashed grpcio 1.85's aio server in CI.)
                    await stopping
                if self.http is not None:
                    await self.http.close()  # (its gRPC calls have ended)
                if self._socket_dir is not None:
                    shutil.rmtree(self._socket_dir, ignore_errors=True)
                if self.engine is not None and self.state is not None:
                    try:
                        await self.save_state()
                    except Exception:  # noqa: BLE001  (e.g. a full disk: stop all the same)
                        log.exception("could not save the state to %s", self.state.path)
                if self.engine is not None:
                    # a failed engine's loop only idles: waiting longer means a hung step
                    wait = 2.0 if self.engine_failed else 30.0
                    if not await asyncio.to_thread(self.engine.stop, wait):
                        log.error("the engine thread did not stop within %g s (a hung step); "
                                  "exiting without it", wait)
                        self.engine_failed = self.engine_hung = True
                if self._metrics_httpd is not None:
                    self._metrics_httpd.shutdown()
                    self._metrics_httpd.server_close()
            finally:  # whatever raised above, wait_stopped and run_until_signal return
                if self._watchdog is not None and self._watchdog is not asyncio.current_task():
                    self._watchdog.cancel()
                self._stopped.set()
                log.info("stopped")

    # ---- persistence (--data-dir) -------------------------------------------------

    def _snapshot(self) -> State:
        """The adapter registry (current versions, and the older versions routes still
        name; paths relative to the adapter root) and the routes, as they are now.
        Blocking (lists the cache)."""
        root = os.path.realpath(self.config.server.adapter_root)
        routes = self.router.list()
        routed = set().union(*(r.refs() for r in routes))
        adapters = [AdapterEntry(i.name, i.version, os.path.relpath(i.path, root), i.current)
                    for i in self.engine.adapters.list()
                    if i.version and (i.current or f"{i.name}@{i.version}" in routed)]
        return State(adapters=adapters, routes=[r.to_json() for r in routes])

    async def save_state(self) -> None:
        """Write the state file now (in a worker thread); no-op without --data-dir."""
        if self.state is None or self.engine is None:
            return
        await asyncio.to_thread(lambda: self.state.save(self._snapshot()))

    def _state_changed(self) -> None:
        """The router changed on its own (a guard tripped): save soon, off the caller's path."""
        if self.state is None or self.engine is None:
            return
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.get_running_loop().create_task(self.save_state())

    def _restore(self, engine) -> dict:
        """Load the saved adapters (refusing any whose files changed) and routes. Returns
        the holds taken on older versions that routes name ({name@version: held})."""
        saved = self.state.load()
        current = {i.name: i.version for i in engine.adapters.list() if i.current and i.version}
        holds = {}
        for e in saved.adapters:
            if not e.current:
                continue
            if e.name in current:
                if current[e.name] != e.version:
                    log.error("saved adapter %s@%s not restored: %s is already loaded (from "
                              "--preload) as version %s", e.name, e.version, e.name, current[e.name])
                continue
            try:
                info = engine.adapters.load(e.name, e.path)
            except Exception as exc:  # noqa: BLE001  (a missing folder must not stop the server)
                log.error("saved adapter %s@%s not restored from %s: %s", e.name, e.version,
                          e.path, exc)
                continue
            if info.version != e.version:
                engine.adapters.unload(e.name, drain=False, timeout=0)
                log.error("saved adapter %s@%s REFUSED: the files in %s changed since (now "
                          "version %s); load or swap it again to serve the new files",
                          e.name, e.version, e.path, info.version)
                continue
            log.info("restored adapter %s@%s from %s", e.name, e.version, e.path)
        for e in saved.adapters:
            if e.current:
                continue
            try:
                holds[f"{e.name}@{e.version}"] = engine.cache.hold_version(e.name, e.version, e.path)
            except Exception as exc:  # noqa: BLE001  (the route's other targets still serve)
                log.error("saved adapter %s@%s (not current, named by a route) not restored "
                          "from %s: %s", e.name, e.version, e.path, exc)
                continue
            log.info("restored adapter %s@%s from %s for the routes that name it", e.name,
                     e.version, e.path)
        loaded = {f"{i.name}@{i.version}" for i in engine.adapters.list() if i.version}
        routes = []
        for d in saved.routes:
            try:
                route = Route.from_json(d)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("saved route %r not restored: %s", d.get("alias"), exc)
                continue
            missing = [t.ref for t in route.targets if t.ref not in loaded]
            if missing:
                log.warning("restored route %s points at versions that are not loaded: %s",
                            route.alias, ", ".join(missing))
            for t in route.targets:
                name, _, version = t.ref.partition("@")
                self.metrics.route_weight.labels(route.alias, name, version).set(t.weight)
            routes.append(route)
        self.router.load(routes)
        log.info("restored %d adapter(s) and %d route(s) from %s", len(saved.adapters),
                 len(routes), self.state.path)
        return holds

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run_until_signal(self) -> int:
        """start(), then shutdown() on SIGTERM or SIGINT, or when the engine has failed.
        Returns the exit status: 1 if the engine failed, else 0."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        try:
            await self.start()
            _freeze_startup_heap()  # (the process is ours: an embedding app's heap is not)
            waits = [asyncio.ensure_future(e.wait()) for e in (signalled, self._stopped)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            await self.shutdown()
        if self.engine_hung:  # threads stuck on the device could block a normal exit
            logging.shutdown()
            os._exit(1)
        return 1 if self.engine_failed else 0


def _freeze_startup_heap() -> None:
    """Move every object alive after start-up (torch, transformers, the model's modules:
    some 400,000 objects) out of the garbage collector's reach, as vLLM does. A full
    collection holds the GIL while it scans them all, some 150 ms on this CPU, and one
    comes whenever a request allocates many objects that live (a guide's automaton):
    every stream waited that long for its next token. Frozen objects are still freed
    when unreferenced; only cycles among them stay."""
    gc.collect()
    gc.freeze()


def serve(config: Config) -> int:
    """Run a server until a signal (exit status 0) or an engine failure (1); 2 when the
    model cannot be served as configured (the engine says why, e.g. a family it refuses)."""
    try:
        return asyncio.run(LoraplexServer(config).run_until_signal())
    except CannotServe as exc:
        log.error("cannot serve %s: %s", config.model.path, exc)
        return 2
