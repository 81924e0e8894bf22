"""Preemption end to end: a KV cache too small for the batch.

When the running sequences need more blocks than are free, the scheduler preempts the
newest one (its blocks freed; it is recomputed later from its prompt and the tokens it
has produced). A preempted request must still stream exactly what it streams alone, and
nothing twice.
"""

from engine_helpers import build_engine, run_all, tiny_llama_blocks
from loraplex.engine.request import FinishReason, GenerationRequest, SamplingParams
from peft_reference import peft_greedy

MAX_NEW = 24
BLOCK = 8


def test_preempted_requests_stream_what_they_stream_alone(tiny_models, adapters,
                                                          adapter_root, prompts):
    """8 requests (6 adapters, 2 base-model ones; greedy and seeded sampling alternate)
    need 44 blocks of 8 tokens; the cache holds 16, any one request at most 8. Greedy
    requests must serve PEFT's tokens; sampled ones the tokens they get alone, through the
    same engine config with room to spare; and the tight engine must have preempted."""
    names = sorted(adapters["llama"])[:6]
    wanted = [names.pop() if i % 4 != 3 else "" for i in range(8)]
    requests = []
    for i, adapter in enumerate(wanted):
        sampling = (SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True) if i % 2 == 0
                    else SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True,
                                        temperature=0.9, top_p=0.95, seed=100 + i))
        requests.append(GenerationRequest(prompts[i + 2], sampling, adapter=adapter))
    tight = build_engine(tiny_models["llama"], adapter_root / "llama", block_size=BLOCK,
                         kv_cache_memory=tiny_llama_blocks(16, BLOCK))
    try:
        assert tight.blocks.num_blocks == 16
        served = run_all(tight, requests)
        preemptions = tight.scheduler.num_preemptions
    finally:
        tight.stop()
    roomy = build_engine(tiny_models["llama"], adapter_root / "llama", block_size=BLOCK)
    try:
        alone = [run_all(roomy, [r])[0] for r in requests]
    finally:
        roomy.stop()

    assert preemptions >= 2
    for i, (request, out, ref) in enumerate(zip(requests, served, alone)):
        assert out.finish_reason is FinishReason.LENGTH, (i, out.error)
        assert out.completion_tokens == len(out.token_ids) == MAX_NEW, i
        assert out.token_ids == ref.token_ids, f"request {i} ({request.adapter or 'base'})"
        assert out.text == ref.text, i
        if request.sampling.temperature == 0:
            adapter_dir = adapters["llama"][request.adapter] if request.adapter else None
            tokens, _ = peft_greedy(tiny_models["llama"], adapter_dir, request.prompt_ids,
                                    MAX_NEW)
            assert list(out.token_ids) == tokens, f"request {i} against PEFT"
