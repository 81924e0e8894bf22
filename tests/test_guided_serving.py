"""Guided requests served in a mixed batch against HF PEFT constrained by brute force.

The reference runs each request alone through PEFT: at every step it scores the output
so far and takes, among the tokens whose decoded text is still a prefix of some string
of the (finite, enumerated) language, the likeliest; EOS counts once the text is in the
language, and the output ends when no longer string starts with it. No automaton: it
checks the engine's guides from the outside.
"""

import itertools

import pytest

from engine_helpers import build_engine, run_all, run_staggered
from loraplex.engine.request import FinishReason, GenerationRequest, SamplingParams
from loraplex.errors import InvalidArgument
from models import EOS_ID, char_tokenizer, make_prompts
from peft_reference import peft_prompt_logprobs

MAX_NEW = 24
LANGUAGES = {  # guided_regex or guided_choice -> every string it allows
    "(cat|dog|bird)-[0-9]{2}": {f"{a}-{n:02d}" for a in ("cat", "dog", "bird") for n in range(100)},
    "[a-c]{1,3}x?": {"".join(p) + x for n in (1, 2, 3) for p in itertools.product("abc", repeat=n)
                     for x in ("", "x")},
    ("alpha", "beta", "be", "gamma delta"): {"alpha", "beta", "be", "gamma delta"},
    ("yes", "no"): {"yes", "no"},
}


def guided(spec, **kwargs) -> SamplingParams:
    key = "guided_choice" if isinstance(spec, tuple) else "guided_regex"
    return SamplingParams(max_new_tokens=MAX_NEW, **{key: spec}, **kwargs)


def reference(base_dir, adapter_dir, prompt, language) -> list[int]:
    tokenizer = char_tokenizer()
    out: list[int] = []
    while len(out) < MAX_NEW:
        text = tokenizer.decode(out)
        if text in language and not any(s != text and s.startswith(text) for s in language):
            break  # final: the engine ends it without EOS
        logp = peft_prompt_logprobs(base_dir, adapter_dir, prompt + out + [EOS_ID])[-1]
        ok = [t for t in range(4, len(logp))
              if any(s.startswith(tokenizer.decode(out + [t])) for s in language)]
        ok += [EOS_ID] if text in language else []
        token = max(ok, key=lambda t: logp[t])
        out.append(token)
        if token == EOS_ID:
            break
    return out


def test_guided_requests_in_a_mixed_batch_match_constrained_peft(tiny_models, adapters):
    """Eight guided requests over four adapters and the base model, beside two unguided
    ones; three join while the others decode."""
    arch = "llama"
    names = sorted(adapters[arch])[:4]
    specs = list(LANGUAGES)
    prompts = make_prompts(10, min_len=3, max_len=30, seed=21)
    wanted = [names[0], names[1], "", names[2], names[3], "", names[0], names[1], names[2], ""]
    params = [guided(specs[i % len(specs)]) for i in range(8)]
    params += [SamplingParams(max_new_tokens=8, ignore_eos=True)] * 2
    order = [0, 1, 2, 3, 8, 4, 5, 9, 6, 7]  # unguided ones among the first
    requests = [GenerationRequest(prompts[i], params[i], adapter=wanted[i]) for i in order]
    engine = build_engine(tiny_models[arch], adapters[arch][names[0]].parent)
    try:
        outs, _ = run_staggered(engine, requests[:7], requests[7:], after_tokens=2)
    finally:
        engine.stop()
    tokenizer = char_tokenizer()
    ended_by_eos = 0
    for request, out in zip(requests, outs):
        params = request.sampling
        if params.guide is None:
            assert len(out.token_ids) == 8
            continue
        spec = params.guided_choice or params.guided_regex
        language = LANGUAGES[spec]
        adapter_dir = adapters[arch][request.adapter] if request.adapter else None
        want = reference(tiny_models[arch], adapter_dir, request.prompt_ids, language)
        assert list(out.token_ids) == want, (spec, request.adapter)
        assert out.finish_reason is FinishReason.STOP
        assert tokenizer.decode(out.token_ids, skip_special_tokens=True) in language
        assert out.text in language
        ended_by_eos += out.token_ids[-1] == EOS_ID
    assert ended_by_eos < 8  # (most end because their match is final)


