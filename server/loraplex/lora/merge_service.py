"""MergeAdapters on a running server: sources from the cache, result into the root, served at once.

The math is ``merge.merge_adapters`` (PEFT's ``add_weighted_adapter``); this
module is the plumbing around it:

1. check the new name: a folder under the adapter root that does not exist
   (``AdapterStore.new_folder``: PermissionDenied outside the root,
   AlreadyExists if taken) and is not loaded, and reserve it so two merges
   cannot race for it;
2. resolve every source like a request does (``"name"`` or ``"name@version"``
   through ``AdapterCache.acquire``, which holds the version until the merge
   ends, so a swap meanwhile cannot free it) and read its raw, unscaled
   tensors and per-module scalings from its folder
   (``AdapterStore.read_lora_tensors``), checking that the files still are
   the version that was resolved;
3. merge on the CPU, in the calling thread (the servicer calls from a worker
   thread that runs torch on one CPU thread, see engine/threads.py: the engine
   thread keeps stepping; the only shared resources are
   CPU cores and the GIL, which torch releases inside its kernels), modules
   in the served model's ``named_modules()`` order so a seeded DARE merge
   draws the same masks as PEFT;
4. write a PEFT folder into a hidden folder at the top of the root and rename it
   into place (``AdapterStore.place``: readers never see half a folder, ``scan``
   skips hidden folders, and no link swapped in meanwhile is followed), then
   ``cache.load`` it and return its ``AdapterInfo``.

Progress and cancellation. ``merge_adapters`` reports after each module and
polls a stop flag before each one. Progress is exposed three ways, simply:
INFO log lines (start, every 10 % of the modules, end with the time taken),
``MergeService.jobs()`` (a snapshot of running and recent merges: modules
done / total, state, seconds), and an optional ``progress(done, total)``
callback. A merge stops with ``Cancelled`` (nothing is written) when the
caller's ``should_stop()`` returns True or ``MergeService.cancel(name)`` is
called.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from loraplex.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument
from loraplex.lora.cache import AdapterCache, AdapterInfo
from loraplex.lora.merge import LoraTensors, merge_adapters, save_peft_folder

log = logging.getLogger(__name__)

RECENT_JOBS = 16  # finished merges kept for jobs()


@dataclass(frozen=True)
class MergeJob:
    """One merge, as ``jobs()`` shows it."""

    name: str
    sources: tuple[str, ...]
    combination_type: str
    state: str  # "reading" | "merging" | "writing" | "done" | "failed" | "cancelled"
    modules_done: int
    modules_total: int  # 0 until the sources are read
    started: float  # unix time
    seconds: float  # so far, or in all once finished
    error: str = ""


class MergeService:
    """Merges for one AdapterCache (get it with ``service_for(cache)``)."""

    def __init__(self, cache: AdapterCache):
        self.cache = cache
        self.store = cache.store
        self._lock = threading.Lock()
        self._jobs: dict[str, MergeJob] = {}  # running, by new name
        self._stop: dict[str, threading.Event] = {}
        self._recent: list[MergeJob] = []

    def jobs(self) -> list[MergeJob]:
        """Running merges, then the last finished ones (newest last)."""
        now = time.time()
        with self._lock:
            running = [replace(j, seconds=now - j.started) for j in self._jobs.values()]
            return list(self._recent) + running

    def cancel(self, name: str) -> bool:
        """Ask the running merge into ``name`` to stop; False if there is none."""
        with self._lock:
            event = self._stop.get(name)
        if event is None:
            return False
        event.set()
        return True

    def merge(self, name: str, sources: Sequence[str], weights: Sequence[float] | None = None,
              combination_type: str = "linear", density: float | None = None,
              majority_sign_method: str = "total", svd_rank: int | None = None,
              seed: int | None = None, *, should_stop: Callable[[], bool] | None = None,
              progress: Callable[[int, int], None] | None = None) -> AdapterInfo:
        """Merge ``sources`` into the new adapter ``name``, write it, serve it; blocking.

        Errors: InvalidArgument (parameters), NotFound (a source), FailedPrecondition
        (sources that cannot be merged this way, a result above the server's max
        rank), AlreadyExists (``name`` taken), PermissionDenied (``name`` leads
        outside the adapter root), Cancelled.
        """
        sources = list(sources)
        if not sources:
            raise InvalidArgument("sources is empty: name at least one adapter to merge")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise InvalidArgument(f"got {len(weights)} weights for {len(sources)} sources; "
                                  "give exactly one weight per source")
        self.store.new_folder(name)  # refuses a bad or taken name before any work
        stop = self._reserve(name, sources, combination_type)
        start = time.perf_counter()
        try:
            info = self._run(name, sources, weights, combination_type, density,
                             majority_sign_method, svd_rank, seed,
                             lambda: stop.is_set() or bool(should_stop and should_stop()), progress)
        except Cancelled as exc:
            self._finish(name, "cancelled", str(exc))
            log.info("merge into %r cancelled after %.2fs: %s", name, time.perf_counter() - start, exc)
            raise
        except BaseException as exc:
            self._finish(name, "failed", str(exc))
            raise
        self._finish(name, "done")
        log.info("merged %s (%s) into %s (rank %d) in %.2fs", ", ".join(sources), combination_type,
                 info.name + "@" + info.version, info.rank, time.perf_counter() - start)
        return info

    # ---- steps -------------------------------------------------------------------

    def _run(self, name, sources, weights, combination_type, density, majority_sign_method,
             svd_rank, seed, stopped, progress) -> AdapterInfo:
        tensors = self._read_sources(sources, stopped)
        self._update(name, state="merging")

        def on_module(done: int, total: int) -> None:
            self._update(name, modules_done=done, modules_total=total)
            if done % max(1, total // 10) == 0 or done == total:
                log.info("merge into %r: %d/%d modules", name, done, total)
            if progress is not None:
                progress(done, total)

        result = merge_adapters(tensors, weights, combination_type, svd_rank=svd_rank, density=density,
                                majority_sign_method=majority_sign_method, seed=seed,
                                module_order=list(self.cache.layers), progress=on_module,
                                should_stop=stopped)
        self._check_servable(result)
        if stopped():
            raise Cancelled("merge cancelled before its result was written")
        self._update(name, state="writing")
        folder = self._write(result, name)
        try:
            return self.cache.load(name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # never leave a name taken by a failed merge
            raise

    def _read_sources(self, refs: list[str], stopped) -> list[LoraTensors]:
        held = []
        try:
            for ref in refs:
                held.append(self.cache.acquire(ref))  # NotFound / InvalidArgument for bad refs
            out = []
            for av in held:
                if stopped():
                    raise Cancelled("merge cancelled while reading its sources")
                tensors, version = self.store.read_lora_tensors(av.name, av.relpath, self.cache.module_shapes,
                                                                self.cache.off_text_linears)
                if version != av.version:
                    raise FailedPrecondition(
                        f"the files of {av.key} changed on disk (now version {version}); "
                        "swap the adapter to the new files or restore them, then merge again")
                out.append(tensors)
            return out
        finally:
            for av in held:
                self.cache.release(av, served=False)

    def _check_servable(self, result: LoraTensors) -> None:
        rank = max(a.shape[0] for a, _ in result.modules.values())
        if rank > self.store.max_rank:
            hint = " or a smaller svd_rank" if rank == result.r else ""
            raise FailedPrecondition(
                f"the merged adapter would have rank {rank}, above the server's max rank "
                f"{self.store.max_rank}; use an svd combination type{hint}, or restart the server "
                f"with --max-lora-rank >= {rank}")

    def _write(self, result: LoraTensors, name: str) -> Path:
        """PEFT folder root/name, all or nothing: a hidden folder renamed into place."""
        staged = self.store.staging_folder(name)
        try:
            save_peft_folder(result, str(staged), self.cache.base_model)
            with self._lock:  # new_folder checked the name before the merge; place again
                return self.store.place(staged, name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    # ---- job bookkeeping -----------------------------------------------------------

    def _reserve(self, name: str, sources: list[str], combination_type: str) -> threading.Event:
        loaded = {info.name for info in self.cache.list() if info.tier != "disk"}
        with self._lock:
            if name in self._jobs:
                raise AlreadyExists(f"a merge into {name!r} is already running")
            if name in loaded:
                raise AlreadyExists(f"adapter {name!r} is already loaded; choose a new name")
            self._jobs[name] = MergeJob(name=name, sources=tuple(sources), combination_type=combination_type,
                                        state="reading", modules_done=0, modules_total=0,
                                        started=time.time(), seconds=0.0)
            event = self._stop[name] = threading.Event()
        log.info("merging %s (%s) into %r", ", ".join(sources), combination_type, name)
        return event

    def _update(self, name: str, **changes) -> None:
        with self._lock:
            self._jobs[name] = replace(self._jobs[name], **changes)

    def _finish(self, name: str, state: str, error: str = "") -> None:
        with self._lock:
            job = self._jobs.pop(name)
            self._stop.pop(name, None)
            self._recent.append(replace(job, state=state, error=error, seconds=time.time() - job.started))
            del self._recent[:-RECENT_JOBS]


_services: weakref.WeakKeyDictionary[AdapterCache, MergeService] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


def service_for(cache: AdapterCache) -> MergeService:
    """The one MergeService of ``cache`` (made on first use)."""
    with _services_lock:
        service = _services.get(cache)
        if service is None:
            service = _services[cache] = MergeService(cache)
        return service
