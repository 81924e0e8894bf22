"""Adapters in memory: versions, a CPU-memory LRU and the slots next to the base model.

Tiers: disk (the store) -> CPU copy (`AdapterVersion.weights`; pinned memory when
the model is on CUDA) -> a slot in every LoraLinear's pool (at most `max_gpu`).
The slot tier is inclusive: a version in a slot keeps its CPU copy.

Two kinds of holds keep a version in memory:
- a reference per request that names it, from submission until it finishes
  (`acquire` / `release`): the CPU copy is never evicted while referenced;
- a pin per running sequence (`pin` / `unpin`, called by the scheduler on the
  engine thread): the slot is never reused while pinned.
Eviction takes the least recently used idle version of a tier. `max_cpu` bounds
the idle CPU copies: versions held by queued or running requests stay resident
beyond it (the queue length bounds them), and the tier shrinks back as they finish.

Requests acquire their adapter when they are submitted, off the event loop and
before they are queued: the adapters of waiting requests are thus read from disk
(prefetched) while the engine keeps stepping, and a request enters the queue
only once its adapter is in CPU memory. One gate per name makes concurrent
requests for an adapter on disk read it once.

An adapter is `name@version`; a version is immutable (hash of its files).
`swap` makes a new version current atomically; requests holding the old one
finish on it, and it is freed with its last reference. Eviction and freeing
drop the tensors themselves (a version keeps only its metadata, `meta`).
One lock guards all of this state; disk reads happen outside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, LoraplexError,
                             NotFound)
from loraplex.lora.layer import LoraLinear
from loraplex.lora.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, AdapterWeights
from loraplex.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: str  # "" for an adapter only on disk (never loaded)
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int  # fp32 bytes in memory; for an adapter only on disk, its file's bytes
    tier: str  # "gpu" (in a slot) | "cpu" | "disk"
    current: bool  # the version a bare `name` resolves to
    in_use: int  # requests holding it now
    requests_served: int
    last_used: float | None  # unix time its last request finished
    load_time_s: float | None  # seconds its last read from disk took


class AdapterVersion:
    """One immutable version of an adapter and its holds; `weights` is None when evicted."""

    def __init__(self, weights: AdapterWeights, relpath: str, load_time_s: float):
        self.name = weights.name
        self.version = weights.version
        self.relpath = relpath
        self.meta = dataclasses.replace(weights, modules={})  # metadata only, never tensors
        self.weights: AdapterWeights | None = weights
        self.slot: int | None = None
        self.refs = 0
        self.pins = 0
        self.requests_served = 0
        self.last_used: float | None = None
        self.last_touch = 0  # cache clock at the last acquire/pin/unpin/release (slot LRU)
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
                 max_cpu: int, metrics: Metrics, base_model: str = "",
                 off_text_linears: frozenset[str] = frozenset()):
        self.store = store
        self.layers = layers
        self.module_shapes = {n: (l.in_features, l.out_features) for n, l in layers.items()}
        self.off_text_linears = off_text_linears  # (loader.off_text_linears: LoRA there skipped)
        self.max_cpu = max_cpu
        self.metrics = metrics
        self.base_model = base_model
        self._other_bases: set[tuple[str, str]] = set()  # (adapter, its base) warned about
        self._pin_host = any(l.lora_A.is_cuda for l in layers.values())
        self.slot_ranks = [0] * (max_gpu + 1)  # read by the runner; slot 0 = no adapter
        self._slots: list[AdapterVersion | None] = [None] * (max_gpu + 1)
        self._current: dict[str, AdapterVersion] = {}
        self._versions: dict[str, AdapterVersion] = {}  # key -> every version in memory
        self._cpu: OrderedDict[str, AdapterVersion] = OrderedDict()  # key -> version, LRU first
        self._unloading: set[str] = set()  # names whose versions are retired, not yet all freed
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)
        self._gates: dict[str, threading.Lock] = {}  # name -> held while its files are read

    # ---- requests (any thread) -------------------------------------------------

    def acquire_resident(self, ref: str) -> AdapterVersion | None:
        """Like `acquire` when the version is already in memory (never reads from disk, so
        the event loop may call it); None when it must be read first."""
        name, version = parse_adapter_ref(ref)
        with self._lock:
            av = self._resolve(name, version)
            if av is not None and av.weights is not None:
                return self._hold(av)
        return None

    def hold_more(self, av: AdapterVersion, count: int) -> None:
        """`count` more holds of a version the caller holds already (each of a request's n
        completions holds its adapter, and releases it when it finishes)."""
        with self._lock:
            av.refs += count

    def acquire(self, ref: str) -> AdapterVersion:
        """Resolve 'name' or 'name@version', loading it from disk if needed, and hold it
        for one request. May read from disk: call it off the event loop."""
        av = self.acquire_resident(ref)
        if av is not None:
            return av
        name, version = parse_adapter_ref(ref)
        with self._gate(name):  # one reader per name; the others find it resident
            with self._lock:
                av = self._resolve(name, version)
                if av is not None and av.weights is not None:
                    return self._hold(av)
            weights, seconds = self._read(name, av.relpath if av else name)
            with self._lock:
                if av is not None and weights.version != av.version:
                    raise FailedPrecondition(
                        f"the files of {av.key} changed on disk (now version "
                        f"{weights.version}); use SwapAdapter to serve the new files")
                av = self._hold(self._keep(weights, av.relpath if av else name, seconds))
                self._evict_cpu()  # after the hold, so the version just read stays resident
                self.metrics.adapter_cache_misses.labels("disk").inc()
                return av

    def hold_version(self, name: str, version: str, relpath: str) -> AdapterVersion:
        """Hold `name@version`, read from `relpath` if it is not in memory, WITHOUT making
        it current: how a restart brings back the old version a route still sends traffic
        to. Like a swapped-out version, it is freed when its last hold is released.
        FailedPrecondition when the files at relpath are another version now."""
        with self._gate(name):
            with self._lock:
                self._refuse_if_unloading(name)
                av = self._versions.get(f"{name}@{version}")
                if av is not None and av.weights is not None:
                    return self._hold(av)
            weights, seconds = self._read(name, relpath)
            with self._lock:
                if weights.version != version:
                    raise FailedPrecondition(
                        f"the files of {name}@{version} in {relpath!r} changed on disk (now "
                        f"version {weights.version})")
                av = self._hold(self._keep(weights, relpath, seconds, make_current=False))
                av.retired = self._current.get(name) is not av
                self._evict_cpu()
                return av

    def release(self, av: AdapterVersion, served: bool = True) -> None:
        with self._lock:
            av.refs -= 1
            av.requests_served += int(served)
            av.last_used = time.time()
            self._touch(av)
            if av.retired and av.refs == 0:
                self._free(av)
            else:
                self._evict_cpu()
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
            self._touch(av)
            return av.slot

    def unpin(self, av: AdapterVersion) -> None:
        with self._lock:
            av.pins -= 1
            self._touch(av)

    def slot_to_drain(self) -> AdapterVersion | None:
        """The slot holder that would free its slot soonest if it took no new requests
        (fewest running requests, then least recently used); None when no slot is held."""
        with self._lock:
            held = [v for v in self._slots[1:] if v is not None]
            return min(held, key=lambda v: (v.pins, v.last_touch)) if held else None

    def _slot_to_fill(self) -> int | None:
        """A free slot, else the least recently used idle one, else None."""
        idle = []
        for i in range(1, len(self._slots)):
            holder = self._slots[i]
            if holder is None:
                return i
            if holder.pins == 0:
                idle.append((holder.last_touch, i))
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
        self._evict_cpu()  # the version that lost its slot may now leave the CPU tier too

    # ---- management (API threads) ----------------------------------------------

    def load(self, name: str, relpath: str | None = None) -> AdapterInfo:
        """Load `relpath` (default: the current version's folder, else the folder named
        `name`) as `name` into CPU memory; idempotent when the same content is already
        the current version of `name`."""
        with self._gate(name):
            with self._lock:
                self._refuse_if_unloading(name)
                current = self._current.get(name)
            weights, seconds = self._read(name, relpath or (current.relpath if current else name))
            with self._lock:
                if current is not None and weights.version != current.version:
                    raise AlreadyExists(
                        f"adapter {name!r} is already loaded as {current.key}; use SwapAdapter "
                        f"to replace it with version {weights.version}")
                av = self._keep(weights, relpath or name, seconds)
                self._evict_cpu()
                return self.info(av)

    def swap(self, name: str, relpath: str) -> AdapterInfo:
        """Make the adapter at relpath the current version of `name` (atomically): requests
        already holding the old version finish on it; it is freed with the last of them."""
        with self._gate(name):
            weights, seconds = self._read(name, relpath)
            with self._lock:
                self._refuse_if_unloading(name)
                old = self._current.pop(name, None)
                av = self._keep(weights, relpath, seconds)  # becomes current: the name is free
                av.retired = False  # swapping back to a version still finishing requests
                if old is not None and old is not av:
                    self._retire(old)
                self._evict_cpu()
                return self.info(av)

    def unload(self, name: str, drain: bool, timeout: float,
               refuse: Callable[[str], None] | None = None) -> list[AdapterInfo]:
        """Forget every version of `name` and free its slot and CPU copy. With requests in
        flight: drain=True waits for them (up to timeout), drain=False refuses. Until the
        last version is freed, new requests for `name` are refused. `refuse(name)` may
        raise to keep it loaded; it runs under the lock, so no hold taken after it
        passes (e.g. a route's) can keep the drain waiting."""
        with self._lock:
            versions = [v for v in self._versions.values() if v.name == name]
            if not versions:
                raise NotFound(f"adapter {name!r} is not loaded")
            if refuse is not None:
                refuse(name)
            busy = sum(v.refs for v in versions)
            if busy and not drain:
                raise FailedPrecondition(
                    f"adapter {name!r} is used by {busy} request(s); retry later or unload with "
                    "drain=true to wait for them")
            infos = [self.info(v) for v in versions]
            self._unloading.add(name)
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
        """Every version in memory (or evicted to disk), then every folder only on disk."""
        with self._lock:
            infos = [self.info(v) for v in self._versions.values()]
            known = {v.name for v in self._versions.values()}
        for name, folder in self.store.scan().items():
            if name not in known:
                infos.append(self._disk_info(name, folder))
        return sorted(infos, key=lambda i: (i.name, not i.current, i.version))

    def info(self, av: AdapterVersion) -> AdapterInfo:
        with self._lock:
            m = av.meta
            tier = "gpu" if av.slot is not None else "cpu" if av.weights is not None else "disk"
            return AdapterInfo(
                name=av.name, version=av.version, path=m.path, rank=m.rank, alpha=m.alpha,
                target_modules=m.target_modules, size_bytes=m.size_bytes, tier=tier,
                current=self._current.get(av.name) is av, in_use=av.refs,
                requests_served=av.requests_served, last_used=av.last_used,
                load_time_s=av.load_time_s)

    def resident_bytes(self) -> int:
        """Bytes of adapter tensors held in CPU memory (what eviction and unload give back)."""
        with self._lock:
            return sum(_tensor_bytes(v.weights) for v in self._versions.values()
                       if v.weights is not None)

    # ---- internals ---------------------------------------------------------------

    def _gate(self, name: str) -> threading.Lock:
        with self._lock:
            return self._gates.setdefault(name, threading.Lock())

    def _resolve(self, name: str, version: str | None) -> AdapterVersion | None:
        """The version a request names (None: not in memory, to be read from disk)."""
        self._refuse_if_unloading(name)
        if version is None:
            return self._current.get(name)
        av = self._versions.get(f"{name}@{version}")
        if av is None:
            raise NotFound(f"adapter version {name}@{version} is not loaded; loaded versions "
                           f"of {name!r}: {self._version_list(name) or 'none'}")
        return av

    def _refuse_if_unloading(self, name: str) -> None:
        if name in self._unloading:
            raise FailedPrecondition(f"adapter {name!r} is being unloaded; retry once "
                                     "UnloadAdapter has returned")

    def _version_list(self, name: str) -> str:
        return ", ".join(sorted(v.version for v in self._versions.values() if v.name == name))

    def _hold(self, av: AdapterVersion) -> AdapterVersion:
        av.refs += 1
        self._touch(av)
        return av

    def _touch(self, av: AdapterVersion) -> None:
        av.last_touch = next(self._clock)
        if av.key in self._cpu:
            self._cpu.move_to_end(av.key)

    def _read(self, name: str, relpath: str) -> tuple[AdapterWeights, float]:
        """Read and validate a folder (outside the lock); host copies pinned on CUDA."""
        start = time.perf_counter()
        weights = self.store.read(name, relpath, self.module_shapes, self.off_text_linears)
        if self._pin_host:
            weights = dataclasses.replace(weights, modules={
                m: (a.pin_memory(), b.pin_memory()) for m, (a, b) in weights.modules.items()})
        seconds = time.perf_counter() - start
        other = (name, weights.base_model)
        if self.base_model and weights.base_model and weights.base_model != self.base_model \
                and other not in self._other_bases:  # (once: evicted adapters are read again)
            self._other_bases.add(other)
            log.warning("adapter %s was trained on %r, served on %r (shapes match)",
                        name, weights.base_model, self.base_model)
        self.metrics.adapter_loads.labels("cpu").inc()
        self.metrics.adapter_load_time.labels("cpu").observe(seconds)
        return weights, seconds

    def _keep(self, weights: AdapterWeights, relpath: str, seconds: float,
              make_current: bool = True) -> AdapterVersion:
        """The version of `weights`, resident in CPU memory: the one already known (its
        tensors restored if evicted) or a new one. It becomes current if `name` has none
        (and make_current). The caller holds or evicts after this (`_evict_cpu`)."""
        av = self._versions.get(f"{weights.name}@{weights.version}")
        if av is None:
            av = AdapterVersion(weights, relpath, seconds)
            self._versions[av.key] = av
        elif av.weights is None:
            av.weights, av.load_time_s = weights, seconds
        if make_current:
            self._current.setdefault(av.name, av)
        self._cpu[av.key] = av
        self._touch(av)
        return av

    def _retire(self, av: AdapterVersion) -> None:
        av.retired = True
        if av.refs == 0:
            self._free(av)

    def _free(self, av: AdapterVersion) -> None:
        """Drop a retired version: zero its slot and let go of its tensors."""
        if av.slot is not None:
            for layer in self.layers.values():
                layer.set_slot(av.slot, None, None)
            self._slots[av.slot] = None
            self.slot_ranks[av.slot] = 0
            av.slot = None
        av.weights = None
        self._cpu.pop(av.key, None)
        if self._versions.get(av.key) is av:
            del self._versions[av.key]
        if self._current.get(av.name) is av:
            del self._current[av.name]
        if not any(v.name == av.name for v in self._versions.values()):
            self._unloading.discard(av.name)
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
        """What the folder's config says about an adapter never loaded (no tensors read)."""
        rank, alpha, targets, size = 0, 0.0, (), 0
        try:
            # the store's confined reader (realpath inside the root, O_NOFOLLOW)
            config = json.loads(self.store._read_file(folder, CONFIG_FILE, f"{name}/{CONFIG_FILE}"))
            rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
            targets = config.get("target_modules") or ()
            targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
            size = self.store.file_size(folder, WEIGHTS_FILE, f"{name}/{WEIGHTS_FILE}")
        except (LoraplexError, OSError, ValueError, TypeError, AttributeError):
            log.debug("adapter folder %r: config unreadable; listed without details", name)
        return AdapterInfo(name=name, version="", path=str(folder), rank=rank, alpha=alpha,
                           target_modules=targets, size_bytes=size, tier="disk", current=False,
                           in_use=0, requests_served=0, last_used=None, load_time_s=None)


def _tensor_bytes(weights: AdapterWeights) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
               for a, b in weights.modules.values())
