"""vLLM's bad_words (server/loraplex/engine/bad_words.py): the token sequences of a word,
as it is and after a space, never appear in the output; served in a batch beside
requests without them, greedy and sampled."""

import pytest
import torch

from engine_helpers import build_engine, greedy, run_all
from loraplex.engine import bad_words
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.errors import InvalidArgument
from loraplex.model import sampler
from loraplex.model.sampler import RowContext
from models import char_tokenizer, make_prompts

MAX_NEW = 24


def _holds(output, ids) -> bool:
    return any(tuple(output[i:i + len(ids)]) == ids for i in range(len(output)))


def test_a_word_is_banned_as_it_is_and_after_a_space():
    tokenizer = char_tokenizer()
    ab, space = tuple(tokenizer.encode("ab")), tokenizer.encode(" ")[0]
    assert len(ab) == 2  # (one token per byte)
    seqs = bad_words.token_sequences(tokenizer, ("ab", " ab", "c"))
    assert seqs == (ab, (space, *ab), tuple(tokenizer.encode("c")),
                    (space, *tokenizer.encode("c")))  # (" ab" is "ab" again: no repeat)
    a, b = ab
    assert bad_words.banned_next(seqs, []) == [tokenizer.encode("c")[0]]
    assert bad_words.banned_next(seqs, [7, a]) == [b, tokenizer.encode("c")[0]]
    assert sorted(bad_words.banned_next(seqs, [space, a])) == sorted(
        [b, b, tokenizer.encode("c")[0]])
    assert bad_words.banned_next(seqs, [a, 7]) == [tokenizer.encode("c")[0]]


def test_bad_words_limits_are_checked():
    for words in ((" ",), ("",), ("x" * 257,), ("w",) * 65):
        with pytest.raises(InvalidArgument, match="bad_words"):
            SamplingParams(bad_words=words).validate(300)
    SamplingParams(bad_words=("x" * 256,) * 64).validate(300)


def test_when_bans_leave_no_token_the_allowed_ids_win():
    """allowed_token_ids all banned: the choice is among them rather than any other id
    (the output breaks the ban, never the allowed set, and never fails)."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    allowed = SamplingParams(allowed_token_ids=(2, 3))
    assert sampler.sample(logits, [allowed], [RowContext([], [], banned=(2, 3))]) == [2]
    hot = SamplingParams(allowed_token_ids=(2, 3), temperature=1.0)
    for seed in range(20):
        row = RowContext([], [], banned=(2, 3), generator=torch.Generator().manual_seed(seed))
        assert sampler.sample(logits, [hot], [row])[0] in (2, 3)


def test_bad_words_never_appear_and_leave_the_batch_alone(tiny_models, adapters):
    """A word the greedy output holds (two tokens) and a one-token word: with them banned
    the output keeps its start up to the banned token, then differs, and never holds
    them; greedy and seeded requests without bad words beside it are unchanged."""
    arch = "llama"
    tokenizer = char_tokenizer()
    prompt = make_prompts(1, min_len=6, max_len=6, seed=5)[0]
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=9, ignore_eos=True)
    engine = build_engine(tiny_models[arch], next(iter(adapters[arch].values())).parent)
    try:
        plain, plain_sampled = run_all(engine, [GenerationRequest(prompt, greedy(MAX_NEW)),
                                                GenerationRequest(prompt, sampled)])
        out = list(plain.token_ids)
        at = next(i for i in range(1, MAX_NEW - 1)  # (a pair first seen there, spelt alone)
                  if not _holds(out[:i + 1], tuple(out[i:i + 2]))
                  and tokenizer.encode(tokenizer.decode(out[i:i + 2])) == out[i:i + 2]
                  and tokenizer.decode(out[i:i + 2]).strip() == tokenizer.decode(out[i:i + 2]))
        pair = tuple(out[at:at + 2])
        single = next(t for t in out if tokenizer.decode([t]).strip()
                      and tokenizer.encode(tokenizer.decode([t])) == [t])
        words = (tokenizer.decode(list(pair)), tokenizer.decode([single]))
        banned = [GenerationRequest(prompt, greedy(MAX_NEW, bad_words=words)),
                  GenerationRequest(prompt, SamplingParams(
                      max_new_tokens=MAX_NEW, temperature=1.0, seed=9, ignore_eos=True,
                      bad_words=words))]
        outs = run_all(engine, [GenerationRequest(prompt, greedy(MAX_NEW)), *banned,
                                GenerationRequest(prompt, sampled)])
    finally:
        engine.stop()
    assert list(outs[0].token_ids) == out and outs[3].token_ids == plain_sampled.token_ids
    for o in outs[1:3]:
        got = list(o.token_ids)
        assert len(got) == MAX_NEW and single not in got and not _holds(got, pair), words
    got = list(outs[1].token_ids)
    first = min(at + 1, out.index(single))  # (where the ban first bites)
    assert got[:first] == out[:first] and got[first] != out[first]
