"""Routes: aliases over adapter versions, with canary splits, sticky keys, shadow
traffic and a guard. Beside the request path: the Generation servicer asks
`Router.resolve` which `name@version` serves a request, submits it, and reports
what happened (`record`, `record_shadow`); the engine never sees a route.

    router.set_route("support", [Target("support@3f2a", 95), Target("support@9c1d", 5)])
    decision = router.resolve("support", routing_key="user-42")   # -> support@3f2a (sticky)

Choosing a target:
- without a routing key: a weighted random choice;
- with one: weighted rendezvous hashing (HRW). Every target scores the key with
  `-weight / ln(u)`, u = hash(key, target) in (0, 1), and the highest score
  wins. A target wins a key with probability weight / sum(weights), and when
  only some weights change, a key moves only to a target whose weight grew (or
  away from one whose weight shrank): moving 5% -> 10% moves ~5% of the keys, all
  to the candidate, and no key ever moves while the weights stay the same.

The primary of a route is its target with the largest weight (the first on a
tie); every other target with a weight, and the shadow, are candidates. A guard
watches candidates over a window of their latest outcomes and, when a limit is
exceeded, sets the candidate's weight to 0 (and stops shadowing it), recording
why. `promote` gives the candidate all traffic; `rollback` restores the previous
configuration (every set and promote keeps the one before it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

from loraplex.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_HISTORY = 20
MAX_TRIPS = 20


def split_ref(ref: str) -> tuple[str, str]:
    """'name@version' -> (name, version); 'name' -> (name, "")."""
    name, _, version = ref.partition("@")
    return name, version


@dataclass(frozen=True)
class Target:
    ref: str  # "name@version"
    weight: float


@dataclass(frozen=True)
class Shadow:
    ref: str  # the candidate "name@version" that gets the mirrored requests
    fraction: float  # of the route's requests, in [0, 1]


@dataclass(frozen=True)
class Guard:
    """Limits on a candidate, checked once `window` outcomes of it are known. None = no limit."""

    max_error_rate: float | None = None  # failed / all requests of the candidate
    max_latency_ratio: float | None = None  # candidate latency per token / the primary's
    max_disagreement: float | None = None  # 1 - exact-match rate against the primary (shadow)
    window: int = 50


@dataclass(frozen=True)
class GuardTrip:
    time: float  # unix time
    candidate: str  # name@version
    metric: str  # "error_rate" | "latency_ratio" | "disagreement"
    value: float
    limit: float


@dataclass
class Comparison:
    """How a candidate's shadow answers compare with the primary's (one pair of versions)."""

    primary: str
    candidate: str
    compared: int = 0  # pairs where both finished
    exact_matches: int = 0  # identical token sequences
    tokens_compared: int = 0  # positions compared (the longer output's length)
    tokens_agreeing: int = 0  # positions with the same token
    primary_latency_s: float = 0.0  # sums over the compared pairs
    candidate_latency_s: float = 0.0
    candidate_errors: int = 0  # shadow requests that failed

    @property
    def exact_match_rate(self) -> float:
        return self.exact_matches / self.compared if self.compared else 0.0

    @property
    def token_agreement(self) -> float:
        return self.tokens_agreeing / self.tokens_compared if self.tokens_compared else 0.0

    @property
    def latency_ratio(self) -> float:
        return self.candidate_latency_s / self.primary_latency_s if self.primary_latency_s else 0.0


@dataclass
class Route:
    alias: str
    targets: tuple[Target, ...]
    shadow: Shadow | None = None
    guard: Guard | None = None
    history: list[tuple[tuple[Target, ...], Shadow | None]] = field(default_factory=list)
    trips: list[GuardTrip] = field(default_factory=list)
    updated: float = field(default_factory=time.time)

    @property
    def primary(self) -> str:
        """The target with the largest weight (the first one on a tie)."""
        return max(self.targets, key=lambda t: t.weight).ref

    @property
    def candidates(self) -> list[str]:
        out = [t.ref for t in self.targets if t.weight > 0 and t.ref != self.primary]
        if self.shadow is not None and self.shadow.ref not in out and self.shadow.ref != self.primary:
            out.append(self.shadow.ref)
        return out

    def refs(self) -> set[str]:
        """Every name@version this route may send traffic to: targets, shadow, and the
        rollback history."""
        out = set()
        for targets, shadow in [(self.targets, self.shadow), *self.history]:
            out.update(t.ref for t in targets)
            if shadow is not None:
                out.add(shadow.ref)
        return out

    def to_json(self) -> dict:
        return {"alias": self.alias,
                "targets": [asdict(t) for t in self.targets],
                "shadow": asdict(self.shadow) if self.shadow else None,
                "guard": asdict(self.guard) if self.guard else None,
                "history": [{"targets": [asdict(t) for t in ts],
                             "shadow": asdict(s) if s else None} for ts, s in self.history],
                "trips": [asdict(t) for t in self.trips],
                "updated": self.updated}

    @classmethod
    def from_json(cls, d: dict) -> Route:
        def targets(items):
            return tuple(Target(str(t["ref"]), float(t["weight"])) for t in items)

        def shadow(s):
            return Shadow(str(s["ref"]), float(s["fraction"])) if s else None

        return cls(alias=str(d["alias"]), targets=targets(d["targets"]), shadow=shadow(d.get("shadow")),
                   guard=Guard(**d["guard"]) if d.get("guard") else None,
                   history=[(targets(h["targets"]), shadow(h.get("shadow")))
                            for h in d.get("history", [])],
                   trips=[GuardTrip(**t) for t in d.get("trips", [])],
                   updated=float(d.get("updated", time.time())))


@dataclass(frozen=True)
class Decision:
    """Which version serves one request of a route, and where its shadow goes."""

    route: str
    ref: str  # name@version serving the caller
    shadow_ref: str | None = None  # name@version of a mirrored request, if any


def _unit_hash(key: str, ref: str) -> float:
    """A uniform point in (0, 1) for (key, target), stable across processes."""
    digest = hashlib.sha256(f"{key}\0{ref}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64


def choose(targets: Iterable[Target], routing_key: str | None, rng: random.Random) -> str:
    """The target serving one request: weighted random, or sticky by weighted HRW."""
    live = [t for t in targets if t.weight > 0]
    if not live:
        raise FailedPrecondition("the route has no target with a weight > 0")
    if routing_key:
        return max(live, key=lambda t: -t.weight / math.log(_unit_hash(routing_key, t.ref))).ref
    return rng.choices([t.ref for t in live], weights=[t.weight for t in live])[0]


class _Window:
    """The latest outcomes of one candidate of one route, for its guard."""

    def __init__(self, size: int):
        self.errors: deque[bool] = deque(maxlen=size)
        self.latency_ratios: deque[float] = deque(maxlen=size)
        self.disagreements: deque[bool] = deque(maxlen=size)


def validate_route(alias: str, targets: list[Target], shadow: Shadow | None,
                   guard: Guard | None) -> None:
    """Shape checks that need no knowledge of the adapters (InvalidArgument)."""
    if not alias or not _NAME.match(alias):
        raise InvalidArgument(f"alias must be 1..128 letters, digits, '.', '_' or '-', got {alias!r}")
    if not targets:
        raise InvalidArgument("targets is empty: give at least one adapter version with a weight")
    seen = set()
    for t in targets:
        if not math.isfinite(t.weight) or t.weight < 0:
            raise InvalidArgument(f"weight of {t.ref!r} is {t.weight}; weights must be >= 0")
        if t.ref in seen:
            raise InvalidArgument(f"{t.ref!r} is listed twice in targets; list each version once")
        seen.add(t.ref)
    if sum(t.weight for t in targets) <= 0:
        raise InvalidArgument("every weight is 0: give at least one target a weight > 0")
    if shadow is not None:
        if not math.isfinite(shadow.fraction) or not 0.0 <= shadow.fraction <= 1.0:
            raise InvalidArgument(f"shadow fraction must be in [0, 1], got {shadow.fraction}")
        if not shadow.ref:
            raise InvalidArgument("shadow.adapter is empty: name the candidate version")
    if guard is not None:
        if guard.window < 1:
            raise InvalidArgument(f"guard window must be >= 1, got {guard.window}")
        for name in ("max_error_rate", "max_disagreement"):
            v = getattr(guard, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise InvalidArgument(f"guard {name} must be in [0, 1], got {v}")
        if guard.max_latency_ratio is not None and not guard.max_latency_ratio > 0:
            raise InvalidArgument(f"guard max_latency_ratio must be > 0, got {guard.max_latency_ratio}")


class Router:
    """Every route of one server. Thread-safe; `on_change` (e.g. persist) runs after
    each change, outside the lock."""

    def __init__(self, rng: random.Random | None = None,
                 on_change: Callable[[], None] | None = None, metrics=None):
        self._routes: dict[str, Route] = {}
        self._comparisons: dict[tuple[str, str, str], Comparison] = {}  # (alias, primary, cand)
        self._windows: dict[tuple[str, str], _Window] = {}
        self._primary_latency: dict[str, deque[float]] = {}  # alias -> s/token of the primary
        self._lock = threading.RLock()
        self._rng = rng or random.Random()
        self.on_change = on_change
        self.metrics = metrics

    # ---- configuration ---------------------------------------------------------

    def set_route(self, alias: str, targets: list[Target], shadow: Shadow | None = None,
                  guard: Guard | None = None, adapter_names: Iterable[str] = ()) -> Route:
        """Create or replace a route (the replaced configuration can be rolled back to).
        `adapter_names`: names of loaded adapters, which an alias may not shadow."""
        validate_route(alias, targets, shadow, guard)
        if alias in set(adapter_names):
            raise AlreadyExists(f"alias {alias!r} is the name of a loaded adapter; requests for "
                                f"{alias!r} would be ambiguous: choose another alias")
        with self._lock:
            old = self._routes.get(alias)
            route = Route(alias, tuple(targets), shadow, guard)
            if old is not None:
                route.history = (old.history + [(old.targets, old.shadow)])[-MAX_HISTORY:]
                route.trips = old.trips
            self._routes[alias] = route
            self._reset_windows(alias)
        self._changed()
        return route

    def get(self, alias: str) -> Route:
        with self._lock:
            route = self._routes.get(alias)
        if route is None:
            raise NotFound(f"no route named {alias!r}; ListRoutes shows the routes")
        return route

    def is_route(self, alias: str) -> bool:
        with self._lock:
            return alias in self._routes

    def naming(self, name: str) -> list[str]:
        """The aliases of the routes that name any version of adapter `name` (a target,
        the shadow or a version to roll back to), sorted."""
        with self._lock:
            return sorted(alias for alias, route in self._routes.items()
                          if any(split_ref(ref)[0] == name for ref in route.refs()))

    def list(self) -> list[Route]:
        with self._lock:
            return [self._routes[a] for a in sorted(self._routes)]

    def delete(self, alias: str) -> Route:
        with self._lock:
            route = self.get(alias)
            del self._routes[alias]
            self._reset_windows(alias)
        self._changed()
        return route

    def promote(self, alias: str, candidate: str = "") -> Route:
        """All traffic to `candidate` (default: the route's only candidate)."""
        with self._lock:
            route = self.get(alias)
            candidates = route.candidates
            if not candidate:
                if len(candidates) != 1:
                    raise FailedPrecondition(
                        f"route {alias!r} has {len(candidates)} candidates "
                        f"({', '.join(candidates) or 'none'}); name the one to promote")
                candidate = candidates[0]
            if candidate not in candidates and candidate != route.primary:
                raise NotFound(f"{candidate!r} is not a target or the shadow of route {alias!r}; "
                               f"its candidates: {', '.join(candidates) or 'none'}")
            self._push(route)
            route.targets = (Target(candidate, 100.0),)
            route.shadow = None
            self._reset_windows(alias)
        self._changed()
        return route

    def rollback(self, alias: str) -> Route:
        """Back to the configuration before the last set or promote."""
        with self._lock:
            route = self.get(alias)
            if not route.history:
                raise FailedPrecondition(f"route {alias!r} has no earlier configuration to roll back to")
            route.targets, route.shadow = route.history.pop()
            route.updated = time.time()
            self._reset_windows(alias)
        self._changed()
        return route

    def load(self, routes: Iterable[Route]) -> None:
        """Install routes read back from the state file (no validation against adapters)."""
        with self._lock:
            for r in routes:
                self._routes[r.alias] = r

    def _push(self, route: Route) -> None:
        route.history = (route.history + [(route.targets, route.shadow)])[-MAX_HISTORY:]
        route.updated = time.time()

    def _reset_windows(self, alias: str) -> None:
        for key in [k for k in self._windows if k[0] == alias]:
            del self._windows[key]
        self._primary_latency.pop(alias, None)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # ---- requests ----------------------------------------------------------------

    def resolve(self, alias: str, routing_key: str = "") -> Decision | None:
        """The version serving one request for `alias`; None when alias is no route."""
        with self._lock:
            route = self._routes.get(alias)
            if route is None:
                return None
            ref = choose(route.targets, routing_key, self._rng)
            shadow = route.shadow
            mirror = (shadow is not None and shadow.fraction > 0 and shadow.ref != ref
                      and self._rng.random() < shadow.fraction)
            return Decision(alias, ref, shadow.ref if mirror else None)

    def record(self, alias: str, ref: str, ok: bool, latency_s: float, tokens: int) -> None:
        """Outcome of one routed request (for the guard of the route's candidates)."""
        with self._lock:
            route = self._routes.get(alias)
            if route is None:
                return
            per_token = latency_s / max(tokens, 1)
            if ref == route.primary:
                if ok:
                    self._primary_latency.setdefault(alias, deque(maxlen=200)).append(per_token)
                return
            if route.guard is None or ref not in route.candidates:
                return
            w = self._window(route, ref)
            w.errors.append(not ok)
            base = self._primary_latency.get(alias)
            if ok and base:
                w.latency_ratios.append(per_token / (sum(base) / len(base)))
            tripped = self._check_guard(route, ref)
        if tripped:
            self._changed()

    def record_shadow(self, alias: str, primary: str, candidate: str,
                      primary_tokens: list[int] | None, candidate_tokens: list[int] | None,
                      primary_latency_s: float, candidate_latency_s: float) -> Comparison | None:
        """Compare one shadow answer with the primary's. None tokens = that side failed
        (a failed primary makes no comparison)."""
        if primary_tokens is None:
            return None
        with self._lock:
            key = (alias, primary, candidate)
            comp = self._comparisons.setdefault(key, Comparison(primary, candidate))
            route = self._routes.get(alias)
            window = (self._window(route, candidate)
                      if route is not None and route.guard is not None else None)
            if candidate_tokens is None:
                comp.candidate_errors += 1
                if window is not None:
                    window.errors.append(True)
            else:
                n = max(len(primary_tokens), len(candidate_tokens))
                same = sum(a == b for a, b in zip(primary_tokens, candidate_tokens))
                comp.compared += 1
                comp.exact_matches += int(primary_tokens == candidate_tokens)
                comp.tokens_compared += n
                comp.tokens_agreeing += same
                comp.primary_latency_s += primary_latency_s
                comp.candidate_latency_s += candidate_latency_s
                if window is not None:
                    window.errors.append(False)
                    window.disagreements.append(primary_tokens != candidate_tokens)
                    if primary_latency_s > 0:
                        window.latency_ratios.append(candidate_latency_s / primary_latency_s)
            tripped = route is not None and self._check_guard(route, candidate)
            result = replace(comp)
        if tripped:
            self._changed()
        return result

    def comparisons(self, alias: str) -> list[Comparison]:
        with self._lock:
            return [replace(c) for (a, _, _), c in sorted(self._comparisons.items()) if a == alias]

    def _window(self, route: Route, ref: str) -> _Window:
        key = (route.alias, ref)
        if key not in self._windows:
            self._windows[key] = _Window(route.guard.window)
        return self._windows[key]

    def _check_guard(self, route: Route, candidate: str) -> bool:
        """Trip the guard when a full window exceeds a limit: weight 0, shadow off, record."""
        guard, w = route.guard, self._windows.get((route.alias, candidate))
        if guard is None or w is None or candidate not in route.candidates:
            return False
        checks = [("error_rate", guard.max_error_rate, w.errors),
                  ("disagreement", guard.max_disagreement, w.disagreements),
                  ("latency_ratio", guard.max_latency_ratio, w.latency_ratios)]
        for metric, limit, values in checks:
            if limit is None or len(values) < guard.window:
                continue
            value = sum(values) / len(values)
            if value > limit:
                trip = GuardTrip(time.time(), candidate, metric, float(value), float(limit))
                route.trips = (route.trips + [trip])[-MAX_TRIPS:]
                route.targets = tuple(Target(t.ref, 0.0) if t.ref == candidate else t
                                      for t in route.targets)
                if route.shadow is not None and route.shadow.ref == candidate:
                    route.shadow = Shadow(candidate, 0.0)
                route.updated = time.time()
                self._windows.pop((route.alias, candidate), None)
                log.warning("route %s: guard tripped on %s: %s %.3f > %.3f; its weight is now 0",
                            route.alias, candidate, metric, value, limit)
                if self.metrics is not None:
                    name, version = split_ref(candidate)
                    self.metrics.guard_trips.labels(route.alias, name, version, metric).inc()
                return True
        return False
