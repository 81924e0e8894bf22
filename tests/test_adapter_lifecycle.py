"""Adapter lifecycle through the real engine: hot-load, prefetch, tiers and LRU,
pinning, many adapters over few slots, versions and swap, unload that frees,
ListAdapters, PEFT-ecosystem folders, and bad files. Real PEFT adapters (built by
tests/models.py) in real folders; tokens are compared with HF PEFT."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_helpers import build_engine, greedy
from loraplex.engine.engine import collect
from loraplex.engine.request import GenerationRequest
from loraplex.errors import FailedPrecondition, NotFound
from models import QV, AdapterSpec, build_adapters
from peft_reference import peft_greedy

torch.set_num_threads(1)

N_MANY = 200  # adapters cycling through MANY_SLOTS slots
MANY_SLOTS = 4
SPECS = ("r8_attn", "r4_mlp", "r16_all_rslora", "pattern_all", "regex_l1_q_down", "r32_all")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def root(adapters, tiny_models, tmp_path_factory) -> Path:
    """A private adapter root (tests corrupt and replace files in it): some specs from the
    session fixture, and N_MANY tiny rank-1 q/v adapters under many/."""
    root = tmp_path_factory.mktemp("lifecycle")
    for name in SPECS:
        shutil.copytree(adapters["llama"][name], root / name)
    specs = [AdapterSpec(f"m{i:03d}", r=1, lora_alpha=2, target_modules=QV, seed=1000 + i)
             for i in range(N_MANY)]
    build_adapters(tiny_models["llama"], root / "many", specs)
    return root


@pytest.fixture
def base(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture
def make_engine(base, root):
    engines = []

    def make(**kwargs):
        engines.append(build_engine(base, root, **kwargs))
        return engines[-1]
    yield make
    for engine in engines:
        engine.stop()


def request(adapter: str, prompt: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(prompt, greedy(n), adapter=adapter)


def expected(base, folder, prompt, n) -> list[int]:
    return peft_greedy(base, folder, prompt, n)[0]


def info_of(engine, ref: str):
    name, _, version = ref.partition("@")
    return next(i for i in engine.adapters.list()
                if i.name == name and (i.version == version or not version and i.current))


def count_reads(engine, slow: dict[str, threading.Event] | None = None):
    """Wrap the store's read: count reads per name; a read of a name in `slow` announces
    itself (slow[name + ':entered']) and waits for slow[name] to be set."""
    store, real, reads = engine.cache.store, engine.cache.store.read, {}

    def read(name, relpath, *targets):
        reads[name] = reads.get(name, 0) + 1
        if slow and name in slow:
            slow[name + ":entered"].set()
            assert slow[name].wait(30)
        return real(name, relpath, *targets)
    store.read = read
    return reads


async def stream_tokens(stream, tokens: list[int], progress: asyncio.Event | None = None):
    async for out in stream:
        tokens.extend(out.token_ids)
        if progress is not None:
            progress.set()
        last = out
    return last


async def until(predicate, timeout=20.0):
    """Poll a condition the engine thread changes (no event exists for it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- hot-load and prefetch

def test_hot_load_keeps_running_requests_going_and_reads_once(make_engine, base, root, prompts):
    """While the files of 'r16_all_rslora' are being read (held open by an event), a running
    stream keeps producing tokens and the three requests that want it are not queued;
    once it is resident all three are admitted and answered as PEFT answers. One read."""
    engine = make_engine(max_gpu_adapters=4, max_cpu_adapters=8)
    gate = {"r16_all_rslora": threading.Event(), "r16_all_rslora:entered": threading.Event()}
    reads = count_reads(engine, gate)

    async def main():
        busy_tokens, progress = [], asyncio.Event()
        busy = asyncio.create_task(stream_tokens(
            engine.submit(request("r8_attn", prompts[0], 60)), busy_tokens, progress))
        await progress.wait()
        waiting = [asyncio.create_task(collect(engine.submit(request("r16_all_rslora", p, 6))))
                   for p in prompts[1:4]]
        assert await asyncio.to_thread(gate["r16_all_rslora:entered"].wait, 20)
        before = len(busy_tokens)
        while len(busy_tokens) < before + 10:  # the loading adapter stalls nobody
            progress.clear()
            await progress.wait()
        assert not gate["r16_all_rslora"].is_set() and not busy.done()
        assert not engine.scheduler.waiting and len(engine.scheduler.running) == 1
        gate["r16_all_rslora"].set()
        outs = await asyncio.gather(*waiting)
        await busy
        return busy_tokens, outs

    busy_tokens, outs = asyncio.run(main())
    assert reads["r16_all_rslora"] == 1  # three concurrent requests, one disk read
    assert busy_tokens == expected(base, root / "r8_attn", prompts[0], 60)
    for prompt, out in zip(prompts[1:4], outs):
        assert list(out.token_ids) == expected(base, root / "r16_all_rslora", prompt, 6)
        assert out.adapter == info_of(engine, "r16_all_rslora").name + "@" + \
            info_of(engine, "r16_all_rslora").version


def test_queued_requests_adapter_is_prefetched_to_cpu_before_it_gets_a_slot(
        make_engine, base, root, prompts):
    """One slot, held by a running stream: a request for another adapter waits in the
    queue with its adapter already read into CPU memory; it runs when the slot frees."""
    engine = make_engine(max_gpu_adapters=1, max_cpu_adapters=2)

    async def main():
        busy_tokens, progress = [], asyncio.Event()
        busy = asyncio.create_task(stream_tokens(
            engine.submit(request("r8_attn", prompts[0], 40)), busy_tokens, progress))
        await progress.wait()
        late = asyncio.create_task(collect(engine.submit(request("r4_mlp", prompts[1], 5))))
        await until(lambda: len(engine.scheduler.waiting) == 1)
        queued = info_of(engine, "r4_mlp")
        assert (queued.tier, queued.in_use) == ("cpu", 1) and not busy.done()
        assert info_of(engine, "r8_attn").tier == "gpu"
        out = await late
        await busy
        return out

    out = asyncio.run(main())
    assert list(out.token_ids) == expected(base, root / "r4_mlp", prompts[1], 5)
    assert info_of(engine, "r4_mlp").tier == "gpu" and info_of(engine, "r8_attn").tier == "cpu"


# ---------------------------------------------------------------- tiers, LRU, pinning

def sequentially(engine, refs, prompt, n=3):
    async def main():
        return [await collect(engine.submit(request(ref, prompt, n))) for ref in refs]
    return asyncio.run(main())


def evictions(engine, tier: str) -> float:
    return engine.metrics.adapter_evictions.labels(tier)._value.get()


def test_lru_order_in_both_tiers(make_engine, prompts):
    engine = make_engine(max_gpu_adapters=2, max_cpu_adapters=3)
    names = [f"many/m00{i}" for i in range(4)]
    a0, a1, a2, a3 = names
    sequentially(engine, [a0, a1, a2], prompts[0])
    # slot LRU: a0 (least recently used) lost its slot to a2, kept its CPU copy
    assert [info_of(engine, n).tier for n in (a0, a1, a2)] == ["cpu", "gpu", "gpu"]
    assert (evictions(engine, "gpu"), evictions(engine, "cpu")) == (1, 0)
    sequentially(engine, [a1, a3], prompts[0])  # a1 used again: a2 is now the LRU slot
    # a3's read pushed the CPU tier past 3: a0, the LRU idle copy not in a slot, left it
    assert [info_of(engine, n).tier for n in names] == ["disk", "gpu", "cpu", "gpu"]
    assert (evictions(engine, "gpu"), evictions(engine, "cpu")) == (2, 1)
    assert engine.adapters.resident_bytes() == sum(info_of(engine, n).size_bytes for n in names[1:])


def test_pinned_adapter_is_never_evicted(make_engine, base, root, prompts):
    """A long stream on one adapter holds its slot and CPU copy while six other adapters
    cycle through the only other slot and a CPU tier of two; its tokens stay PEFT's."""
    engine = make_engine(max_gpu_adapters=2, max_cpu_adapters=2)

    async def main():
        tokens, progress = [], asyncio.Event()
        long = asyncio.create_task(stream_tokens(
            engine.submit(request("r32_all", prompts[0], 200)), tokens, progress))
        await progress.wait()
        slot = engine.cache._current["r32_all"].slot
        others = []
        for i in range(6):
            others.append(await collect(engine.submit(request(f"many/m{i:03d}", prompts[3], 2))))
            assert engine.cache._current["r32_all"].slot == slot
            assert info_of(engine, "r32_all").tier == "gpu"
        assert not long.done()
        await long
        return tokens, others

    tokens, others = asyncio.run(main())
    assert tokens == expected(base, root / "r32_all", prompts[0], 200)
    for i, out in enumerate(others):
        assert list(out.token_ids) == expected(base, root / "many" / f"m{i:03d}", prompts[3], 2)
    assert evictions(engine, "gpu") == 5 and evictions(engine, "cpu") >= 4


def test_hundreds_of_adapters_through_four_slots_all_answered_correctly(
        make_engine, base, root, prompts):
    """N_MANY adapters, one request each, all submitted at once, MANY_SLOTS slots: every
    request gets the tokens of an engine with a slot per adapter (no cycling), and a
    sample of them PEFT's; each adapter enters a slot exactly once (no thrashing); the
    CPU tier shrinks back to its bound when the requests are done."""
    refs = [f"many/m{i:03d}" for i in range(N_MANY)]
    work = [request(ref, prompts[i % len(prompts)], 4) for i, ref in enumerate(refs)]
    cycling = make_engine(max_gpu_adapters=MANY_SLOTS, max_cpu_adapters=8, max_num_seqs=16)
    roomy = make_engine(max_gpu_adapters=N_MANY, max_cpu_adapters=N_MANY, max_num_seqs=16)
    outs = asyncio.run(_gather(cycling, work))
    assert [o.token_ids for o in outs] == [o.token_ids for o in asyncio.run(_gather(roomy, work))]
    for i, (ref, out) in enumerate(zip(refs, outs)):
        assert out.finish_reason.name == "LENGTH" and out.adapter.startswith(ref + "@")
        if i % 7 == 0:  # 29 of 200 against PEFT
            assert list(out.token_ids) == expected(base, root / ref, work[i].prompt_ids, 4), ref
    assert cycling.metrics.adapter_loads.labels("gpu")._value.get() == N_MANY
    assert cycling.metrics.adapter_loads.labels("cpu")._value.get() == N_MANY
    # each request missed twice: its adapter read from disk, then brought into a slot
    misses = cycling.metrics.adapter_cache_misses
    assert misses.labels("disk")._value.get() == misses.labels("cpu")._value.get() == N_MANY
    assert len(cycling.cache._cpu) == 8


# ---------------------------------------------------------------- versions and swap

@pytest.fixture
def two_versions(root) -> tuple[str, str]:
    """Folders sw_v1 and sw_v2 (different content) for the adapter name 'sw'."""
    for folder, source in (("sw_v1", "r8_attn"), ("sw_v2", "pattern_all")):
        if not (root / folder).exists():
            shutil.copytree(root / source, root / folder)
    return "sw_v1", "sw_v2"


def test_swap_under_concurrent_load(make_engine, base, root, prompts, two_versions):
    """Requests started before SwapAdapter finish on v1, those after get v2, none fails,
    each response names one version and carries that version's PEFT tokens; name@v1
    is still served while v1 is held; v1 is freed with its last request."""
    v1_dir, v2_dir = two_versions
    engine = make_engine(max_gpu_adapters=4, max_cpu_adapters=8)
    v1 = engine.adapters.load("sw", v1_dir)
    ref1 = f"sw@{v1.version}"

    async def main():
        before_tokens = [[] for _ in range(8)]
        started = [asyncio.Event() for _ in range(8)]
        before = [asyncio.create_task(stream_tokens(
            engine.submit(request("sw", prompts[i], 12 + 3 * i)), before_tokens[i], started[i]))
            for i in range(8)]
        for event in started:
            await event.wait()
        swap = asyncio.create_task(asyncio.to_thread(engine.adapters.swap, "sw", v2_dir))
        during = [asyncio.create_task(collect(engine.submit(request("sw", prompts[8 + i], 6))))
                  for i in range(4)]
        v2 = await swap
        after = [asyncio.create_task(collect(engine.submit(request("sw", prompts[12 + i], 6))))
                 for i in range(4)]
        explicit = await collect(engine.submit(request(ref1, prompts[16], 4)))
        assert ref1 in {f"{i.name}@{i.version}" for i in engine.adapters.list()}
        outs_before = await asyncio.gather(*before)
        return v2, before_tokens, outs_before, await asyncio.gather(*during), \
            await asyncio.gather(*after), explicit

    v2, before_tokens, outs_before, during, after, explicit = asyncio.run(main())
    folders = {ref1: root / v1_dir, f"sw@{v2.version}": root / v2_dir}
    for i, (tokens, out) in enumerate(zip(before_tokens, outs_before)):
        assert out.adapter == ref1 and tokens == expected(base, folders[ref1], prompts[i], 12 + 3 * i)
    for i, out in enumerate(during + after):
        assert out.adapter in folders  # exactly one version, and its tokens
        assert list(out.token_ids) == expected(base, folders[out.adapter], prompts[8 + i], 6)
    assert all(out.adapter == f"sw@{v2.version}" for out in after)
    assert explicit.adapter == ref1
    assert list(explicit.token_ids) == expected(base, folders[ref1], prompts[16], 4)
    assert [i.version for i in engine.adapters.list() if i.name == "sw"] == [v2.version]
    assert engine.adapters.resident_bytes() == v2.size_bytes
    with pytest.raises(NotFound):
        engine.cache.acquire(ref1)


def test_a_version_is_the_content_of_its_files(make_engine, root, two_versions):
    engine = make_engine()
    v1 = engine.adapters.load("sw", two_versions[0])
    same = engine.adapters.load("copy", two_versions[0])
    assert same.version == v1.version  # content, not name or path
    assert engine.adapters.swap("sw", two_versions[0]).version == v1.version  # no-op
    v2 = engine.adapters.swap("sw", two_versions[1])
    assert engine.adapters.swap("sw", two_versions[0]).version == v1.version != v2.version


# ---------------------------------------------------------------- unload

def test_unload_frees_the_slot_and_the_cpu_tensors(make_engine, base, root, prompts):
    engine = make_engine(max_gpu_adapters=1, max_cpu_adapters=2)
    sequentially(engine, ["r32_all"], prompts[0])
    av = engine.cache._current["r32_all"]
    slot, size = av.slot, av.meta.size_bytes
    tensors = [weakref.ref(t) for pair in av.weights.modules.values() for t in pair]
    layers = engine.cache.layers.values()
    assert all(l.lora_A[slot].abs().sum() > 0 for l in layers)
    before = engine.adapters.resident_bytes()

    gone = engine.adapters.unload("r32_all")
    del av
    gc.collect()
    assert [i.name for i in gone] == ["r32_all"] and gone[0].size_bytes == size
    assert engine.adapters.resident_bytes() == before - size
    assert all(ref() is None for ref in tensors)  # no copy of the tensors is left anywhere
    assert all(l.lora_A[slot].abs().sum() == 0 and l.lora_B[slot].abs().sum() == 0
               for l in layers) and engine.cache.slot_ranks[slot] == 0
    out = sequentially(engine, ["r4_mlp"], prompts[1], 4)[0]  # the only slot is reusable
    assert engine.cache._current["r4_mlp"].slot == slot
    assert list(out.token_ids) == expected(base, root / "r4_mlp", prompts[1], 4)


def test_an_unload_refused_by_its_check_leaves_the_adapter_serving(make_engine, base, root,
                                                                    prompts):
    """`refuse` (the servicer's "a route names it") runs under the cache's lock as the
    unload begins; when it raises, nothing is retired and requests still get the adapter."""
    engine = make_engine(max_gpu_adapters=1)
    sequentially(engine, ["r4_mlp"], prompts[0], 2)
    checked = []

    def refuse(name):
        checked.append((name, engine.cache._lock._is_owned()))
        raise FailedPrecondition(f"{name} is routed")

    with pytest.raises(FailedPrecondition, match="r4_mlp is routed"):
        engine.adapters.unload("r4_mlp", drain=True, refuse=refuse)
    assert checked == [("r4_mlp", True)]
    assert "r4_mlp" not in engine.cache._unloading and info_of(engine, "r4_mlp").current
    out = sequentially(engine, ["r4_mlp"], prompts[1], 4)[0]
    assert list(out.token_ids) == expected(base, root / "r4_mlp", prompts[1], 4)


def test_another_base_is_warned_about_once_per_adapter(make_engine, prompts, caplog):
    """An adapter trained on another spelling of the base (a hub id, served from /models)
    is warned about at its first read, not at every read after an eviction."""
    engine = make_engine(max_gpu_adapters=1, max_cpu_adapters=1)
    engine.cache.base_model = "/models"
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.cache"):
        sequentially(engine, ["many/m000", "many/m001", "many/m000"], prompts[0])
    assert evictions(engine, "cpu") == 2  # (m000 was read twice)
    warned = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert len(warned) == 2 and "adapter many/m000 was trained on" in warned[0], warned
    assert "served on '/models'" in warned[1] and "many/m001" in warned[1]


def test_cpu_eviction_drops_the_tensors_and_keeps_the_metadata(make_engine, prompts):
    engine = make_engine(max_gpu_adapters=1, max_cpu_adapters=1)
    sequentially(engine, ["many/m000"], prompts[0])
    av = engine.cache._current["many/m000"]
    tensors = [weakref.ref(t) for pair in av.weights.modules.values() for t in pair]
    sequentially(engine, ["many/m001"], prompts[0])
    gc.collect()
    assert av.weights is None and all(ref() is None for ref in tensors)
    info = info_of(engine, "many/m000")
    assert (info.tier, info.rank, info.requests_served) == ("disk", 1, 1) and info.size_bytes > 0
    assert engine.adapters.resident_bytes() == info_of(engine, "many/m001").size_bytes


def test_unload_with_requests_in_flight_refuses_or_drains(make_engine, base, root, prompts):
    engine = make_engine(max_gpu_adapters=2)

    async def main():
        tokens, progress = [], asyncio.Event()
        running = asyncio.create_task(stream_tokens(
            engine.submit(request("r8_attn", prompts[0], 40)), tokens, progress))
        await progress.wait()
        size = info_of(engine, "r8_attn").size_bytes
        with pytest.raises(FailedPrecondition, match="drain"):
            engine.adapters.unload("r8_attn", drain=False)
        drain = asyncio.create_task(asyncio.to_thread(engine.adapters.unload, "r8_attn", True))
        await until(lambda: "r8_attn" in engine.cache._unloading)
        with pytest.raises(FailedPrecondition, match="being unloaded"):
            await collect(engine.submit(request("r8_attn", prompts[1], 2)))
        assert not drain.done()
        held = engine.adapters.resident_bytes()
        out = await running
        gone = await drain
        return tokens, out, gone, size, held

    tokens, out, gone, size, held = asyncio.run(main())
    assert out.finish_reason.name == "LENGTH"  # the drained request finished normally
    assert tokens == expected(base, root / "r8_attn", prompts[0], 40)
    assert [i.name for i in gone] == ["r8_attn"] and held >= size
    assert engine.adapters.resident_bytes() == held - size
    again = sequentially(engine, ["r8_attn"], prompts[1], 2)[0]  # hot-loads anew
    assert list(again.token_ids) == expected(base, root / "r8_attn", prompts[1], 2)


# ---------------------------------------------------------------- ListAdapters

def test_list_adapters_is_the_servers_view_after_traffic(make_engine, root, prompts):
    engine = make_engine(max_gpu_adapters=2)
    start = time.time()
    sequentially(engine, ["pattern_all"] * 3 + ["regex_l1_q_down"], prompts[0])
    infos = {i.name: i for i in engine.adapters.list()}
    pattern = infos["pattern_all"]
    assert (pattern.rank, pattern.alpha, pattern.tier, pattern.current) == (32, 16.0, "gpu", True)
    assert pattern.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                      "up_proj", "v_proj")
    assert (pattern.requests_served, pattern.in_use) == (3, 0)
    assert start <= pattern.last_used <= time.time() and pattern.load_time_s > 0
    assert len(pattern.version) == 12 and pattern.path == str(root / "pattern_all")
    assert engine.adapters.resident_bytes() == pattern.size_bytes + infos["regex_l1_q_down"].size_bytes
    regex = infos["regex_l1_q_down"]
    assert regex.target_modules == ("down_proj", "q_proj") and regex.requests_served == 1
    disk = infos["r16_all_rslora"]  # never loaded: what its config and file say
    assert (disk.tier, disk.version, disk.rank, disk.alpha, disk.in_use) == ("disk", "", 16, 16.0, 0)
    assert disk.size_bytes == (root / "r16_all_rslora" / WEIGHTS).stat().st_size
    assert len([n for n in infos if n.startswith("many/")]) == N_MANY


