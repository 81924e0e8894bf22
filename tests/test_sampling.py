"""Sampler, incremental detokenizer and stop strings."""

import pytest
import torch

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.request import SamplingParams
from loraplex.engine.stops import StopStringFilter
from loraplex.errors import InvalidArgument
from loraplex.model import sampler
from loraplex.model.sampler import RowContext


def _row(generator=None, output=(), banned=()) -> RowContext:
    return RowContext([], list(output), tuple(banned), generator)


def test_greedy_rows_take_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert sampler.sample(logits, [SamplingParams()] * 2, [_row(), _row()]) == [1, 0]


def test_seed_makes_sampling_reproducible_and_independent_of_batch():
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    def draw(rows):
        gens = [torch.Generator().manual_seed(7) for _ in rows]
        return [sampler.sample(logits[rows], [params] * len(rows), [_row(g) for g in gens])
                for _ in range(5)]
    alone = [steps[0] for steps in draw([2])]
    batched = [steps[1] for steps in draw([0, 2, 3])]
    assert alone == batched  # same seed, same row -> same tokens, whatever the neighbours


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seen = set()
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        seen.update(sampler.sample(logits, [SamplingParams(temperature=5.0, top_k=2)], [_row(g)]))
    assert seen == {0, 1}
    seen = set()
    for seed in range(200):  # probabilities ~ .64 .24 .09 .03: the smallest prefix reaching
        g = torch.Generator().manual_seed(seed)  # 0.7 is the first two
        seen.update(sampler.sample(torch.tensor([[2.0, 1.0, 0.0, -1.0]]),
                                   [SamplingParams(temperature=1.0, top_p=0.7)], [_row(g)]))
    assert seen == {0, 1}


def test_repetition_penalty_follows_hf():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = sampler.apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    # greedy with a strong penalty avoids the repeated token
    p = SamplingParams(repetition_penalty=10.0)
    assert sampler.sample(torch.tensor([[2.0, 1.5]]), [p], [RowContext([0], [])]) == [1]


def test_presence_and_frequency_penalties_follow_openai():
    """logit[t] - frequency * count(t) - presence * (count(t) > 0), over the output only."""
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = sampler.apply_presence_frequency(logits, [3, 3, 1, 3], presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0, 2.0 - 0.25 - 0.5, 3.0, 4.0 - 0.75 - 0.5]
    # greedy too, and a negative penalty encourages: the prompt does not count
    p = SamplingParams(frequency_penalty=2.0)
    assert sampler.sample(torch.tensor([[3.0, 2.0]]), [p], [RowContext([1], [0])]) == [1]
    p = SamplingParams(presence_penalty=-2.0)
    assert sampler.sample(torch.tensor([[3.0, 2.0]]), [p], [RowContext([0], [1])]) == [1]


def test_min_p_keeps_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    for min_p, want in ((0.2, {0, 1, 2}), (0.5, {0, 1})):  # cut at 0.1, at 0.25
        seen = set()
        for seed in range(300):
            p = SamplingParams(temperature=1.0, min_p=min_p)
            g = torch.Generator().manual_seed(seed)
            seen.update(sampler.sample(logits[None], [p], [_row(g)]))
        assert seen == want


def test_banned_tokens_are_never_chosen():
    """Before min_tokens the engine bans EOS and the stop ids: greedy and sampled rows."""
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert sampler.sample(logits, [SamplingParams()], [_row(banned=[0])]) == [1]
    assert sampler.sample(logits, [SamplingParams()], [_row()]) == [0]
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        assert sampler.sample(logits, [SamplingParams(temperature=2.0)],
                              [_row(g, banned=[0, 1])]) == [2]


