"""n completions of one request (GenerationRequest.n): each is its own sequence, equal to
the single request it stands for, and with prefix caching they compute the prompt once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from engine_helpers import build_engine, greedy, run_all, tiny_llama_blocks
from loraplex.engine.engine import RequestStream
from loraplex.engine.request import (FinishReason, GenerationRequest, RequestOutput,
                                     SamplingParams)
from loraplex.errors import InvalidArgument, NotFound, ResourceExhausted
from models import make_prompts
from peft_reference import peft_greedy

BLOCK = 8


@pytest.fixture(scope="module")
def engine(tiny_models, adapters):
    engine = build_engine(tiny_models["llama"], next(iter(adapters["llama"].values())).parent,
                          block_size=BLOCK)
    yield engine
    engine.stop()


def hit_tokens(engine) -> float:
    return next(s.value for m in engine.metrics.registry.collect()
                if m.name == "loraplex_prefix_cache_hit_tokens" for s in m.samples
                if s.name.endswith("_total"))


def run_outputs(engine, request: GenerationRequest) -> list:
    """Every output of one request's stream, in order."""
    async def main():
        return [out async for out in engine.submit(request)]
    return asyncio.run(main())


def fold(outputs, n: int) -> list[dict]:
    """Per completion index: its tokens, text, logprobs, prompt logprobs and finish reason."""
    per = [dict(tokens=[], text="", logprobs=[], prompt_logprobs=[], finish=[])
           for _ in range(n)]
    for out in outputs:
        c = per[out.index]
        c["tokens"] += out.token_ids
        c["text"] += out.text
        c["logprobs"] += out.logprobs
        c["prompt_logprobs"] += out.prompt_logprobs
        if out.finished:
            c["finish"].append(out.finish_reason)
    return per


def test_seeded_completions_equal_single_requests_with_seed_plus_index(engine, adapters):
    """4 sampled completions of a 27-token prompt (3 full blocks of 8, then 3 tokens): each is
    the request alone with seed + i, and completions 1-3 find the 3 full blocks that
    completion 0 computes in the same step."""
    name = sorted(adapters["llama"])[0]
    prompt = make_prompts(2, min_len=27, max_len=27, seed=11)[0]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=123,
                            ignore_eos=True, logprobs=True)
    before = hit_tokens(engine)
    outputs = run_outputs(engine, GenerationRequest(prompt, params, adapter=name, n=4,
                                                    request_id="many"))
    assert hit_tokens(engine) - before == 3 * 3 * BLOCK
    assert {o.request_id for o in outputs} == {"many"}
    per = fold(outputs, 4)
    assert [c["finish"] for c in per] == [[FinishReason.LENGTH]] * 4
    alone = run_all(engine, [GenerationRequest(prompt, replace(params, seed=123 + i),
                                               adapter=name) for i in range(4)])
    for i, (c, one) in enumerate(zip(per, alone)):
        assert c["tokens"] == list(one.token_ids), i
        assert c["text"] == one.text
        assert [lp.token_id for lp in c["logprobs"]] == c["tokens"]
        assert [lp.logprob for lp in c["logprobs"]] == pytest.approx(
            [lp.logprob for lp in one.logprobs], abs=1e-5)
    assert len({tuple(c["tokens"]) for c in per}) > 1  # different seeds, different samples


def test_greedy_completions_are_peft_greedy_and_outputs_interleave(engine, tiny_models, adapters):
    """Greedy completions are all PEFT's greedy answer; their outputs come step by step,
    interleaved, not one completion after another."""
    name = sorted(adapters["llama"])[1]
    prompt = make_prompts(2, min_len=9, max_len=9, seed=12)[0]
    outputs = run_outputs(engine, GenerationRequest(prompt, greedy(8), adapter=name, n=3))
    tokens, _ = peft_greedy(tiny_models["llama"], adapters["llama"][name], prompt, 8)
    assert [c["tokens"] for c in fold(outputs, 3)] == [tokens] * 3
    assert sorted(o.index for o in outputs[:3]) == [0, 1, 2]  # the first step's outputs


