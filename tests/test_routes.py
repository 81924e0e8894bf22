"""Routes: canary splits, sticky keys, shadow traffic, guards, promote/rollback and
persistence. The statistics run on loraplex.routing directly (thousands of
decisions); a real server (tiny Llama, PEFT adapters; conftest_api.py) checks the
wiring with a few hundred real requests.

Versions: two versions of one adapter are two folders loaded under two names
(alpha = alpha/, alpha-next = alpha_v2/); alpha-copy loads alpha/ again, so it is
an identical candidate (same version hash, other name); gamma differs everywhere.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import time
from collections import Counter

import pytest

from conftest_api import RunningServer, assets, make_config  # noqa: F401
from loraplex.errors import AlreadyExists, InvalidArgument
from loraplex.routing import Guard, Router, Shadow, Target, choose
from loraplex.state import AdapterEntry, State, StateStore
from loraplex_client import (AlreadyExists as AlreadyExistsRpc, AsyncClient, Client,
                             FailedPrecondition, InvalidArgument as InvalidArgumentRpc, NotFound)

Z99 = 2.576  # two-sided 99% normal quantile


def within_ci(count: int, n: int, p: float) -> bool:
    """count/n inside the 99% binomial (normal approximation) interval around p."""
    half = Z99 * math.sqrt(p * (1 - p) / n) + 0.5 / n
    return abs(count / n - p) <= half


# ---------------------------------------------------------------- routing.py alone

@pytest.mark.parametrize("weights", [(95, 5), (70, 20, 10), (1, 1)])
def test_split_lies_within_99_percent_ci(weights):
    targets = [Target(f"a{i}@v{i}", w) for i, w in enumerate(weights)]
    total, n = sum(weights), 20_000
    rng = random.Random(1)
    random_counts = Counter(choose(targets, "", rng) for _ in range(n))
    sticky_counts = Counter(choose(targets, f"user-{k}", rng) for k in range(n))
    for t in targets:
        assert within_ci(random_counts[t.ref], n, t.weight / total), (t, random_counts)
        assert within_ci(sticky_counts[t.ref], n, t.weight / total), (t, sticky_counts)


def test_sticky_keys_move_only_when_weights_do_and_only_the_expected_share():
    keys = [f"session-{k}" for k in range(20_000)]
    rng = random.Random(0)

    def assign(weights):
        targets = [Target("support@v3", weights[0]), Target("support@v4", weights[1])]
        return {k: choose(targets, k, rng) for k in keys}

    before = assign((95, 5))
    assert assign((95, 5)) == before  # same weights: not one key moves
    after = assign((90, 10))
    moved = [k for k in keys if before[k] != after[k]]
    # every move goes to the candidate whose weight grew; the share is 10% - 5%
    assert all(before[k] == "support@v3" and after[k] == "support@v4" for k in moved)
    assert within_ci(len(moved), len(keys), 0.05), len(moved)
    # adding a third target takes keys from both, and moves nothing between the first two
    three = {k: choose([Target("support@v3", 90), Target("support@v4", 10),
                        Target("support@v5", 10)], k, rng) for k in keys}
    assert all(three[k] in (after[k], "support@v5") for k in keys)


def test_router_validation_messages_say_what_to_fix():
    router = Router()
    cases = [
        (dict(targets=[Target("a@1", -1)]), InvalidArgument, "must be >= 0"),
        (dict(targets=[Target("a@1", 0), Target("b@1", 0)]), InvalidArgument, "weight > 0"),
        (dict(targets=[]), InvalidArgument, "at least one"),
        (dict(targets=[Target("a@1", 1)], shadow=Shadow("b@1", 1.5)), InvalidArgument, "[0, 1]"),
        (dict(targets=[Target("a@1", 1)], shadow=Shadow("b@1", -0.1)), InvalidArgument, "[0, 1]"),
        (dict(targets=[Target("a@1", 1)], guard=Guard(max_error_rate=2)), InvalidArgument, "[0, 1]"),
    ]
    for kw, exc, text in cases:
        with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
            router.set_route("r", **kw)
    with pytest.raises(InvalidArgument, match="alias"):
        router.set_route("bad alias!", [Target("a@1", 1)])
    with pytest.raises(AlreadyExists, match="choose another alias"):
        router.set_route("a", [Target("a@1", 1)], adapter_names={"a"})


def test_promote_rollback_and_guard_record_in_the_router():
    router = Router(rng=random.Random(0))
    router.set_route("r", [Target("a@1", 95), Target("a@2", 5)],
                     guard=Guard(max_error_rate=0.5, window=4))
    assert router.get("r").primary == "a@1" and router.get("r").candidates == ["a@2"]
    for ok in (True, False, False, False):
        router.record("r", "a@2", ok, 0.1, 4)
    route = router.get("r")
    assert dict((t.ref, t.weight) for t in route.targets) == {"a@1": 95, "a@2": 0}
    trip = route.trips[-1]
    assert (trip.candidate, trip.metric, trip.value, trip.limit) == ("a@2", "error_rate", 0.75, 0.5)
    router.set_route("r", [Target("a@1", 50), Target("a@2", 50)])
    router.promote("r")
    assert [(t.ref, t.weight) for t in router.get("r").targets] == [("a@2", 100.0)]
    router.rollback("r")
    assert [(t.ref, t.weight) for t in router.get("r").targets] == [("a@1", 50), ("a@2", 50)]


# ---------------------------------------------------------------- state file

def test_state_file_is_atomic_and_a_broken_one_never_blocks_a_start(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    good = State(adapters=[AdapterEntry("alpha", "abc", "alpha")], routes=[{"alias": "x"}])
    store.save(good)
    assert store.load() == good
    # a crash between the temporary file and the rename: the old state stays
    real_replace = os.replace

    def crash(src, dst):
        with open(src, "r+b") as f:  # the temporary write was cut short too
            f.truncate(7)
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(State(adapters=[AdapterEntry("beta", "def", "beta")]))
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.load() == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a truncated state file (written by something else): moved aside, start empty
    text = store.path.read_text()
    store.path.write_text(text[: len(text) // 2])
    assert store.load() == State()
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    store.save(good)
    assert store.load() == good


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def served(assets, tmp_path_factory):  # noqa: F811
    data = tmp_path_factory.mktemp("routes_data")
    cfg = make_config(assets, data_dir=str(data), preload=(("alpha", "alpha"),))
    # seeded: the weighted-random counts below are then the same on every run
    s = RunningServer(cfg, routing_rng=random.Random(0)).start()
    with Client(s.target, timeout=60) as c:
        for name, path in (("alpha-next", "alpha_v2"), ("alpha-copy", "alpha"), ("gamma", "gamma")):
            c.load_adapter(name, path)
        s.refs = {a.name: a.ref for a in c.list_adapters() if a.current}
    yield s
    s.stop()


@pytest.fixture
def client(served):
    """A client; routes a test leaves behind (it failed midway) are deleted, so they
    hold no version that a later test expects to be freed."""
    with Client(served.target, timeout=60) as c:
        yield c
        for route in c.list_routes():
            c.delete_route(route.alias)


def drain_shadows(served):
    served.run(served.server.generation.shadows.drain(30))


async def _many(target, n, make, concurrency=16):
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(target, timeout=60) as c:
        async def one(i):
            async with sem:
                return await c.generate("Hi", max_new_tokens=1, **make(i))
        return await asyncio.gather(*[one(i) for i in range(n)])


def test_routed_requests_split_by_weight_and_stick_to_their_key(served, client):
    r = served.refs
    client.set_route("canary", {"alpha": 70, r["alpha-next"]: 30})  # "alpha" = its current version
    assert client.get_route("canary").weights == {r["alpha"]: 70, r["alpha-next"]: 30}
    n = 300
    results = asyncio.run(_many(served.target, n, lambda i: dict(adapter="canary")))
    counts = Counter(res.adapter for res in results)
    assert set(counts) == {r["alpha"], r["alpha-next"]} and all(res.route == "canary" for res in results)
    assert within_ci(counts[r["alpha-next"]], n, 0.3), counts
    name, version = r["alpha-next"].split("@")
    assert served.metric("loraplex_requests_total", adapter=name, version=version, route="canary",
                         status="OK") == counts[r["alpha-next"]]
    assert served.metric("loraplex_route_weight", route="canary", adapter=name, version=version) == 30
    # sticky: 40 keys twice each land on the same version both times
    keyed = asyncio.run(_many(served.target, 80, lambda i: dict(adapter="canary",
                                                                  routing_key=f"k{i % 40}")))
    by_key = {}
    for i, res in enumerate(keyed):
        assert by_key.setdefault(i % 40, res.adapter) == res.adapter
    client.delete_route("canary")
    with pytest.raises(NotFound):
        client.get_route("canary")


def test_bad_routes_get_clear_errors(served, client):
    r = served.refs
    with pytest.raises(InvalidArgumentRpc, match=">= 0"):
        client.set_route("bad", {r["alpha"]: -1})
    with pytest.raises(InvalidArgumentRpc, match="weight > 0"):
        client.set_route("bad", {r["alpha"]: 0, r["alpha-next"]: 0})
    with pytest.raises(NotFound, match="load it first"):
        client.set_route("bad", {"alpha@0000000000": 1})
    with pytest.raises(NotFound, match="not loaded"):
        client.set_route("bad", {"nobody": 1})
    with pytest.raises(AlreadyExistsRpc, match="choose another alias"):
        client.set_route("alpha", {r["alpha-next"]: 1})
    with pytest.raises(InvalidArgumentRpc, match=r"\[0, 1\]"):
        client.set_route("bad", {r["alpha"]: 1}, shadow=(r["gamma"], 1.5))
    with pytest.raises(FailedPrecondition, match="roll back"):
        client.set_route("fresh", {r["alpha"]: 1}) and client.rollback_route("fresh")
    client.delete_route("fresh")


def _timed_calls(target, adapter, n):
    with Client(target, timeout=60) as c:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.generate("Hello there", adapter=adapter, max_new_tokens=16, ignore_eos=True)
            times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]  # median


def test_shadow_latency_is_reported_and_comparisons_are_right(served, client, capsys):
    r = served.refs
    client.set_route("plain", {r["alpha"]: 1})
    client.set_route("mirrored", {r["alpha"]: 1}, shadow=(r["alpha-copy"], 1.0))
    client.set_route("differs", {r["alpha"]: 1}, shadow=(r["gamma"], 1.0))
    _timed_calls(served.target, "plain", 2)  # warm
    off = _timed_calls(served.target, "plain", 12)
    on = _timed_calls(served.target, "mirrored", 12)
    ratio = on / off
    with capsys.disabled():
        print(f"\nshadow latency ratio (median caller latency, shadow on / off): {ratio:.2f} "
              f"({on * 1e3:.1f} ms / {off * 1e3:.1f} ms)")
    # A measurement, not a test: timings on a shared CPU vary. The caller never waits for
    # the shadow itself; what it pays is the shadow's share of each forward pass.
    for _ in range(6):
        client.generate("Hello there", adapter="differs", max_new_tokens=16, ignore_eos=True)
    drain_shadows(served)
    same = client.get_route("mirrored").comparisons
    assert len(same) == 1 and same[0].candidate == r["alpha-copy"] and same[0].compared == 12
    assert same[0].exact_match_rate == 1.0 and same[0].token_agreement == 1.0
    diff = client.get_route("differs").comparisons[0]
    assert diff.compared == 6 and diff.exact_match_rate < 1.0 and diff.token_agreement < 1.0
    a, av = r["alpha"].split("@")
    c, cv = r["alpha-copy"].split("@")
    pair = dict(route="mirrored", primary_adapter=a, primary_version=av, candidate_adapter=c,
                candidate_version=cv)
    assert served.metric("loraplex_shadow_comparisons_total", **pair) == 12
    assert served.metric("loraplex_shadow_exact_matches_total", **pair) == 12
    for alias in ("plain", "mirrored", "differs"):
        client.delete_route(alias)


def test_a_shadow_of_n_completions_is_compared_with_completion_0(served, client):
    """A sampled request for 3 completions is mirrored once, with completion 0's seed, to a
    candidate with the same weights: every comparison is an exact match."""
    r = served.refs
    client.set_route("sampled", {r["alpha"]: 1}, shadow=(r["alpha-copy"], 1.0))
    for _ in range(4):
        out = client.generate("Hello there", adapter="sampled", max_new_tokens=12,
                              ignore_eos=True, temperature=1.0, n=3)
        assert len({c.token_ids for c in out.completions}) > 1  # seeds s, s + 1, s + 2
    drain_shadows(served)
    comparisons = client.get_route("sampled").comparisons
    assert [(c.compared, c.exact_match_rate) for c in comparisons] == [(4, 1.0)]
    client.delete_route("sampled")


def test_guard_trips_on_a_broken_candidate_and_leaves_a_record(served, client):
    r = served.refs
    client.set_route("guarded", {r["alpha"]: 90, r["gamma"]: 10}, shadow=(r["gamma"], 1.0),
                     guard=dict(max_disagreement=0.5, window=5))
    # This failed once in a clean-clone CI run with 8 requests (the guard never tripped).
    # The likely cause, not confirmed: without a routing key a request goes to gamma
    # itself 10% of the time, and is then not compared, so 8 requests fall short of the
    # window of 5 about once in 200 runs; with 12, about once in a million. After the trip
    # every request goes to alpha with no shadow, so nothing more is compared.
    for _ in range(12):
        client.generate("Hello there", adapter="guarded", max_new_tokens=12, ignore_eos=True)
        drain_shadows(served)
    route = client.get_route("guarded")
    assert route.weights[r["gamma"]] == 0 and route.shadow == (r["gamma"], 0.0)
    trip = route.trips[-1]
    assert trip.adapter == r["gamma"] and trip.metric == "disagreement"
    assert trip.value > 0.5 and trip.limit == 0.5 and abs(trip.time - time.time()) < 60
    name, version = r["gamma"].split("@")
    assert served.metric("loraplex_route_guard_trips_total", route="guarded", adapter=name,
                         version=version, metric="disagreement") == 1
    results = [client.generate("x", adapter="guarded", max_new_tokens=1) for _ in range(10)]
    assert {res.adapter for res in results} == {r["alpha"]}  # no traffic to gamma any more
    client.delete_route("guarded")


def test_promote_and_rollback_under_load_fail_no_request(served, client):
    r = served.refs
    client.set_route("live", {r["alpha"]: 50, r["alpha-next"]: 50})

    async def load(stop: asyncio.Event):
        seen, failures = Counter(), []
        async with AsyncClient(served.target, timeout=60) as c:
            async def worker():
                while not stop.is_set():
                    try:
                        res = await c.generate("Hi", adapter="live", max_new_tokens=2)
                        seen[res.adapter] += 1
                    except Exception as exc:  # noqa: BLE001
                        failures.append(exc)
            await asyncio.gather(*[worker() for _ in range(4)])
        return seen, failures

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        async with AsyncClient(served.target, timeout=60) as admin:
            await asyncio.sleep(0.5)
            promoted = await admin.promote_route("live", r["alpha-next"])
            await asyncio.sleep(0.5)
            rolled = await admin.rollback_route("live")
            await asyncio.sleep(0.5)
            again = await admin.promote_route("live", r["alpha-next"])
        stop.set()
        return promoted, rolled, again, await task

    promoted, rolled, again, (seen, failures) = asyncio.run(scenario())
    assert failures == []
    assert promoted.weights == {r["alpha-next"]: 100.0}
    assert rolled.weights == {r["alpha"]: 50, r["alpha-next"]: 50}
    assert sum(seen.values()) > 20 and seen[r["alpha"]] > 0 and seen[r["alpha-next"]] > 0
    after = [client.generate("x", adapter="live", max_new_tokens=1).adapter for _ in range(10)]
    assert set(after) == {r["alpha-next"]}
    client.delete_route("live")


def test_restart_with_data_dir_gives_the_same_answers(assets, tmp_path):  # noqa: F811
    root = tmp_path / "adapters"
    shutil.copytree(assets.adapter_root, root)
    data = tmp_path / "data"
    cfg = make_config(assets, data_dir=str(data), preload=(("alpha", "alpha"),))
    cfg = cfg.__class__(model=cfg.model, engine=cfg.engine,
                        server=cfg.server.__class__(**{**cfg.server.__dict__,
                                                       "adapter_root": str(root)}))

    def answers(target):
        with Client(target, timeout=60) as c:
            routed = [c.generate("Hello", adapter="ab", routing_key=f"user{i}", max_new_tokens=6,
                                 ignore_eos=True) for i in range(6)]
            direct = c.generate("Hello", adapter="next", max_new_tokens=6, ignore_eos=True)
            return ([(x.adapter, x.token_ids) for x in routed], direct.token_ids,
                    c.get_route("ab").weights, sorted(a.ref for a in c.list_adapters() if a.version))

    first = RunningServer(cfg).start()
    try:
        with Client(first.target, timeout=60) as c:
            c.load_adapter("next", "alpha_v2")
            c.load_adapter("doomed", "gamma")
            refs = {a.name: a.ref for a in c.list_adapters() if a.current}
            c.set_route("ab", {refs["alpha"]: 50, refs["next"]: 50})
        before = answers(first.target)
    finally:
        first.stop()
    saved = json.loads((data / "state.json").read_text())
    assert {a["name"] for a in saved["adapters"]} == {"alpha", "next", "doomed"}
    # the files of one saved adapter change while the server is down: it is refused
    shutil.copytree(root / "beta", root / "gamma", dirs_exist_ok=True)
    second = RunningServer(cfg).start()
    try:
        after = answers(second.target)
        with Client(second.target, timeout=60) as c:
            with pytest.raises(NotFound):
                c.generate("Hello", adapter="doomed", max_new_tokens=1)
    finally:
        second.stop()
    assert after[:3] == before[:3]
    assert after[3] == [ref for ref in before[3] if not ref.startswith("doomed@")]


def test_restart_keeps_a_routes_old_version_and_its_holds(assets, tmp_path):  # noqa: F811
    """The canary state across a restart: support = alpha@v1 50 / alpha@v2 50 after a swap
    made v2 current. The restarted server serves both (v1 read back without becoming
    current), gives the same answers, and its routes hold what they name again: a later
    swap does not free v2, and deleting the route frees both old versions."""
    data = tmp_path / "data"
    cfg = make_config(assets, data_dir=str(data), preload=())

    def answers(c):
        routed = [c.generate("Hello", adapter="support", routing_key=f"user{i}",
                             max_new_tokens=6, ignore_eos=True) for i in range(12)]
        return [(x.adapter, x.token_ids) for x in routed]

    first = RunningServer(cfg).start()
    try:
        with Client(first.target, timeout=60) as c:
            v1 = c.load_adapter("alpha", "alpha").ref
            c.set_route("support", {v1: 100})
            v2 = c.swap_adapter("alpha", "alpha_v2").ref
            c.set_route("support", {v1: 50, v2: 50})
            before = answers(c)
    finally:
        first.stop()
    assert {x[0] for x in before} == {v1, v2}
    saved = {(a["name"], a["version"]): a["current"]
             for a in json.loads((data / "state.json").read_text())["adapters"]}
    assert saved == {tuple(v1.split("@")): False, tuple(v2.split("@")): True}

    second = RunningServer(cfg).start()
    try:
        with Client(second.target, timeout=60) as c:
            assert answers(c) == before
            listed = {a.ref: a.current for a in c.list_adapters("alpha")}
            assert listed == {v1: False, v2: True}
            assert c.generate("Hi", adapter="alpha", max_new_tokens=1).adapter == v2
            v3 = c.swap_adapter("alpha", "gamma").ref  # the route still holds v1 and v2
            assert answers(c) == before
            c.delete_route("support")
            for old in (v1, v2):  # nothing holds them any more: freed
                with pytest.raises(NotFound):
                    c.generate("Hi", adapter=old, max_new_tokens=1)
            assert c.generate("Hi", adapter="alpha", max_new_tokens=1).adapter == v3
    finally:
        second.stop()


def test_a_route_keeps_serving_the_old_version_across_a_swap(served, client):
    """The canary flow of the issue: support@v1 stays servable through a route after
    SwapAdapter made v2 current, so v1 95 / v2 5 works; once no route names v1, it is freed."""
    v1 = served.refs["alpha"]
    before = client.generate("Hi", adapter=v1, max_new_tokens=4, ignore_eos=True).token_ids
    client.set_route("support", {v1: 100})
    v2 = client.swap_adapter("alpha", "alpha_v2").ref
    try:
        assert v2 != v1
        client.set_route("support", {v1: 50, v2: 50})
        served_by = {client.generate("Hi", adapter="support", routing_key=f"user{i}",
                                     max_new_tokens=1).adapter for i in range(24)}
        assert served_by == {v1, v2}
        assert client.generate("Hi", adapter="alpha", max_new_tokens=1).adapter == v2
        again = client.generate("Hi", adapter=v1, max_new_tokens=4, ignore_eos=True).token_ids
        assert again == before  # the old version, unchanged, after the swap
        client.delete_route("support")
        with pytest.raises(NotFound):  # nothing holds v1 any more: freed
            client.generate("Hi", adapter=v1, max_new_tokens=1)
    finally:
        client.swap_adapter("alpha", "alpha")  # back to v1 for the other tests


def test_an_adapter_may_not_take_a_routes_alias(served, client):
    client.set_route("taken", {served.refs["alpha"]: 1})
    try:
        for call in (lambda: client.load_adapter("taken", "gamma"),
                     lambda: client.swap_adapter("taken", "gamma"),
                     lambda: client.merge_adapters("taken", ["alpha", "gamma"],
                                                   combination_type="cat")):
            with pytest.raises(AlreadyExistsRpc, match="route alias"):
                call()
    finally:
        client.delete_route("taken")


def test_an_adapter_a_route_names_cannot_be_unloaded_until_the_route_lets_go(served, client):
    """A route holds the versions it names: an unload would drain until the route changed,
    refusing the adapter's requests all the while. It is refused at once instead."""
    client.set_route("pinned", {served.refs["alpha"]: 1}, shadow=(served.refs["gamma"], 0.5))
    try:
        for name in ("alpha", "gamma"):
            with pytest.raises(FailedPrecondition, match="named by route.s. pinned"):
                client.unload_adapter(name, drain=True, timeout=5)
        ok = client.generate("Hi", adapter="alpha", max_new_tokens=1)  # still served
        assert ok.adapter == served.refs["alpha"]
        client.set_route("pinned", {served.refs["alpha"]: 1})  # gamma stays in the history
        with pytest.raises(FailedPrecondition, match="roll back to"):
            client.unload_adapter("gamma")
    finally:
        client.delete_route("pinned")
    client.unload_adapter("gamma", drain=True, timeout=30)  # nothing holds it now
    try:
        assert [a for a in client.list_adapters() if a.name == "gamma" and a.tier != "disk"] == []
    finally:
        client.load_adapter("gamma", "gamma")


