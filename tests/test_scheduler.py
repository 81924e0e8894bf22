"""Scheduler: admission by KV blocks and adapter slots, chunked prefill, preemption,
cancellation. Uses the real block allocator and the real adapter cache over real
PEFT-format adapter folders."""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loraplex.config import EngineConfig
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.request import GenerationRequest
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence, Status
from loraplex.engine.stops import StopStringFilter
from loraplex.lora.cache import AdapterCache
from loraplex.lora.layer import LoraLinear
from loraplex.lora.ops import LoraPlan
from loraplex.lora.store import AdapterStore
from loraplex.metrics import Metrics

MODULE = "model.layers.0.proj"


def write_adapter(root, name, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj"],
        "bias": "none", "base_model_name_or_path": "tiny"}))
    save_file({f"base_model.model.{MODULE}.lora_A.weight": torch.randn(rank, 8, generator=g),
               f"base_model.model.{MODULE}.lora_B.weight": torch.randn(8, rank, generator=g)},
              str(folder / "adapter_model.safetensors"))


@pytest.fixture
def cache(tmp_path):
    for i in range(4):
        write_adapter(tmp_path, f"a{i}", seed=i)
    layer = LoraLinear(nn.Linear(8, 8), 8, 8, num_slots=3, max_rank=4, dtype=torch.float32,
                       device=torch.device("cpu"), plan=LoraPlan())
    return AdapterCache(AdapterStore(str(tmp_path), 4), {MODULE: layer}, max_gpu=2, max_cpu=4,
                        metrics=Metrics())


_PROMPTS = itertools.count()


def make_seq(n_prompt, adapter=None, prompt=None, priority=0):
    """A sequence with a prompt of its own (no prefix shared with another), unless given."""
    first = 1000 * next(_PROMPTS)
    prompt = prompt or list(range(first, first + n_prompt))
    return Sequence(request=GenerationRequest(prompt, priority=priority), adapter=adapter,
                    detokenizer=IncrementalDetokenizer(None, []), stops=StopStringFilter(()),
                    sink=None)


def run_step(sched):
    """Schedule, then account as the engine does: sampled sequences get one token."""
    batch = sched.schedule()
    sampling = [item.seq for item in batch if item.samples]
    sched.postprocess(batch)
    for seq in sampling:
        seq.output_ids.append(0)
    return {id(item.seq): item.num_new for item in batch}


def test_chunked_prefill_shares_steps_with_decodes(cache):
    cfg = EngineConfig(max_batch_tokens=8, prefill_chunk=6, max_num_seqs=4, block_size=4)
    sched = Scheduler(cfg, BlockAllocator(32, 4), cache)
    short, long = make_seq(3), make_seq(20)
    sched.add(short)
    sched.add(long)
    assert run_step(sched) == {id(short): 3, id(long): 5}  # budget 8: 3 + 5
    # short decodes (1 token) while long keeps prefilling in chunks of <= 6
    assert run_step(sched) == {id(short): 1, id(long): 6}
    assert run_step(sched) == {id(short): 1, id(long): 6}
    assert run_step(sched) == {id(short): 1, id(long): 3}  # 5+6+6+3 = 20: prompt done
    assert long.output_ids == [0]  # sampled its first token at the end of its prefill
    assert run_step(sched) == {id(short): 1, id(long): 1}


def test_admission_waits_for_kv_blocks_and_never_fails(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    blocks = BlockAllocator(4, 4)  # 16 tokens in all
    sched = Scheduler(cfg, blocks, cache)
    a, b = make_seq(10), make_seq(10)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == {id(a): 10}  # b's 10 tokens do not fit next to a's 3 blocks
    assert b.status is Status.WAITING
    sched.finish(a)
    assert blocks.num_free == 4
    assert run_step(sched) == {id(b): 10}


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempts_newest_when_decodes_run_out_of_blocks(cache, prefix_caching):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4,
                       prefix_caching=prefix_caching)
    blocks = BlockAllocator(4, 4)
    sched = Scheduler(cfg, blocks, cache)
    old, new = make_seq(8), make_seq(8)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled: 2 + 2 blocks, cache full
    assert blocks.num_free == 0
    step = run_step(sched)  # old needs a 3rd block for token 9: new is preempted
    assert step == {id(old): 1}
    assert new.status is Status.WAITING and new.num_computed == 0 and new.block_table == []
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    assert new.output_ids == [0]  # its generated token is kept and recomputed later
    sched.finish(old)
    if not prefix_caching:
        assert run_step(sched) == {id(new): 9}  # recompute prompt + generated token
    else:  # old took new's last block (freed last, forgotten first); its first is found
        assert run_step(sched) == {id(new): 5} and new.num_cached == 0  # (only at admission)


