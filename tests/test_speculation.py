"""Speculative decoding by prompt lookup: the n-gram proposer, the scheduler's share of
drafts, and served outputs equal to plain decoding's and to PEFT's (greedy), to plain
decoding's with a seed, on tiny random models and on the demo's trained copy model."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from engine_helpers import build_engine, greedy, run_all, run_staggered
from loraplex.config import EngineConfig
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.speculation import NgramProposer
from loraplex.engine.stops import StopStringFilter
from models import FAMILY_SPECS, build_adapters, build_base, make_prompts
from peft_reference import peft_greedy

DEMO = Path(__file__).resolve().parents[1] / "demo"


def seq_of(tokens, max_new_tokens=100):
    return Sequence(request=GenerationRequest(list(tokens), SamplingParams(
        max_new_tokens=max_new_tokens)), adapter=None, sink=None,
        detokenizer=IncrementalDetokenizer(None, []), stops=StopStringFilter(()))


def hit_tokens(engine) -> float:
    return next(s.value for m in engine.metrics.registry.collect()
                if m.name == "loraplex_prefix_cache_hit_tokens" for s in m.samples
                if s.name.endswith("_total"))


def spec_counts(engine) -> tuple[float, float]:
    values = {s.name: s.value for m in engine.metrics.registry.collect() for s in m.samples}
    return (values["loraplex_spec_decode_draft_tokens_total"],
            values["loraplex_spec_decode_accepted_tokens_total"])


# ---- the proposer ------------------------------------------------------------------

def test_longest_ngram_at_its_latest_occurrence():
    tokens = [1, 2, 3, 9, 5, 2, 3, 7, 8, 4, 2, 3]
    assert NgramProposer(3, max_n=2, min_n=1).propose(seq_of(tokens), 5) == (7, 8, 4)
    # the 3-gram (4, 2, 3) never occurred: the 2-gram decides
    assert NgramProposer(3, max_n=3, min_n=2).propose(seq_of(tokens), 5) == (7, 8, 4)
    assert NgramProposer(3, max_n=2, min_n=1).propose(seq_of(tokens), 2) == (7, 8)  # limit
    # a longer match wins over a later short one: (9, 5) ... (5) ... (9, 5)
    assert NgramProposer(2, max_n=2, min_n=1).propose(
        seq_of([9, 5, 6, 6, 5, 1, 9, 5]), 5) == (6, 6)
    assert NgramProposer(2, max_n=1, min_n=1).propose(
        seq_of([9, 5, 6, 6, 5, 1, 9, 5]), 5) == (1, 9)


def test_no_match_no_draft():
    assert NgramProposer(4, 3, 1).propose(seq_of([1, 2, 3, 4]), 4) == ()
    assert NgramProposer(4, 3, 2).propose(seq_of([1, 2, 3, 1]), 4) == ()  # only a 1-gram
    assert NgramProposer(4, 3, 1).propose(seq_of([7]), 4) == ()
    assert NgramProposer(4, 3, 1).propose(seq_of([1, 2, 1]), 0) == ()


def test_repeats_and_the_tail_of_the_sequence():
    # the match may overlap the last n-gram; the draft stops at the sequence's end
    assert NgramProposer(4, 2, 1).propose(seq_of([5, 5, 5, 5]), 4) == (5,)
    assert NgramProposer(4, 2, 1).propose(seq_of([3, 1, 2, 1, 2]), 4) == (1, 2)


def test_matches_are_whole_tokens():
    """Token 256 is the bytes 00 01 00 00, so [256, 0] holds token 1's bytes 01 00 00 00 at
    byte 1: not a token, so no match."""
    assert NgramProposer(2, 1, 1).propose(seq_of([256, 0, 5, 1]), 2) == ()
    assert NgramProposer(2, 1, 1).propose(seq_of([256, 0, 1, 5, 1]), 2) == (5, 1)


def test_the_lookup_follows_the_output():
    seq = seq_of([4, 5, 6, 7])
    proposer = NgramProposer(3, 2, 1)
    assert proposer.propose(seq, 3) == ()
    seq.output_ids += [4, 5]
    assert proposer.propose(seq, 3) == (6, 7, 4)
    seq.output_ids += [9]
    assert proposer.propose(seq, 3) == ()
    assert len(seq.lookup) == 4 * seq.num_tokens


# ---- the scheduler -----------------------------------------------------------------

class NoSlots:
    """Requests for the base model only: no adapter is ever asked for a slot."""


def decoding(sched: Scheduler, *seqs: Sequence) -> None:
    """Prefill seqs in one step and give each its first token (its prompt's first)."""
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    sched.postprocess(batch)
    for seq in seqs:
        seq.output_ids.append(seq.prompt_ids[0])
        assert seq.num_computed + 1 == seq.num_tokens


def test_drafts_take_what_the_batch_leaves():
    """Drafts go to decodes, never to a prefill chunk, within the token budget left after
    the batch is formed."""
    cfg = EngineConfig(max_batch_tokens=12, prefill_chunk=8, max_num_seqs=4,
                       num_speculative_tokens=4, prompt_lookup_min=1)
    sched = Scheduler(cfg, BlockAllocator(64, 4), NoSlots(), proposer=NgramProposer(4, 4, 1))
    a, b = seq_of([1, 2, 3, 4, 5, 6, 7]), seq_of([1, 2, 3, 4, 5, 6, 7])
    decoding(sched, a, b)  # both end in 7, 1: the 1-gram (1) drafts 2, 3, 4, 5
    late = seq_of(list(range(100, 120)))
    sched.add(late)
    batch = {id(item.seq): item for item in sched.schedule()}
    # a and b decode (1 + 1), the late prompt's chunk takes 8: 2 tokens are left for drafts
    assert batch[id(late)].draft == () and batch[id(late)].num_new == 8
    assert batch[id(a)].draft == (2, 3) and batch[id(a)].num_new == 3
    assert batch[id(b)].draft == () and batch[id(b)].num_new == 1
    assert len(a.block_table) == 3  # 8 tokens + 2 drafts in blocks of 4


def test_drafts_fit_the_free_blocks_and_give_back_the_unused():
    cfg = EngineConfig(num_speculative_tokens=4, prompt_lookup_min=1)
    blocks = BlockAllocator(3, 4)
    sched = Scheduler(cfg, blocks, NoSlots(), proposer=NgramProposer(4, 4, 1))
    seq = seq_of([1, 2, 3, 4, 5, 6])
    decoding(sched, seq)  # 7 tokens in 2 blocks: its next one is at 6, drafts from 7
    (item,) = sched.schedule()
    assert item.draft == (2, 3, 4, 5) and len(seq.block_table) == 3 and blocks.num_free == 0
    sched.postprocess([item])
    seq.output_ids += [2, 5]  # the first draft drawn, then another token than the second
    sched.accept_drafts(seq, 1)
    assert seq.num_computed == 8 and seq.num_tokens == 9
    assert len(seq.block_table) == 3  # (its 9th token is at 8: the third block)
    (item,) = sched.schedule()  # (5) drafts 6, 1, 2, 5: room for 3 in 3 blocks of 4
    assert item.draft == (6, 1, 2)
    sched.postprocess([item])
    seq.output_ids.append(8)  # no draft drawn
    sched.accept_drafts(seq, 0)
    assert seq.num_computed == 9 and len(seq.block_table) == 3


def test_rejected_drafts_free_their_blocks():
    cfg = EngineConfig(num_speculative_tokens=8, prompt_lookup_min=1)
    blocks = BlockAllocator(8, 4)
    sched = Scheduler(cfg, blocks, NoSlots(), proposer=NgramProposer(8, 4, 1))
    seq = seq_of(list(range(1, 11)))
    decoding(sched, seq)  # 11 tokens, 3 blocks
    (item,) = sched.schedule()
    assert item.draft == tuple(range(2, 10)) and len(seq.block_table) == 5
    sched.postprocess([item])
    seq.output_ids.append(0)
    sched.accept_drafts(seq, 0)
    assert len(seq.block_table) == 3 and blocks.num_free == 5


def test_max_new_tokens_bounds_the_drafts():
    cfg = EngineConfig(num_speculative_tokens=8, prompt_lookup_min=1)
    sched = Scheduler(cfg, BlockAllocator(64, 4), NoSlots(), proposer=NgramProposer(8, 3, 1))
    seq = seq_of([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=4)
    decoding(sched, seq)  # 1 output token: this step makes at most 3 more
    (item,) = sched.schedule()
    assert item.draft == (2, 3)


# ---- served: equal to plain decoding and to PEFT -------------------------------------

def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat their own start, so that prompt lookup finds drafts."""
    return [p + p[:12] for p in make_prompts(n, min_len=12, max_len=24, seed=seed)]


def test_mixed_batch_with_drafts_equals_peft_alone(tiny_models, adapters):
    """16 adapters and the base model, greedy, every request alone through PEFT; half of
    them join while the others decode. Drafts are found, some kept, some dropped."""
    arch = "llama"
    names = sorted(adapters[arch])[:16]
    prompts = repetitive_prompts(20, seed=11)
    requests = [GenerationRequest(p, greedy(24), adapter=(names[i % 16] if i % 5 else ""))
                for i, p in enumerate(prompts)]
    engine = build_engine(tiny_models[arch], adapters[arch][names[0]].parent,
                          num_speculative_tokens=4, prompt_lookup_min=1)
    try:
        served, _ = run_staggered(engine, requests[:10], requests[10:], after_tokens=4)
        drafted, accepted = spec_counts(engine)
    finally:
        engine.stop()
    assert 0 < accepted < drafted, (accepted, drafted)
    for request, out in zip(requests, served):
        tokens, _ = peft_greedy(tiny_models[arch], adapters[arch][request.adapter]
                                if request.adapter else None, request.prompt_ids, 24)
        assert list(out.token_ids) == tokens, request.adapter or "base"


@pytest.mark.parametrize("arch,backend", [("qwen3", "auto"), ("gemma2", "auto"),
                                          ("llama", "sdpa"), ("deepseek_v3_mla", "auto")])
def test_drafts_change_no_greedy_token(tiny_models, adapters, arch, backend, tmp_path):
    """Other families (Gemma 2: sliding windows, soft caps; DeepSeek-V3: latent attention),
    the CPU decode kernel or SDPA, prefix caching on: the same tokens and logprobs as the
    same engine without drafts; and a second turn whose prompt holds the first one's output
    finds the blocks that kept drafts filled."""
    if arch in tiny_models:
        base, paths = tiny_models[arch], adapters[arch]
    else:
        base = build_base(arch, tmp_path / arch)
        paths = build_adapters(base, tmp_path / "adapters", FAMILY_SPECS["deepseek_v3"])
    names = sorted(paths)[:6]
    prompts = repetitive_prompts(12, seed=12)
    requests = [GenerationRequest(p, greedy(30, logprobs=True), adapter=names[i % len(names)])
                for i, p in enumerate(prompts)]
    outs = {}
    for k in (0, 3):
        engine = build_engine(base, paths[names[0]].parent, attention_backend=backend,
                              num_speculative_tokens=k, prompt_lookup_min=1, block_size=4)
        try:
            first = run_all(engine, requests)
            again = [replace(r, prompt_ids=r.prompt_ids + list(o.token_ids[:-1]))
                     for r, o in zip(requests, first)]
            hits_before = hit_tokens(engine)
            second = run_all(engine, again)
            hits = hit_tokens(engine) - hits_before
            outs[k] = first + second, hits, spec_counts(engine)
        finally:
            engine.stop()
    (plain, plain_hits, _), (spec, spec_hits, (drafted, accepted)) = outs[0], outs[3]
    assert 0 < accepted < drafted
    assert spec_hits == plain_hits > 0
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_seeded_sampling_and_stops_with_drafts(tiny_models, adapters):
    """Sampled with a seed, with a repetition penalty, and (every third request) a stop id
    that plain decoding draws at its 7th token: each draft is kept only when the request's
    own draw makes it, so the outputs and their ends are plain decoding's."""
    arch = "llama"
    names = sorted(adapters[arch])[:4]
    prompts = repetitive_prompts(9, seed=13)
    params = [SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.9, seed=i,
                             ignore_eos=True, repetition_penalty=1.0 + 0.1 * (i % 2))
              for i in range(9)]
    requests = [GenerationRequest(p, s, adapter=names[i % 4])
                for i, (p, s) in enumerate(zip(prompts, params))]
    outs = {}
    for k in (0, 4):
        engine = build_engine(tiny_models[arch], adapters[arch][names[0]].parent,
                              num_speculative_tokens=k, prompt_lookup_min=1)
        try:
            if k == 0:
                free = run_all(engine, requests)
                requests = [replace(r, sampling=replace(
                    r.sampling, stop_token_ids=(o.token_ids[6],) if i % 3 == 0 else ()))
                    for i, (r, o) in enumerate(zip(requests, free))]
            outs[k] = run_all(engine, requests), spec_counts(engine)
        finally:
            engine.stop()
    (plain, _), (spec, (drafted, accepted)) = outs[0], outs[4]
    assert 0 < accepted < drafted
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in spec] == [o.finish_reason for o in plain]
    assert all(len(plain[i].token_ids) <= 7 for i in (0, 3, 6))  # the stop ids ended them