def test_prompt_logprobs_come_once_unseeded_completions_differ(engine):
    prompt = make_prompts(2, min_len=10, max_len=10, seed=13)[0]
    params = SamplingParams(max_new_tokens=10, temperature=1.5, ignore_eos=True,
                            prompt_logprobs=2)
    per = fold(run_outputs(engine, GenerationRequest(prompt, params, n=3)), 3)
    assert len(per[0]["prompt_logprobs"]) == len(prompt) - 1
    assert [len(c["prompt_logprobs"]) for c in per[1:]] == [0, 0]
    assert all(len(c["tokens"]) == 10 for c in per)
    assert len({tuple(c["tokens"]) for c in per}) > 1


def test_cancelling_ends_and_frees_every_completion(engine, adapters):
    """Cancelling the stream once its 4 completions have started ends each of them
    CANCELLED, and gives back their KV blocks and adapter holds."""
    name = sorted(adapters["llama"])[2]
    free = engine.blocks.num_free

    async def main():
        stream = engine.submit(GenerationRequest([5, 6, 7, 8, 9], greedy(240), adapter=name,
                                                 n=4))
        seen, ends = set(), {}
        async for out in stream:
            seen.add(out.index)
            if len(seen) == 4 and not ends:
                stream.cancel()
            if out.finished:
                ends[out.index] = (out.finish_reason, out.completion_tokens)
        return ends

    ends = asyncio.run(main())
    assert sorted(ends) == [0, 1, 2, 3]
    assert {reason for reason, _ in ends.values()} == {FinishReason.CANCELLED}
    assert max(tokens for _, tokens in ends.values()) < 240
    assert engine.blocks.num_free == free
    assert [i.in_use for i in engine.adapters.list() if i.name == name] == [0]
    assert not engine._seqs


def test_bad_n_and_a_full_queue_are_refused(tiny_models, adapters):
    """n outside 1..32, or above what the queue holds at all, is INVALID_ARGUMENT (retrying
    cannot help); n that does not fit beside the requests waiting is RESOURCE_EXHAUSTED."""
    engine = build_engine(tiny_models["llama"], next(iter(adapters["llama"].values())).parent,
                          max_queue=3, max_num_seqs=1)
    try:
        async def submit(n, adapter=""):
            return engine.submit(GenerationRequest([5, 6], greedy(2), adapter=adapter, n=n))

        for n in (0, 33):
            with pytest.raises(InvalidArgument, match=r"n must be in \[1, 32\]"):
                asyncio.run(submit(n))
        with pytest.raises(InvalidArgument, match="n = 4 is more than the queue holds"):
            asyncio.run(submit(4))

        async def beside_a_waiting_one():
            running = engine.submit(GenerationRequest([5, 6], greedy(200)))
            waiting = engine.submit(GenerationRequest([5, 7], greedy(2)))
            first = running.__aiter__()
            await first.__anext__()  # it runs, and holds the only sequence of a batch
            second = asyncio.ensure_future(waiting.__aiter__().__anext__())
            await asyncio.sleep(0.05)  # queued: it waits for the first
            try:
                await submit(3)
            finally:
                running.cancel()
                waiting.cancel()
                second.cancel()
        with pytest.raises(ResourceExhausted,
                           match="1 requests are already waiting and this request adds 3"):
            asyncio.run(beside_a_waiting_one())
        for _ in range(500):  # until the engine has ended both
            if not engine._seqs:
                break
            time.sleep(0.01)

        async def unknown():  # an error of its completions' adapter ends the stream
            return [o async for o in await submit(3, adapter="nope")]
        with pytest.raises(NotFound):
            asyncio.run(unknown())
        per = fold(run_outputs(engine, GenerationRequest([5, 6], greedy(2), n=3)), 3)
        assert [len(c["tokens"]) for c in per] == [2, 2, 2]  # the queue is free again
    finally:
        engine.stop()