def test_adapter_slots_bound_the_batch_and_nobody_starves(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4,
                       max_gpu_adapters=2)
    sched = Scheduler(cfg, BlockAllocator(64, 4), cache)
    versions = [cache.acquire(f"a{i}") for i in range(3)]
    s0, s1, s2, s0b = (make_seq(2, versions[0]), make_seq(2, versions[1]),
                       make_seq(2, versions[2]), make_seq(2, versions[0]))
    for s in (s0, s1, s2, s0b):
        sched.add(s)
    step = run_step(sched)
    # two slots: a0 and a1 run; a2 waits for a slot; a0's second request, though its
    # adapter is resident, waits too: a0's slot (the least recently used) is draining for a2
    assert set(step) == {id(s0), id(s1)} and {s0.lora_slot, s1.lora_slot} == {1, 2}
    assert s2.status is Status.WAITING and s0b.status is Status.WAITING
    sched.finish(s0)  # a0's slot empties
    step = run_step(sched)
    assert id(s2) in step and s2.lora_slot == s0.lora_slot  # a2 took it
    sched.finish(s1)
    step = run_step(sched)
    assert id(s0b) in step  # and a0 comes back in a slot of its own


def test_later_arrivals_do_not_take_the_slot_an_earlier_one_waits_for(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4,
                       max_gpu_adapters=2)
    sched = Scheduler(cfg, BlockAllocator(64, 4), cache)
    v = [cache.acquire(f"a{i}") for i in range(4)]
    s0, s1 = make_seq(2, v[0]), make_seq(2, v[1])
    sched.add(s0)
    sched.add(s1)
    run_step(sched)  # both slots pinned
    waiting_first, waiting_later = make_seq(2, v[2]), make_seq(2, v[3])
    sched.add(waiting_first)
    sched.add(waiting_later)
    sched.finish(s0)  # one slot frees up
    step = run_step(sched)
    assert id(waiting_first) in step and id(waiting_later) not in step