def test_logit_bias_and_allowed_ids_follow_their_definitions():
    """logit_bias adds to the named logits (greedy too); allowed_token_ids leaves every
    other id at -inf, for greedy and sampled rows alike, and bans still apply inside."""
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    assert sampler.apply_logit_bias(logits, ((0, 2.5), (2, -1.0))).tolist() == [3.5, 2.0, 2.0, 0.5]
    assert sampler.keep_only(logits, (3, 1)).tolist() == [float("-inf"), 2.0, float("-inf"), 0.5]
    biased = SamplingParams(logit_bias=((0, 2.5),))
    assert sampler.sample(logits[None], [biased], [_row()]) == [0]
    allowed = SamplingParams(allowed_token_ids=(0, 3))
    assert sampler.sample(logits[None], [allowed], [_row()]) == [0]
    assert sampler.sample(logits[None], [allowed], [_row(banned=[0])]) == [3]
    # after the penalties: 2 / 2 = 1 (a seen token's positive logit halved) + 0.8 > 1.6
    p = SamplingParams(repetition_penalty=2.0, logit_bias=((0, 0.8),))
    assert sampler.sample(torch.tensor([[2.0, 1.6]]), [p], [RowContext([0], [])]) == [0]
    seen = set()
    for seed in range(100):
        p = SamplingParams(temperature=3.0, allowed_token_ids=(1, 3))
        seen.update(sampler.sample(logits[None], [p], [_row(torch.Generator().manual_seed(seed))]))
    assert seen == {1, 3}