@pytest.mark.parametrize("reason, held", [("unavailable", False), ("cancelled", False),
                                          ("deadline", False), ("error", True)])
def test_a_shadow_ended_by_the_replica_is_not_held_against_its_candidate(reason, held):
    """A shadow request that never got to answer (the engine failed before it ran, a
    shutdown, a deadline) is skipped; one that failed while running counts as the
    candidate's error, as the guard needs."""
    from loraplex.api.routes import ShadowMirror
    from loraplex.engine.request import FinishReason, RequestOutput
    from loraplex.metrics import Metrics
    from loraplex.routing import Decision

    router = Router(random.Random(0))
    router.set_route("r", [Target("a@1", 100)], shadow=Shadow("b@2", 1.0),
                     guard=Guard(max_error_rate=0.5, window=2))
    mirror = ShadowMirror(router, Metrics())

    async def ended():
        yield RequestOutput("s", (), "", "b@2", 3, 0, finish_reason=FinishReason(reason),
                            error="why")

    async def main():
        primary = asyncio.get_running_loop().create_future()
        primary.set_result(([5, 6], 0.1))
        await mirror._run(ended(), Decision("r", "a@1", "b@2"), primary)
    asyncio.run(main())
    errors = sum(c.candidate_errors for c in router.comparisons("r"))
    assert errors == (1 if held else 0)
    outcome = "error" if held else "skipped"
    samples = {s.labels["outcome"]: s.value for m in mirror.metrics.registry.collect()
               if m.name == "loraplex_shadow_requests" for s in m.samples
               if s.name.endswith("_total")}
    assert samples == {outcome: 1.0}