def test_linear_attention_models_do_not_speculate(tmp_path):
    base = build_base("qwen3_5", tmp_path / "qwen3_5")
    engine = build_engine(base, tmp_path, num_speculative_tokens=4)
    try:
        assert engine.scheduler.proposer is None
    finally:
        engine.stop()


def test_the_demo_copy_model_keeps_its_drafts():
    """The demo's model copies its input: prompt lookup drafts the copy, and the model keeps
    most drafts (the first token and the end are not in the prompt). Same outputs as plain
    decoding, which the demo's tests check against the task, in fewer steps."""
    sys.path.insert(0, str(DEMO))
    import random

    import tasks

    rng = random.Random(3)
    inputs = [tasks.random_input(rng) for _ in range(12)]
    outs = {}
    for k in (0, 4):
        engine = build_engine(DEMO / "assets" / "model", DEMO / "assets" / "adapters",
                              num_speculative_tokens=k, prompt_lookup_min=1)
        try:
            requests = [GenerationRequest(engine.tokenizer(tasks.prompt_for(s)).input_ids,
                                          SamplingParams(max_new_tokens=tasks.MAX_LEN + 2))
                        for s in inputs]
            steps = engine.steps
            texts = [run_all(engine, [r])[0].text for r in requests]  # one at a time
            outs[k] = texts, engine.steps - steps, spec_counts(engine)
        finally:
            engine.stop()
    (plain, plain_steps, _), (spec, spec_steps, (drafted, accepted)) = outs[0], outs[4]
    assert spec == plain
    assert sum(a == tasks.copy(s) for a, s in zip(spec, inputs)) >= 11
    assert accepted / drafted > 0.6
    assert spec_steps < 0.6 * plain_steps, (spec_steps, plain_steps)
