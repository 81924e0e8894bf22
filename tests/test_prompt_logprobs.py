"""Prompt log-probabilities (SamplingParams.prompt_logprobs) against HF PEFT.

Each prompt token after the first is scored by the logits of the position before it,
with the request's adapter: what one PEFT forward pass of the prompt alone gives.
Served in a mixed batch, in chunks, beside decodes, through the prefix cache and a
preemption.
"""

import torch

from engine_helpers import build_engine, greedy, run_all, run_staggered, tiny_llama_blocks
from loraplex.engine.request import GenerationRequest, SamplingParams, TokenLogprob
from loraplex.engine.sequence import ScheduledSeq, Sequence
from models import make_prompts
from peft_reference import peft_prompt_logprobs
from test_prefix_cache import hit_tokens

TOP = 3
MAX_NEW = 4
TOLERANCE = 1e-4  # fp32 base: test_fidelity's bound on generated tokens' logprobs


def assert_matches_peft(out, base_dir, adapter_dir, prompt, top=TOP):
    """Every score of `out` within the fp32 tolerance of PEFT's, its top ids PEFT's."""
    ref = peft_prompt_logprobs(base_dir, adapter_dir, prompt)  # [P - 1, vocab]
    assert len(out.prompt_logprobs) == len(prompt) - 1
    targets = torch.tensor(prompt[1:])
    want = ref.gather(1, targets[:, None])[:, 0]  # [P - 1]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs])
    assert [lp.token_id for lp in out.prompt_logprobs] == prompt[1:]
    assert torch.allclose(got, want, rtol=0, atol=TOLERANCE)
    ranks = torch.tensor([lp.rank for lp in out.prompt_logprobs])  # (within the tolerance)
    assert ((ranks >= 1 + (ref > want[:, None] + TOLERANCE).sum(1))
            & (ranks <= 1 + (ref > want[:, None] - TOLERANCE).sum(1))).all()
    assert len(ranks) == 0 or (ranks > 1).any()  # (random tokens: rarely a random model's top)
    if top:
        ref_top = torch.topk(ref, top)
        for i, lp in enumerate(out.prompt_logprobs):
            assert [t for t, _ in lp.top] == ref_top.indices[i].tolist(), i
            assert torch.allclose(torch.tensor([p for _, p in lp.top]), ref_top.values[i],
                                  rtol=0, atol=TOLERANCE)
    else:
        assert all(lp.top == () for lp in out.prompt_logprobs)


def test_prompt_logprobs_in_a_mixed_batch_match_peft(tiny_models, adapters):
    """Six adapters and the base model; a 70-token prompt is prefilled in 3 chunks of 32,
    a 1-token prompt has nothing to score, one request asks for none; two requests join
    while the first ones decode."""
    arch = "qwen2"
    names = sorted(adapters[arch])[:6]
    prompts = make_prompts(8, min_len=1, max_len=70, seed=11)
    wanted = names[:4] + ["", names[4], "", names[5]]
    tops = [TOP, TOP, 0, TOP, TOP, None, TOP, TOP]
    requests = [GenerationRequest(p, greedy(MAX_NEW, prompt_logprobs=k), adapter=a)
                for p, k, a in zip(prompts, tops, wanted)]
    engine = build_engine(tiny_models[arch], adapters[arch][names[0]].parent)
    try:
        outs, _ = run_staggered(engine, requests[:6], requests[6:], after_tokens=2)
    finally:
        engine.stop()
    assert len(prompts[0]) == 1 and len(prompts[1]) == 70
    for i, (request, out, top) in enumerate(zip(requests, outs, tops)):
        adapter_dir = adapters[arch][request.adapter] if request.adapter else None
        if top is None:
            assert out.prompt_logprobs == (), i
        else:
            assert_matches_peft(out, tiny_models[arch], adapter_dir, request.prompt_ids, top)