def test_sampled_guided_output_matches_and_its_seed_repeats(tiny_models, adapters):
    arch = "qwen3"
    name = sorted(adapters[arch])[0]
    prompt = make_prompts(2, min_len=8, max_len=8, seed=22)[0]
    spec = "(cat|dog|bird)-[0-9]{2}"
    requests = [GenerationRequest(prompt, guided(spec, temperature=1.5, seed=s, top_k=50),
                                  adapter=name) for s in (1, 2, 3, 1)]
    engine = build_engine(tiny_models[arch], adapters[arch][name].parent)
    try:
        outs = run_all(engine, requests)
    finally:
        engine.stop()
    assert all(out.text in LANGUAGES[spec] for out in outs)
    assert outs[0].token_ids == outs[3].token_ids
    steps = next(s.value for m in engine.metrics.registry.collect()
                 if m.name == "loraplex_guide_mask_seconds" for s in m.samples
                 if s.name.endswith("_count"))
    # one per step that sampled a guided request (they may not all start in one step)
    assert max(len(out.token_ids) for out in outs) <= steps <= engine.steps
    assert len({out.text for out in outs}) > 1


def test_a_finished_match_ends_even_before_min_tokens(tiny_models, adapters):
    """A choice that is complete ends the request; when the only way on is a stop token
    that min_tokens bans, the guide wins and the stop token ends it."""
    arch = "llama"
    tokenizer = char_tokenizer()
    b_id = tokenizer.convert_tokens_to_ids("b")
    prompt = make_prompts(2, min_len=5, max_len=5, seed=23)[0]
    requests = [GenerationRequest(prompt, guided(("ab",), min_tokens=6)),
                GenerationRequest(prompt, guided(("ab",), min_tokens=6, stop_token_ids=(b_id,)))]
    engine = build_engine(tiny_models[arch], next(iter(adapters[arch].values())).parent)
    try:
        outs = run_all(engine, requests)
    finally:
        engine.stop()
    assert [out.text for out in outs] == ["ab", "ab"]
    assert all(list(out.token_ids) == tokenizer.encode("ab") for out in outs)  # nothing else
    assert all(out.finish_reason is FinishReason.STOP for out in outs)


def test_a_guide_past_its_limits_ends_only_its_request(tiny_models, adapters, monkeypatch):
    """A pattern whose automaton outgrows its state limit, or that the vocabulary cannot
    spell, ends INVALID with a message that says what to fix; the requests batched with
    it go on."""
    monkeypatch.setattr("loraplex.engine.byte_regex.MAX_DFA_STATES", 12)
    arch = "llama"
    prompt = make_prompts(2, min_len=5, max_len=5, seed=24)[0]
    requests = [GenerationRequest(prompt, guided(r"[a-z]*a[a-z]{5}")),
                GenerationRequest(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True)),
                GenerationRequest(prompt, guided(("yes", "no"))),
                # the test tokenizer has no token for the bytes 0x1c-0x1f
                GenerationRequest(prompt, guided(("ok\x1c",)))]
    engine = build_engine(tiny_models[arch], next(iter(adapters[arch].values())).parent)
    try:
        bad, plain, fine, unspellable = run_all(engine, requests)
    finally:
        engine.stop()
    assert bad.finish_reason is FinishReason.INVALID
    assert "simplify the pattern" in bad.error and "12 states" in bad.error
    assert unspellable.finish_reason is FinishReason.INVALID and unspellable.text == "ok"
    assert "no token of the vocabulary continues" in unspellable.error
    assert len(plain.token_ids) == 6 and plain.finish_reason is FinishReason.LENGTH
    assert fine.text in ("yes", "no") and fine.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("spec", [("alpha", "beta"), "[0-9]{2}"])
