"""Adapters in memory: versions, a CPU-memory LRU and the slots next to the base model.

Tiers: disk (the store) -> CPU copy (`AdapterVersion.weights`, LRU of at most
`max_cpu` versions) -> a slot in every LoraLinear's pool (at most `max_gpu`).
The slot tier is inclusive: a version in a slot keeps its CPU copy.

Two kinds of holds keep a version in memory:
- a reference per request that names it, from submission until it finishes
  (`acquire` / `release`): the CPU copy is never evicted while referenced;
- a pin per running sequence (`pin` / `unpin`, called by the scheduler on the
  engine thread): the slot is never reused while pinned.

An adapter is `name@version`; a version is immutable (hash of its files).
`swap` makes a new version current atomically; requests holding the old one
finish on it, and it is freed with its last reference. One lock guards all of
this state; disk reads happen outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from loraplex.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from loraplex.lora.layer import LoraLinear
from loraplex.lora.store import AdapterStore, AdapterWeights
from loraplex.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: str
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    tier: str  # "gpu" (in a slot) | "cpu" | "disk"
    current: bool  # the version a bare `name` resolves to
    in_use: int  # requests holding it now
    requests_served: int
    last_used: float | None  # unix time
    load_time_s: float | None


class AdapterVersion:
    def __init__(self, weights: AdapterWeights, relpath: str, load_time_s: float):
        self.name = weights.name
        self.version = weights.version
        self.relpath = relpath
        self.meta = weights  # keeps rank, alpha, targets, size; `modules` is dropped on eviction
        self.weights: AdapterWeights | None = weights
        self.slot: int | None = None
        self.refs = 0
        self.pins = 0
        self.requests_served = 0
        self.last_used: float | None = None
        self.load_time_s = load_time_s
        self.retired = False  # swapped out or unloaded: freed when refs reach 0

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def rank(self) -> int:
        return self.meta.rank


def parse_adapter_ref(ref: str) -> tuple[str, str | None]:
    """'name' -> (name, None); 'name@version' -> (name, version)."""
    name, _, version = ref.partition("@")
    if not name or (ref.count("@") and not version) or ref.count("@") > 1:
        raise InvalidArgument(f"adapter must be 'name' or 'name@version', got {ref!r}")
    return name, version or None


class AdapterCache:
    def __init__(self, store: AdapterStore, layers: dict[str, LoraLinear], max_gpu: int,
                 max_cpu: int, metrics: Metrics, base_model: str = ""):
        self.store = store
        self.layers = layers
        self.module_shapes = {n: (l.in_features, l.out_features) for n, l in layers.items()}
        self.max_gpu = max_gpu
        self.max_cpu = max_cpu
        self.metrics = metrics
        self.base_model = base_model
        self.slot_ranks = [0] * (max_gpu + 1)  # read by the runner; slot 0 = no adapter
        self._slots: list[AdapterVersion | None] = [None] * (max_gpu + 1)
        self._current: dict[str, AdapterVersion] = {}
        self._versions: dict[str, AdapterVersion] = {}  # key -> every version in memory
        self._cpu: OrderedDict[str, AdapterVersion] = OrderedDict()  # key -> version, LRU first
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)
        self._loading: dict[str, threading.Lock] = {}

    # ---- requests (any thread) -------------------------------------------------

    def acquire(self, ref: str) -> AdapterVersion:
        """Resolve 'name' or 'name@version', loading it from disk if needed, and hold it
        for one request. May read from disk: call it off the event loop."""
        name, version = parse_adapter_ref(ref)
        with self._lock:
            av = self._find(name, version)
            if av is not None and av.weights is not None:
                av.refs += 1
                self._cpu.move_to_end(av.key)
                return av
        if version is not None and av is None:
            raise NotFound(f"adapter version {ref!r} is not loaded; loaded versions of {name!r}: "
                           f"{self._version_list(name) or 'none'}")
        av = self._load(name, av.relpath if av else None, expect=av)
        with self._lock:
            av.refs += 1
            return av

    def release(self, av: AdapterVersion, served: bool = True) -> None:
        with self._lock:
            av.refs -= 1
            av.requests_served += int(served)
            av.last_used = time.time()
            if av.retired and av.refs == 0:
                self._free(av)
            self._released.notify_all()

    # ---- slots (engine thread, through the scheduler) --------------------------

    def has_slot(self, av: AdapterVersion) -> bool:
        return av.slot is not None

    def can_pin(self, av: AdapterVersion) -> bool:
        with self._lock:
            return av.slot is not None or self._slot_to_fill() is not None

    def pin(self, av: AdapterVersion) -> int:
        with self._lock:
            if av.slot is None:
                self._fill_slot(av)
                self.metrics.adapter_cache_misses.labels("cpu").inc()
            else:
                self.metrics.adapter_cache_hits.inc()
            av.pins += 1
            return av.slot

    def unpin(self, av: AdapterVersion) -> None:
        with self._lock:
            av.pins -= 1

    def _slot_to_fill(self) -> int | None:
        """A free slot, else the least recently used idle one, else None."""
        idle = []
        for i in range(1, len(self._slots)):
            holder = self._slots[i]
            if holder is None:
                return i
            if holder.pins == 0:
                idle.append((holder.last_used or 0.0, i))
        return min(idle)[1] if idle else None

    def _fill_slot(self, av: AdapterVersion) -> None:
        slot = self._slot_to_fill()
        if slot is None:
            raise RuntimeError("no adapter slot free; the scheduler must call can_pin first")
        if self._slots[slot] is not None:
            self._slots[slot].slot = None
            self.metrics.adapter_evictions.labels("gpu").inc()
        start = time.perf_counter()
        modules = av.weights.modules
        for name, layer in self.layers.items():
            A, B = modules.get(name, (None, None))
            layer.set_slot(slot, A, B)
        self._slots[slot] = av
        self.slot_ranks[slot] = av.rank
        av.slot = slot
        self.metrics.adapter_loads.labels("gpu").inc()
        self.metrics.adapter_load_time.labels("gpu").observe(time.perf_counter() - start)
        self._update_gauges()

    # ---- management (API threads) ----------------------------------------------

    def load(self, name: str, relpath: str | None = None) -> AdapterInfo:
        """Load `relpath` (default: the folder named `name`) as `name`; idempotent when the
        same content is already loaded under that name."""
        with self._lock:
            current = self._current.get(name)
        if current is None:
            return self.info(self._load(name, relpath, expect=None))
        weights, _ = self._read(name, relpath or current.relpath)
        if weights.version != current.version:
            raise AlreadyExists(f"adapter {name!r} is already loaded as {current.key}; "
                                f"use SwapAdapter to replace it with version {weights.version}")
        return self.info(current)

    def swap(self, name: str, relpath: str) -> AdapterInfo:
        """Make the adapter at relpath the current version of `name` (atomically)."""
        weights, seconds = self._read(name, relpath)
        with self._lock:
            old = self._current.get(name)
            if old is not None and old.version == weights.version:
                return self.info(old)
            av = self._register(weights, relpath, seconds, make_current=True)
            if old is not None:
                self._retire(old)
            return self.info(av)

    def unload(self, name: str, drain: bool, timeout: float) -> list[AdapterInfo]:
        """Forget every version of `name` and free its memory. With requests in flight:
        drain=True waits for them (up to timeout), drain=False refuses."""
        with self._lock:
            versions = [v for v in self._versions.values() if v.name == name]
            if not versions:
                raise NotFound(f"adapter {name!r} is not loaded")
            busy = sum(v.refs for v in versions)
            if busy and not drain:
                raise FailedPrecondition(
                    f"adapter {name!r} is used by {busy} request(s); retry later or unload with "
                    "drain=true to wait for them")
            infos = [self.info(v) for v in versions]
            self._current.pop(name, None)
            for v in versions:
                self._retire(v)
            deadline = time.monotonic() + timeout
            while any(v.refs for v in versions):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FailedPrecondition(
                        f"adapter {name!r} still had requests after {timeout:.0f}s of draining; "
                        "it takes no new requests and is freed when they finish")
                self._released.wait(left)
            return infos

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            infos = [self.info(v) for v in self._versions.values()]
            known = {v.name for v in self._versions.values()}
        for name, folder in self.store.scan().items():
            if name not in known:
                infos.append(self._disk_info(name, folder))
        return sorted(infos, key=lambda i: (i.name, not i.current, i.version))

    def info(self, av: AdapterVersion) -> AdapterInfo:
        m = av.meta
        tier = "gpu" if av.slot is not None else "cpu" if av.weights is not None else "disk"
        return AdapterInfo(
            name=av.name, version=av.version, path=m.path, rank=m.rank, alpha=m.alpha,
            target_modules=m.target_modules, size_bytes=m.size_bytes, tier=tier,
            current=self._current.get(av.name) is av, in_use=av.refs,
            requests_served=av.requests_served, last_used=av.last_used,
            load_time_s=av.load_time_s)

    def resident_bytes(self) -> int:
        """Bytes of adapter weights held in CPU memory (what unload must give back)."""
        with self._lock:
            return sum(v.meta.size_bytes for v in self._cpu.values())

    # ---- internals ---------------------------------------------------------------

    def _find(self, name: str, version: str | None) -> AdapterVersion | None:
        if version is None:
            return self._current.get(name)
        return self._versions.get(f"{name}@{version}")

    def _version_list(self, name: str) -> str:
        with self._lock:
            return ", ".join(sorted(v.version for v in self._versions.values() if v.name == name))

    def _read(self, name: str, relpath: str | None) -> tuple[AdapterWeights, float]:
        start = time.perf_counter()
        weights = self.store.read(name, relpath or name, self.module_shapes)
        seconds = time.perf_counter() - start
        if self.base_model and weights.base_model and weights.base_model != self.base_model:
            log.warning("adapter %s was trained on %r, served on %r (shapes match)",
                        name, weights.base_model, self.base_model)
        self.metrics.adapter_loads.labels("cpu").inc()
        self.metrics.adapter_load_time.labels("cpu").observe(seconds)
        return weights, seconds

    def _load(self, name: str, relpath: str | None,
              expect: AdapterVersion | None) -> AdapterVersion:
        """Bring `name` into CPU memory once, even when several threads ask at the same time."""
        with self._lock:
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:
            with self._lock:
                known = expect if expect is not None else self._current.get(name)
                if known is not None and known.weights is not None and relpath in (None, known.relpath):
                    return known
            weights, seconds = self._read(name, relpath)
            with self._lock:
                if expect is not None:
                    if weights.version != expect.version:
                        raise FailedPrecondition(
                            f"the files of {expect.key} changed on disk (now version "
                            f"{weights.version}); use SwapAdapter to serve the new files")
                    expect.weights = weights
                    self._cpu[expect.key] = expect
                    self._evict_cpu()
                    return expect
                same = self._versions.get(f"{name}@{weights.version}")
                if same is not None:  # a retired version still finishing requests comes back
                    same.retired = False
                    self._current[name] = same
                    return same
                return self._register(weights, relpath or name, seconds, make_current=True)

    def _register(self, weights: AdapterWeights, relpath: str, seconds: float,
                  make_current: bool) -> AdapterVersion:
        av = AdapterVersion(weights, relpath, seconds)
        self._versions[av.key] = av
        self._cpu[av.key] = av
        if make_current:
            self._current[av.name] = av
        self._evict_cpu()
        self._update_gauges()
        return av

    def _retire(self, av: AdapterVersion) -> None:
        av.retired = True
        if av.refs == 0:
            self._free(av)

    def _free(self, av: AdapterVersion) -> None:
        """Drop a retired version's slot and CPU copy."""
        if av.slot is not None:
            for layer in self.layers.values():
                layer.set_slot(av.slot, None, None)
            self._slots[av.slot] = None
            self.slot_ranks[av.slot] = 0
            av.slot = None
        av.weights = None
        self._cpu.pop(av.key, None)
        self._versions.pop(av.key, None)
        if self._current.get(av.name) is av:
            del self._current[av.name]
        self._update_gauges()

    def _evict_cpu(self) -> None:
        """Drop least recently used idle CPU copies beyond max_cpu (never one in use or in a slot)."""
        excess = len(self._cpu) - self.max_cpu
        for key in list(self._cpu):
            if excess <= 0:
                break
            av = self._cpu[key]
            if av.refs == 0 and av.slot is None:
                av.weights = None
                del self._cpu[key]
                excess -= 1
                self.metrics.adapter_evictions.labels("cpu").inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.adapters_resident.labels("gpu").set(sum(s is not None for s in self._slots))
        self.metrics.adapters_resident.labels("cpu").set(len(self._cpu))

    def _disk_info(self, name: str, folder) -> AdapterInfo:
        return AdapterInfo(name=name, version="", path=str(folder), rank=0, alpha=0.0,
                           target_modules=(), size_bytes=0, tier="disk", current=False, in_use=0,
                           requests_served=0, last_used=None, load_time_s=None)