# ---------------------------------------------------------------- PEFT ecosystem

def write_variant(root: Path, name: str, source: str, config=None, tensors=None) -> str:
    """Copy adapter `source` to `name`, changing its config and/or its tensors."""
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / source, folder)
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        save_file(tensors(load_file(folder / WEIGHTS)), folder / WEIGHTS)
    return name


def peft_folder(base, root: Path, name: str, **lora_kwargs) -> str:
    """A real PEFT save of a LoraConfig our server must refuse (DoRA, embeddings...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not (root / name).exists():
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_kwargs)
        get_peft_model(model, config).save_pretrained(root / name)
    return name


def test_peft_options_are_served_exactly_and_mismatches_warned(
        make_engine, base, root, prompts, caplog):
    fan = write_variant(root, "fan_in_fan_out", "r8_attn", config={"fan_in_fan_out": True})
    other = write_variant(root, "other_base", "r4_mlp",
                          config={"base_model_name_or_path": "meta-llama/Llama-3-8B"})
    engine = make_engine()
    refs = ["regex_l1_q_down", "pattern_all", "r16_all_rslora", fan, other]
    work = [request(ref, prompts[i], 6) for i, ref in enumerate(refs)]
    with caplog.at_level(logging.WARNING):
        outs = asyncio.run(_gather(engine, work))
    for ref, req, out in zip(refs, work, outs):
        assert list(out.token_ids) == expected(base, root / ref, req.prompt_ids, 6), ref
    text = caplog.text
    assert "meta-llama/Llama-3-8B" in text


async def _gather(engine, work):
    return await asyncio.gather(*[collect(engine.submit(r)) for r in work], return_exceptions=True)


def test_unservable_adapters_are_refused_at_load_and_others_keep_running(
        make_engine, base, root, prompts):
    def wrong_shape(tensors):
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        return {**tensors, key: torch.randn(tensors[key].shape[0], 48)}

    refused = {
        peft_folder(base, root, "dora", target_modules=["q_proj"], use_dora=True): "DoRA",
        peft_folder(base, root, "saves_head", target_modules=["q_proj"],
                    modules_to_save=["lm_head"]): "modules_to_save",
        peft_folder(base, root, "embedding", target_modules=["embed_tokens"]): "embedding",
        peft_folder(base, root, "lm_head", target_modules=["lm_head"]): "lm_head",
        write_variant(root, "wrong_shape", "r8_attn", tensors=wrong_shape): "does not fit",
        "r32_all": "max rank",
    }
    engine = make_engine(max_lora_rank=16)
    good = [request("r8_attn", prompts[i], 20) for i in range(3)]
    outs = asyncio.run(_gather(engine, good + [request(n, prompts[5], 2) for n in refused]))
    for req, out in zip(good, outs):
        assert list(out.token_ids) == expected(base, root / "r8_attn", req.prompt_ids, 20)
    for (name, words), err in zip(refused.items(), outs[len(good):]):
        assert isinstance(err, FailedPrecondition) and words in str(err), (name, err)
        assert info_of(engine, name).tier == "disk"  # nothing of it was kept


# ---------------------------------------------------------------- bad files

def test_broken_files_fail_only_the_requests_that_want_them(make_engine, base, root, prompts):
    def drop_one(tensors):
        return dict(list(tensors.items())[1:])

    def nan(tensors):
        key = next(iter(tensors))
        return {**tensors, key: torch.full_like(tensors[key], float("nan"))}

    truncated = write_variant(root, "truncated", "r8_attn")
    data = (root / truncated / WEIGHTS).read_bytes()
    (root / truncated / WEIGHTS).write_bytes(data[: len(data) // 2])  # a half-written file
    garbage = write_variant(root, "garbage", "r8_attn")
    (root / garbage / WEIGHTS).write_bytes(b"\xff" * 64)
    broken = {
        truncated: (FailedPrecondition, "corrupt or truncated"),
        garbage: (FailedPrecondition, "corrupt or truncated"),
        write_variant(root, "missing", "r8_attn", tensors=drop_one): (FailedPrecondition, "no "),
        write_variant(root, "nan", "r8_attn", tensors=nan): (FailedPrecondition, "NaN"),
        write_variant(root, "deleted", "r8_attn"): (NotFound, "has no adapter_model"),
    }
    engine = make_engine(max_gpu_adapters=2)
    real_read = engine.cache.store.read

    def read(name, relpath, *targets):  # the file vanishes between the listing and the read
        if name == "deleted":
            (root / "deleted" / WEIGHTS).unlink(missing_ok=True)
        return real_read(name, relpath, *targets)
    engine.cache.store.read = read
    good = [request("r4_mlp", prompts[i], 16) for i in range(3)]
    outs = asyncio.run(_gather(engine, good + [request(n, prompts[4], 2) for n in broken]))
    for req, out in zip(good, outs):
        assert list(out.token_ids) == expected(base, root / "r4_mlp", req.prompt_ids, 16)
    for (name, (cls, words)), err in zip(broken.items(), outs[len(good):]):
        assert isinstance(err, cls) and words in str(err), (name, err)


def test_files_replaced_under_an_evicted_version_are_refused_not_served(
        make_engine, base, root, prompts, two_versions):
    """A version is immutable: when the folder of an evicted version is rewritten, a
    request for it is refused (SwapAdapter serves new files); the rest keep running."""
    folder = write_variant(root, "rewritten", two_versions[0])
    engine = make_engine(max_gpu_adapters=1, max_cpu_adapters=1)
    sequentially(engine, [folder, "many/m000"], prompts[0])  # evicts it to disk
    assert info_of(engine, folder).tier == "disk"
    for file in ("adapter_config.json", WEIGHTS):  # new files written in place
        shutil.copy(root / two_versions[1] / file, root / folder / file)
    outs = asyncio.run(_gather(engine, [request(folder, prompts[1], 2),
                                        request("many/m001", prompts[2], 8)]))
    assert isinstance(outs[0], FailedPrecondition) and "SwapAdapter" in str(outs[0])
    assert list(outs[1].token_ids) == expected(base, root / "many/m001", prompts[2], 8)
    swapped = engine.adapters.swap(folder, folder)
    out = sequentially(engine, [folder], prompts[1], 4)[0]
    assert out.adapter == f"{folder}@{swapped.version}"
    assert list(out.token_ids) == expected(base, root / folder, prompts[1], 4)