def test_a_scored_prompt_is_computed_in_full_and_still_shared(tiny_models, adapters):
    """A prompt served once, then again with prompt logprobs (nothing found: every score
    PEFT's), then again without (it finds the cached blocks)."""
    arch = "llama"
    a = sorted(adapters[arch])[0]
    prompt = make_prompts(2, min_len=40, max_len=40, seed=12)[0]
    engine = build_engine(tiny_models[arch], adapters[arch][a].parent, block_size=8)
    try:
        plain, scored, again = (
            run_all(engine, [GenerationRequest(prompt, greedy(MAX_NEW, prompt_logprobs=k),
                                               adapter=a)])[0]
            for k in (None, TOP, None))
        hits = hit_tokens(engine)
    finally:
        engine.stop()
    assert hits == 32  # the last request's 4 full blocks before its last token
    assert plain.prompt_logprobs == again.prompt_logprobs == ()
    assert plain.token_ids == scored.token_ids == again.token_ids
    assert_matches_peft(scored, tiny_models[arch], adapters[arch][a], prompt)


def test_scores_go_to_their_own_sequence_whatever_the_packed_order(tiny_models, adapters):
    """An adapter's request, then a base-model one, scored in one step: the runner packs
    slot 0 first, so the scored rows come in another order than the batch's."""
    arch = "llama"
    a = sorted(adapters[arch])[0]
    first, second = make_prompts(2, min_len=12, max_len=20, seed=21)
    requests = [GenerationRequest(first, greedy(2, prompt_logprobs=TOP), adapter=a),
                GenerationRequest(second, greedy(2, prompt_logprobs=TOP))]
    engine = build_engine(tiny_models[arch], adapters[arch][a].parent)
    try:
        run_all(engine, [GenerationRequest([5, 6], greedy(1), adapter=a)])  # a resident:
        outs = run_all(engine, requests)  # both admitted in the same step
    finally:
        engine.stop()
    assert_matches_peft(outs[0], tiny_models[arch], adapters[arch][a], first)
    assert_matches_peft(outs[1], tiny_models[arch], None, second)


def test_preempted_requests_score_their_prompts_once(tiny_models, adapters):
    """Six scored requests of 30-40 prompt tokens need 36 blocks of 8 when done; the cache
    holds 12, so requests are preempted and recomputed: each prompt is still scored
    exactly once (the first output carries it), as PEFT scores it."""
    arch = "llama"
    names = sorted(adapters[arch])[:6]
    prompts = make_prompts(6, min_len=30, max_len=40, seed=13)
    engine = build_engine(tiny_models[arch], adapters[arch][names[0]].parent, block_size=8,
                          kv_cache_memory=tiny_llama_blocks(12, 8))
    requests = [GenerationRequest(p, greedy(12, prompt_logprobs=TOP), adapter=n)
                for p, n in zip(prompts, names)]
    try:
        assert engine.blocks.num_blocks == 12
        outs = run_all(engine, requests)
        preemptions = engine.scheduler.num_preemptions
    finally:
        engine.stop()
    assert preemptions >= 1
    for request, out in zip(requests, outs):
        assert_matches_peft(out, tiny_models[arch], adapters[arch][request.adapter],
                            request.prompt_ids)


def test_scored_positions_skip_what_a_recompute_already_scored():
    """Position p scores prompt token p + 1: a 10-token prompt has positions 0..8 to
    score; chunks score their own positions, the last prompt position scores nothing, a
    recompute scores only the positions not scored before, decodes never score."""
    def scheduled(num_computed, num_new, scored=0, prompt_logprobs=0):
        request = GenerationRequest(list(range(1, 11)),
                                    SamplingParams(prompt_logprobs=prompt_logprobs))
        seq = Sequence(request=request, adapter=None, detokenizer=None, stops=None, sink=None,
                       num_computed=num_computed)
        seq.prompt_scores = [TokenLogprob(0, 0.0)] * scored
        return ScheduledSeq(seq, num_new)

    assert scheduled(0, 4).scored_positions == range(0, 4)
    assert scheduled(4, 6, scored=4).scored_positions == range(4, 9)
    assert scheduled(0, 10, scored=6).scored_positions == range(6, 9)  # a recompute
    done = scheduled(0, 10, scored=9)
    assert done.scored_positions == range(0)
    assert not done.seq.scores_prompt  # so a recompute may take the prefix cache again
    assert scheduled(0, 10, prompt_logprobs=None).scored_positions == range(0)
    decode = scheduled(10, 1, scored=9)
    decode.seq.output_ids.append(5)
    assert decode.scored_positions == range(0)
