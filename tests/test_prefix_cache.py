"""Prefix caching end to end: requests that start alike share KV blocks, with the same
adapter version only, and serve exactly what PEFT serves for them alone."""

from engine_helpers import build_engine, greedy, run_all
from loraplex.engine.request import GenerationRequest
from models import make_prompts
from peft_reference import peft_greedy

BLOCK = 8
MAX_NEW = 10


def hit_tokens(engine) -> float:
    return next(s.value for m in engine.metrics.registry.collect()
                if m.name == "loraplex_prefix_cache_hit_tokens" for s in m.samples
                if s.name.endswith("_total"))


def test_shared_prefixes_are_found_per_adapter_and_serve_peft_tokens(tiny_models, adapters):
    """A 20-token system prompt (2 full blocks of 8) before distinct questions. Wave 1
    computes it with adapter A and with the base model; in wave 2 the same prefix is found
    for A and the base (16 tokens each), not for adapter B, and a repeat of a wave-1
    request (24 tokens: 3 full blocks) finds all of them but the one holding its last
    prompt token, which is computed again (it gives the first token's logits)."""
    arch = "llama"
    a, b = sorted(adapters[arch])[:2]
    system, *questions = make_prompts(6, min_len=20, max_len=20, seed=5)
    questions = [q[:3 + i] for i, q in enumerate(questions)]  # 3..7 tokens each
    engine = build_engine(tiny_models[arch], adapters[arch][a].parent, block_size=BLOCK)
    try:
        wave1 = [(a, system + questions[0]), ("", system + questions[1])]
        wave2 = [(a, system + questions[2]), ("", system + questions[3]),
                 (b, system + questions[4]), wave1[1]]
        outs = {}
        for wave in (wave1, wave2):
            before = hit_tokens(engine)
            served = run_all(engine, [GenerationRequest(p, greedy(MAX_NEW), adapter=n)
                                      for n, p in wave])
            outs[id(wave)] = served
        assert before == 0 and hit_tokens(engine) == 16 + 16 + 0 + 16
        assert len(wave1[1][1]) == 3 * BLOCK
    finally:
        engine.stop()
    assert outs[id(wave2)][3].token_ids == outs[id(wave1)][1].token_ids
    for wave in (wave1, wave2):
        for (name, prompt), out in zip(wave, outs[id(wave)]):
            tokens, _ = peft_greedy(tiny_models[arch], adapters[arch][name] if name else None,
                                    prompt, MAX_NEW)
            assert list(out.token_ids) == tokens, (name or "base", len(prompt))


def test_prefix_caching_off_finds_nothing(tiny_models, adapters):
    arch = "llama"
    a = sorted(adapters[arch])[0]
    prompt = make_prompts(2, min_len=30, max_len=30, seed=6)[0]
    engine = build_engine(tiny_models[arch], adapters[arch][a].parent, block_size=BLOCK,
                          prefix_caching=False)
    try:
        first, again = (run_all(engine, [GenerationRequest(prompt, greedy(4), adapter=a)])[0]
                        for _ in range(2))
        assert hit_tokens(engine) == 0 and engine.blocks.num_remembered == 0
    finally:
        engine.stop()
    assert first.token_ids == again.token_ids


def test_requests_arriving_together_share_their_prefix(tiny_models, adapters):
    """Three requests for one adapter, one system prompt of 2 full blocks, submitted at
    once: the first computes the prefix, the two admitted after it find it, in the same
    step when they arrive in time for it (each layer writes every new key and value
    before any sequence attends)."""
    arch = "llama"
    a = sorted(adapters[arch])[0]
    system, *questions = make_prompts(4, min_len=16, max_len=16, seed=7)
    plan = [system + q[:2 + i] for i, q in enumerate(questions)]
    engine = build_engine(tiny_models[arch], adapters[arch][a].parent, block_size=BLOCK)
    try:
        outs = run_all(engine, [GenerationRequest(p, greedy(MAX_NEW), adapter=a) for p in plan])
        assert hit_tokens(engine) == 2 * 16  # (the same step: see test_scheduler)
    finally:
        engine.stop()
    for prompt, out in zip(plan, outs):
        tokens, _ = peft_greedy(tiny_models[arch], adapters[arch][a], prompt, MAX_NEW)
        assert list(out.token_ids) == tokens, len(prompt)