def test_completions_survive_preemption_with_shared_prompt_blocks(tiny_models, adapters):
    """2 requests of n = 4 seeded completions whose 16-token prompts (2 blocks of 8; each
    request's completions share the first, the second holds the last prompt token, which
    each computes) grow to 40 tokens: 8 sequences need about 40 blocks, the cache holds 16. Completions are preempted and recomputed (finding their prompt's
    blocks again), and each still serves what it serves alone with seed + i."""
    names = sorted(adapters["llama"])[3:5]
    prompts = make_prompts(3, min_len=16, max_len=16, seed=14)[:2]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=40,
                            ignore_eos=True)
    requests = [GenerationRequest(p, params, adapter=a, n=4) for p, a in zip(prompts, names)]
    root = next(iter(adapters["llama"].values())).parent
    tight = build_engine(tiny_models["llama"], root, block_size=BLOCK,
                         kv_cache_memory=tiny_llama_blocks(16, BLOCK))
    try:
        async def main():
            return await asyncio.gather(*[
                _collect_all(tight.submit(r)) for r in requests])
        served = asyncio.run(main())
        preemptions = tight.scheduler.num_preemptions
        assert tight.blocks.num_free == 16 and not tight._seqs
    finally:
        tight.stop()
    assert preemptions >= 2
    roomy = build_engine(tiny_models["llama"], root, block_size=BLOCK)
    try:
        alone = [run_all(roomy, [GenerationRequest(p, replace(params, seed=40 + i),
                                                   adapter=a)])[0]
                 for p, a in zip(prompts, names) for i in range(4)]
    finally:
        roomy.stop()
    got = [c for per in served for c in fold(per, 4)]
    for k, (c, one) in enumerate(zip(got, alone)):
        assert c["finish"] == [FinishReason.LENGTH], k
        assert c["tokens"] == list(one.token_ids), k
        assert c["text"] == one.text, k


async def _collect_all(stream) -> list:
    return [out async for out in stream]


def test_cancel_before_iterating_lets_go_of_every_hold(engine, adapters):
    name = sorted(adapters["llama"])[5]

    async def main():
        stream = engine.submit(GenerationRequest([5, 6], greedy(2), adapter=name, n=3))
        stream.cancel()  # before it starts: it acquires its adapter (3 holds), then lets go
        return [out async for out in stream]

    assert asyncio.run(main()) == []
    assert [i.in_use for i in engine.adapters.list() if i.name == name] == [0]


def test_a_stream_stays_cancellable_until_its_last_completion_ends():
    aborted = []
    stub = SimpleNamespace(cache=SimpleNamespace(hold_more=lambda av, k: None),
                           _enqueue=lambda request, adapters, sink: None,
                           _abort=lambda rid, n: aborted.append((rid, n)))

    async def main():
        stream = RequestStream(stub, GenerationRequest([1], n=2, request_id="r"),
                               asyncio.get_running_loop())
        it = stream.__aiter__()
        stream.deliver(RequestOutput("r", (1,), "a", "", 1, 1,
                                     finish_reason=FinishReason.LENGTH, index=0))
        await it.__anext__()  # completion 0 ended, completion 1 still runs
        stream.cancel()

    asyncio.run(main())
    assert aborted == [("r", 2)]


def test_n_32_is_accepted(engine):
    per = fold(run_outputs(engine, GenerationRequest([5, 6], greedy(1), n=32)), 32)
    assert [len(c["tokens"]) for c in per] == [1] * 32


def test_seed_plus_index_wraps_at_2_64():
    assert SamplingParams(seed=2**64 - 1).for_completion(2).seed == 1


def test_every_guided_completion_follows_the_guide(engine):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5,
                            guided_choice=("yes", "no way"))
    per = fold(run_outputs(engine, GenerationRequest([5, 6, 7], params, n=3)), 3)
    assert all(c["text"] in ("yes", "no way") for c in per), per