def test_cancel_frees_blocks_and_adapter_pin(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    blocks = BlockAllocator(8, 4)
    sched = Scheduler(cfg, blocks, cache)
    av = cache.acquire("a0")
    seq = make_seq(6, av)
    sched.add(seq)
    run_step(sched)
    assert av.pins == 1 and blocks.num_free == 6
    sched.finish(seq)
    assert av.pins == 0 and blocks.num_free == 8 and not sched.has_work()
    waiting = make_seq(3)
    sched.add(waiting)
    sched.finish(waiting)  # cancelled before it ever ran
    assert not sched.has_work()


def make_shadow(n_prompt, adapter=None):
    seq = make_seq(n_prompt, adapter)
    seq.request.shadow = True
    return seq


def test_shadows_wait_while_real_requests_wait_and_are_preempted_first(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    blocks = BlockAllocator(4, 4)  # 16 tokens in all
    sched = Scheduler(cfg, blocks, cache)
    shadow, real, late = make_shadow(8), make_seq(8), make_seq(4)
    sched.add(shadow)  # the shadow arrived first...
    sched.add(real)
    assert run_step(sched) == {id(real): 8, id(shadow): 8}  # ...but real work is admitted first
    assert sched.running == [real, shadow] and blocks.num_free == 0
    sched.add(late)
    # real's decode needs a block: the shadow is preempted, late takes the block left
    assert run_step(sched) == {id(real): 1, id(late): 4}
    assert shadow.status is Status.WAITING and sched.num_preemptions == 1
    sched.finish(late)  # 1 block free again
    blocked = make_seq(30)  # never fits next to real: stays waiting
    sched.add(blocked)
    shadow.request.prompt_ids[:] = [1, 2]  # would fit now
    shadow.output_ids.clear()
    assert id(shadow) not in run_step(sched)  # a real request waits: no shadow joins
    sched.finish(blocked)
    assert id(shadow) in run_step(sched)  # nobody real waits: the shadow runs again


def test_victim_is_the_newest_shadow_not_yet_scheduled_this_step(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    sched = Scheduler(cfg, BlockAllocator(8, 4), cache)
    real1, shadow, real2 = make_seq(4), make_shadow(4), make_seq(4)
    sched.running = [real1, shadow, real2]  # running order = the order of this step
    assert sched._victim(real1) is shadow  # not real2, the newest
    assert sched._victim(real2) is real2  # the shadow already joined this step's batch
    sched.running = [real1, real2]
    assert sched._victim(real1) is real2  # no shadow: the newest, as before


def test_waiting_sequences_are_admitted_by_priority_then_arrival(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    sched = Scheduler(cfg, BlockAllocator(2, 4), cache)  # room for one 8-token prompt
    low, first, second = make_seq(8, priority=5), make_seq(8, priority=-1), make_seq(8, priority=-1)
    for seq in (low, first, second):
        sched.add(seq)
    assert run_step(sched) == {id(first): 8}
    sched.finish(first)
    assert run_step(sched) == {id(second): 8}  # same priority: arrival order
    sched.finish(second)
    assert run_step(sched) == {id(low): 8}
    real, shadow = make_seq(8), make_shadow(8)  # a shadow of a priority -1 request
    shadow.request.priority = -1
    sched.finish(low)
    sched.add(shadow)
    sched.add(real)
    assert run_step(sched) == {id(real): 8}  # real work first, whatever the priorities


def test_the_lowest_priority_is_preempted_first_even_when_older(cache):
    """low (priority 1) is admitted before high (0), yet runs after it, so when the cache
    is full and high must grow, low is the one preempted (the newest would be high)."""
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    blocks = BlockAllocator(5, 4)
    sched = Scheduler(cfg, blocks, cache)
    low, high = make_seq(8, priority=1), make_seq(8)
    sched.add(low)
    assert run_step(sched) == {id(low): 8}
    sched.add(high)
    assert run_step(sched) == {id(low): 1, id(high): 8} and blocks.num_free == 0  # 3 + 2
    assert sched.running == [high, low]  # priority order, whatever the admission order
    assert run_step(sched) == {id(high): 1}  # high needs a 3rd block: low gives its own
    assert low.status is Status.WAITING and sched.num_preemptions == 1


def test_waiting_adapter_is_not_starved_by_a_stream_of_resident_ones(cache):
    """Both slots stay busy with ever new requests for a0 and a1; a request for a2 must
    still get a slot: the least busy slot takes no new requests until a2 has it."""
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4,
                       max_gpu_adapters=2)
    sched = Scheduler(cfg, BlockAllocator(64, 4), cache)
    v = [cache.acquire(f"a{i}") for i in range(3)]
    running = [make_seq(2, v[0]), make_seq(2, v[1])]
    for seq in running:
        sched.add(seq)
    run_step(sched)
    starving = make_seq(2, v[2])
    sched.add(starving)
    for step in range(6):
        for seq in list(running):  # each running request finishes after one more step...
            sched.finish(seq)
            running.remove(seq)
        for adapter in v[:2]:  # ...and a new one for the same adapter arrives
            seq = make_seq(2, adapter)
            sched.add(seq)
            running.append(seq)
        run_step(sched)
        if starving.status is Status.RUNNING:
            break
    assert starving.status is Status.RUNNING, "a2 never got a slot"
    assert step <= 1


def test_sequences_admitted_together_share_a_prefix_in_that_step(cache):
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=8, block_size=4)
    blocks = BlockAllocator(16, 4)
    sched = Scheduler(cfg, blocks, cache)
    system = list(range(500, 508))  # 2 full blocks
    first, second = make_seq(0, prompt=system + [1, 2]), make_seq(0, prompt=system + [3])
    other = make_seq(0, adapter=cache.acquire("a0"), prompt=system + [3])
    for seq in (first, second, other):
        sched.add(seq)
    assert run_step(sched) == {id(first): 10, id(second): 1, id(other): 9}
    assert second.block_table[:2] == first.block_table[:2]  # shared, found in this step
    assert second.num_cached == 8 and other.num_cached == 0  # another adapter: nothing
    assert blocks.num_free == 16 - 3 - 1 - 3
    sched.finish(first)
    assert blocks.num_free == 16 - 3 - 1 - 3 + 1  # only its own last block came back


def test_state_slots_follow_running_sequences(cache):
    """A linear-attention model's recurrent-state slots: each running sequence holds its
    own; preemption and finishing give it back, and a recomputed one takes a free one."""
    cfg = EngineConfig(max_batch_tokens=64, prefill_chunk=64, max_num_seqs=3, block_size=4,
                       prefix_caching=False)
    sched = Scheduler(cfg, BlockAllocator(8, 4), cache, state_slots=True)
    seqs = [make_seq(6) for _ in range(4)]
    for seq in seqs:
        sched.add(seq)
    run_step(sched)  # three run (max_num_seqs), the fourth waits
    held = [s.state_slot for s in seqs[:3]]
    assert sorted(held) == [0, 1, 2] and seqs[3].state_slot == -1 and sched.free_states == []
    sched.finish(seqs[1])
    assert seqs[1].state_slot == -1 and sched.free_states == [held[1]]
    run_step(sched)  # the fourth takes the freed slot
    assert seqs[3].state_slot == held[1]
    for _ in range(3):  # 8 blocks of 4 for three sequences of 6 growing: one is preempted
        run_step(sched)
    assert sched.num_preemptions >= 1
    running = [s for s in seqs if s.status is Status.RUNNING]
    waiting = [s for s in seqs if s.status is Status.WAITING]
    assert waiting and all(s.state_slot == -1 for s in waiting)
    slots = [s.state_slot for s in running] + sched.free_states
    assert sorted(slots) == [0, 1, 2]  # none lost, none shared