def test_logit_bias_bounds_are_inclusive():
    SamplingParams(logit_bias=tuple((i, 1.0) for i in range(1024))).validate(2048)
    SamplingParams(logit_bias=((5, -100.0), (6, 100.0))).validate(10)
    for bad in (((5, -100.5),), ((5, 100.5),), tuple((i, 1.0) for i in range(1025))):
        with pytest.raises(InvalidArgument, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate(2048)


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    [lp] = sampler.token_logprobs(logits, [1], [2])
    ref = torch.log_softmax(logits[0], -1)
    assert abs(lp.logprob - ref[1].item()) < 1e-6
    assert [t for t, _ in lp.top] == [2, 1]
    mixed = sampler.token_logprobs(torch.randn(2, 10), [0, 1], [3, 0])  # per row
    assert len(mixed[0].top) == 3 and mixed[1].top == ()


class _ByteTokenizer:
    """Each token is one UTF-8 byte: decoding a partial character gives U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_a_character():
    text = "añ€😀b"
    detok = IncrementalDetokenizer(_ByteTokenizer(), list(b"x"))
    pieces = [detok.add(b) for b in text.encode()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[-1] == "b" and pieces[-2] == "😀"  # the emoji came out whole, at its last byte
    assert detok.flush() == ""


def test_detokenizer_flush_gives_a_character_cut_short():
    """An output that ends inside a character: the pieces held it back, the flush gives it
    as U+FFFD, so they add up to the whole output decoded."""
    data = "a€😀".encode()[:-2]  # the emoji's last 2 bytes never come
    detok = IncrementalDetokenizer(_ByteTokenizer(), list(b"x"))
    pieces = [detok.add(b) for b in data]
    assert "".join(pieces) == "a€"
    tail = detok.flush()
    assert "".join(pieces) + tail == data.decode(errors="replace") and tail.startswith("\ufffd")
    assert detok.flush() == ""


def test_included_stop_string_ends_the_text():
    """include_stop: the text ends right after the stop string (the earliest, the longest of
    those starting there), what follows it dropped; held back as without."""
    f = StopStringFilter(("END", "EN", "xy"), include_stop=True)
    assert f.feed("ab E") == ("ab ", False)
    assert f.feed("NDzz xy") == ("END", True)  # "EN" and "END" start together: the longer
    g = StopStringFilter(("xy", "ab"), include_stop=True)
    assert g.feed("1 ab 2 xy") == ("1 ab", True)  # the earliest, not the first listed
    h = StopStringFilter(("END",), include_stop=True)
    assert h.feed("END", armed=False) == ("END", False)  # before min_tokens: let through


def test_stop_string_across_pieces_is_cut_and_held_back():
    f = StopStringFilter(("END",))
    assert f.feed("hello E") == ("hello ", False)  # "E" may start "END": held back
    assert f.feed("N") == ("", False)
    assert f.feed("Dx") == ("", True)  # hit: nothing of the stop string is released
    g = StopStringFilter(("END",))
    assert g.feed("an E") == ("an ", False)
    assert g.feed("Xtra") == ("EXtra", False)  # not a stop after all: released
    assert g.feed("E") == ("", False) and g.flush() == "E"


def test_stop_string_before_min_tokens_is_let_through_but_one_ending_after_is_caught():
    f = StopStringFilter(("END",))
    assert f.feed("a END b E", armed=False) == ("a END b ", False)  # its start held back
    assert f.feed("ND!", armed=True) == ("", True)


def test_masked_greedy_rows_batched_equal_each_row_alone():
    """Greedy rows with only a guide's mask are decided in one masked argmax: the same
    tokens as one by one, beside rows adjusted otherwise and plain ones."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    masks = [torch.rand(50, generator=gen) < 0.2 for _ in range(6)]
    rows = [_row(), sampler.RowContext([], [], mask=masks[1]),
            sampler.RowContext([], [], mask=masks[2]),
            sampler.RowContext([], [], banned=(int(masks[3].nonzero()[0]),), mask=masks[3]),
            sampler.RowContext([], [7], mask=masks[4]), sampler.RowContext([], [], mask=masks[5])]
    params = [SamplingParams(), SamplingParams(), SamplingParams(), SamplingParams(),
              SamplingParams(repetition_penalty=1.5), SamplingParams()]
    got = sampler.sample(logits, params, rows)
    want = [int(logits[0].argmax())] + [sampler.sample_one(logits[i], params[i], rows[i])
                                        for i in range(1, 6)]
    assert got == want
    assert all(bool(masks[i][got[i]]) for i in range(1, 6))


def test_batched_draws_are_each_row_drawn_alone():
    """Seeded rows of every kind in one batch: temperature alone, top-k, top-p, min-p, their
    combinations, a penalty; peaked rows (drawn among 256 candidates) and flat ones (whose
    top-p cut lies past 256 or past 4,096 candidates: the next widths). Each batched token is
    sample_one's for that row alone, from the same seed."""
    gen = torch.Generator().manual_seed(1)
    vocab = 6000
    logits = torch.randn(48, vocab, generator=gen)
    logits[::3] *= 8.0  # peaked rows
    logits[1::6] *= 0.05  # nearly uniform: top-p 0.9 keeps ~5,400 tokens
    kinds = [dict(), dict(top_k=40), dict(top_p=0.9), dict(min_p=0.05),
             dict(top_k=300, top_p=0.8), dict(top_p=0.95, min_p=0.02),
             dict(top_p=0.7, repetition_penalty=1.3), dict(top_k=5000, top_p=0.99),
             dict(top_k=7000, min_p=0.01)]  # (top_k past the vocabulary)
    params = [SamplingParams(temperature=0.5 + 0.1 * (i % 5), **kinds[i % len(kinds)])
              for i in range(48)]
    rows = lambda: [RowContext([1, 2], [3], (), torch.Generator().manual_seed(100 + i))  # noqa: E731
                    for i in range(48)]
    got = sampler.sample(logits, params, rows())
    alone = [sampler.sample_one(logits[i], params[i], row) for i, row in enumerate(rows())]
    assert got == alone
    assert len(set(got)) > 40  # (the seeds differ: so do the draws)


def test_batched_penalties_are_each_row_penalized_alone():
    """Repetition, presence and frequency penalties, alone and together, greedy and drawn,
    beside plain rows and rows with a logit bias or bans: prompts and outputs that repeat
    tokens and share them between the two, an empty output. Each batched token is
    sample_one's for that row alone (the same arithmetic: the same token, not a near one)."""
    gen = torch.Generator().manual_seed(2)
    vocab, n = 500, 40
    logits = torch.randn(n, vocab, generator=gen)
    kinds = [dict(repetition_penalty=1.3), dict(repetition_penalty=0.8),
             dict(frequency_penalty=0.7), dict(presence_penalty=1.5),
             dict(frequency_penalty=-0.4, presence_penalty=0.9, repetition_penalty=1.2),
             dict(), dict(logit_bias=((7, 5.0),)), dict(repetition_penalty=1.5, top_p=0.8)]
    params = [SamplingParams(temperature=0.0 if i % 3 else 0.9, **kinds[i % len(kinds)])
              for i in range(n)]

    def rows():
        out = []
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            prompt = torch.randint(0, vocab // 4, (30 + i,), generator=g).tolist()
            output = [] if i % 7 == 4 else torch.randint(0, vocab // 4, (i,), generator=g).tolist()
            out.append(RowContext(prompt, output, (3, 4) if i % 5 == 0 else (),
                                  torch.Generator().manual_seed(50 + i)))
        return out
    got = sampler.sample(logits, params, rows())
    alone = [sampler.sample_one(logits[i], params[i], row) for i, row in enumerate(rows())]
    assert got == alone
    unpenalized = sampler.sample(logits, [SamplingParams(temperature=p.temperature,
                                                         top_p=p.top_p) for p in params], rows())
    assert sum(a != b for a, b in zip(got, unpenalized)) > n // 3  # (the penalties tell)


def test_flat_rows_drawn_batched_equal_each_row_alone_at_the_cut():
    """Flat rows (a random model's: the top-p cut thousands of tokens down, where
    neighbouring tokens' shares differ by ~1e-4) are where rounding could move the cut.
    The row of seed 29,001 here is one where a float32 softmax's normalizer did (on the AMD
    EPYC this project ran on: kept 167 tokens batched, 166 alone). 160 seeded rows of
    32,000 tokens, 8 to a batch, of three kinds, equal sample_one and the row drawn
    alone."""
    gen = torch.Generator().manual_seed(0)
    for batch in range(30):  # (the generator's 30th batch holds that row)
        logits = torch.randn(8, 32000, generator=gen) * 3
    hard = SamplingParams(temperature=0.7, top_p=0.9)
    assert (sampler.sample(logits, [hard] * 8, [_row(torch.Generator().manual_seed(29000 + i))
                                                for i in range(8)])[1]
            == sampler.sample_one(logits[1], hard, _row(torch.Generator().manual_seed(29001))))
    kinds = [dict(top_p=0.9), dict(top_k=3000, top_p=0.8), dict(top_p=0.95, min_p=0.001)]
    params = [SamplingParams(temperature=0.7, **kinds[i % 3]) for i in range(8)]
    for batch in range(20):
        logits = torch.randn(8, 32000, generator=gen) * 3
        rows = lambda: [_row(torch.Generator().manual_seed(8 * batch + i))  # noqa: E731
                        for i in range(8)]
        got = sampler.sample(logits, params, rows())
        assert got == [sampler.sample_one(logits[i], params[i], r) for i, r in enumerate(rows())]
        assert got == [sampler.sample(logits[i:i + 1], params[i:i + 1], [r])[0]
                       for i, r in enumerate(rows())]


def test_draws_follow_the_kept_distribution():
    """Top-p 0.75 over probabilities .4 .25 .15 .1 .06 .04 keeps the first three (.4 + .25 <
    .75 <= .8): they are drawn .4 / .8, .25 / .8, .15 / .8 of the time (4,000 seeded draws,
    each batched with rows of other kinds)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = torch.stack([probs.log(), torch.randn(6), torch.randn(6)])
    params = [SamplingParams(temperature=1.0, top_p=0.75), SamplingParams(temperature=1.0),
              SamplingParams(temperature=2.0, top_k=2)]
    counts = torch.zeros(6)
    for seed in range(4000):
        rows = [_row(torch.Generator().manual_seed(seed)), _row(), _row()]
        counts[sampler.sample(logits, params, rows)[0]] += 1
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3] / 4000, probs[:3] / 0.8, atol=0.025)
    counts = torch.zeros(6)
    for seed in range(4000):  # temperature alone: every token, as often as its probability
        counts[sampler.sample(probs.log()[None], [SamplingParams(temperature=1.0)],
                              [_row(torch.Generator().manual_seed(seed))])[0]] += 1
    assert torch.allclose(counts / 4000, probs, atol=0.025)


def test_inverse_cdf_never_reaches_a_token_of_no_probability():
    scaled = torch.tensor([[float("-inf"), 1.0, float("-inf"), 2.0, float("-inf")]] * 3)
    below_one = torch.tensor([0.0, 0.5, 1.0 - 2.0 ** -24])
    assert sampler._inverse_cdf(scaled, below_one).tolist() == [1, 3, 3]