def test_a_guided_request_survives_preemption(tiny_models, adapters, spec):
    """Recomputed after a preemption, a guided request keeps its automaton's state: the
    same tokens as when it ran alone."""
    from engine_helpers import tiny_llama_blocks

    arch = "llama"
    root = next(iter(adapters[arch].values())).parent
    prompts = make_prompts(4, min_len=30, max_len=30, seed=25)
    alone = build_engine(tiny_models[arch], root)
    try:
        want = run_all(alone, [GenerationRequest(prompts[0], guided(spec))])[0]
    finally:
        alone.stop()
    engine = build_engine(tiny_models[arch], root, block_size=4,
                          kv_cache_memory=tiny_llama_blocks(20, 4))
    try:
        outs = run_all(engine, [GenerationRequest(p, SamplingParams(max_new_tokens=12,
                                                                    ignore_eos=True))
                                for p in prompts[1:]]
                       + [GenerationRequest(prompts[0], guided(spec))])
        preemptions = engine.scheduler.num_preemptions
    finally:
        engine.stop()
    assert preemptions > 0
    assert outs[-1].token_ids == want.token_ids and outs[-1].text == want.text


def test_guides_keep_ignore_eos_and_min_tokens(tiny_models, adapters):
    """EOS pushed by +100: ignored, the guide's own end stops the output; with min_tokens,
    EOS waits for it, then wins."""
    arch = "llama"
    prompt = make_prompts(2, min_len=5, max_len=5, seed=26)[0]
    push = ((EOS_ID, 100.0),)
    requests = [GenerationRequest(prompt, guided("a{1,5}", ignore_eos=True, logit_bias=push)),
                GenerationRequest(prompt, guided("a{1,5}", min_tokens=3, logit_bias=push))]
    engine = build_engine(tiny_models[arch], next(iter(adapters[arch].values())).parent)
    try:
        ignored, waited = run_all(engine, requests)
    finally:
        engine.stop()
    assert EOS_ID not in ignored.token_ids and ignored.text == "aaaaa"
    assert ignored.finish_reason is FinishReason.STOP
    assert waited.text == "aaa" and waited.token_ids[-1] == EOS_ID


def test_a_guide_that_outgrows_its_limit_on_its_last_token_ends_alone(tiny_models, adapters,
                                                                       monkeypatch):
    """The check that a match is final can grow the automaton too: past the limit there,
    only that request ends (INVALID), not the whole step."""
    monkeypatch.setattr("loraplex.engine.byte_regex.MAX_DFA_STATES", 2)
    arch = "llama"
    prompt = make_prompts(2, min_len=5, max_len=5, seed=23)[0]
    engine = build_engine(tiny_models[arch], next(iter(adapters[arch].values())).parent)
    try:
        bad, plain = run_all(engine, [
            GenerationRequest(prompt, SamplingParams(max_new_tokens=8, guided_regex="ab?")),
            GenerationRequest(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))])
    finally:
        engine.stop()
    assert bad.finish_reason is FinishReason.INVALID and "simplify the pattern" in bad.error
    assert plain.finish_reason is FinishReason.LENGTH and engine.failure is None


def test_validation_compiles_the_guide(tiny_models, adapters):
    """A pattern that does not compile is refused at submission, before any stream."""
    arch = "llama"
    engine = build_engine(tiny_models[arch], next(iter(adapters[arch].values())).parent)
    try:
        for params, says in ((SamplingParams(guided_regex="a(?=b)"), "lookaround"),
                             (SamplingParams(guided_json='{"type": "object", "required": ["a"]}'),
                              "not in properties")):
            with pytest.raises(InvalidArgument, match=says):
                engine.validate(GenerationRequest([5, 6], params))
    finally:
        engine.stop()


def test_guided_limits_are_inclusive():
    from loraplex.engine.request import MAX_GUIDED_CHOICE, MAX_GUIDED_CHOICES, MAX_GUIDED_REGEX

    SamplingParams(guided_regex="a" * MAX_GUIDED_REGEX).validate(100)
    SamplingParams(guided_choice=tuple(str(i) for i in range(MAX_GUIDED_CHOICES))).validate(100)
    SamplingParams(guided_choice=("a" * MAX_GUIDED_CHOICE,)).validate(100)
    for params in (SamplingParams(guided_regex="a" * (MAX_GUIDED_REGEX + 1)),
                   SamplingParams(guided_choice=tuple(map(str, range(MAX_GUIDED_CHOICES + 1)))),
                   SamplingParams(guided_choice=("a" * (MAX_GUIDED_CHOICE + 1),))):
        with pytest.raises(InvalidArgument, match="guided_"):
            params.validate(100)
