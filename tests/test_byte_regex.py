"""The byte automaton of guided decoding (engine.byte_regex) against Python's re.

Full matches are compared with re.fullmatch(pattern, text, re.ASCII) on strings drawn from
each pattern's own characters and some multi-byte ones; the live prefixes (what a token
mask needs) against the prefixes of a finite language enumerated by brute force.
"""

import itertools
import random
import re

import pytest

from loraplex.engine.byte_regex import (DEAD, GuideTooLarge, compile_regex, compile_tree, parse,
                                        to_pattern, utf8_sequences, without_chars)
from loraplex.engine.guide_compiler import guide_tree
from loraplex.errors import InvalidArgument

PATTERNS = [
    r"(yes|no)[0-9]{1,3}",
    r"[a-c]+x?",
    r"a{2,}b*",
    r"a{,2}c",
    r"(?:ab|a)(?P<tail>c|bc)*",
    r'"([^"\\]|\\.)*"',
    r"\d+\.\d{2}",
    r"\w+@\w+\.(com|org)",
    r"[^a-z]{2}",
    r"\s*-?\S+",
    r"\D\W",
    r".é.",
    r"[é-ü中]+",
    r"\x41\u00e9\U0001F600",
    r"^a|b$",
    r"a{",
    r"[]a]|[^]a]",
    r"[a\-z]+",
    r"(a|)+b",
    r"(ab){0}c",
    r"[\d\s.]*",
    r"a+?b??c*?",
    r"(a|bc){0,4}d",
    r"(a?b?){1,3}c",
    r"[^\n]{0,5}\n",
]
ALPHABET_EXTRA = ["é", "ü", "中", "😀", "\n", " ", "\\", '"', "-", ".", "\v", "\f", "\x00"]


def _alphabet(pattern: str) -> list[str]:
    chars = {c for c in pattern if c.isprintable()} | set(ALPHABET_EXTRA) | set("a0_")
    return sorted(chars)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_full_matches_are_pythons(pattern):
    dfa = compile_regex(pattern)
    expected = re.compile(pattern, re.ASCII)
    rng = random.Random(pattern)
    alphabet = _alphabet(pattern)
    samples = ["", "yes42", "no", "aab", "c", '"a\\"b"', "12.34", "x@y.com", "AB", " -x", "aéb",
               "A\u00e9\U0001F600", "a{", "]", "b", "ab", "c"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                for _ in range(3000)]
    matched = 0
    for text in samples:
        want = expected.fullmatch(text) is not None
        matched += want
        assert dfa.matches(text.encode()) == want, (pattern, text)
    assert matched > 0, pattern  # (the samples exercise both answers)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_without_chars_matches_the_strings_free_of_them(pattern):
    """without_chars(p, banned) matches what p matches, less the strings holding a banned
    character: checked against Python's re on p, through re and the automaton."""
    banned = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x61, 0x61)]  # JSON's and 'a'
    restricted = to_pattern(without_chars(parse(pattern), banned))
    ours, theirs = re.compile(restricted), re.compile(pattern, re.ASCII)
    try:
        dfa = compile_regex(restricted)
    except InvalidArgument as exc:  # e.g. a{2,}b* without 'a'
        assert "matches no string" in str(exc)
        dfa = None
    rng = random.Random(pattern)
    alphabet = _alphabet(pattern)
    samples = ["", "yes42", "no", "b", "bb", "12.34", '"x"', "c\\c", "x\ty", "bc"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(2000)]
    for text in samples:
        want = theirs.fullmatch(text) is not None and not any(
            lo <= ord(c) <= hi for c in text for lo, hi in banned)
        assert (ours.fullmatch(text) is not None) == want, (pattern, text, restricted)
        assert (dfa is not None and dfa.matches(text.encode())) == want, (pattern, text)


def test_without_chars_may_leave_nothing():
    with pytest.raises(InvalidArgument, match="matches no string"):
        compile_tree(without_chars(parse("a"), [(0x61, 0x61)]))
    dfa = compile_tree(without_chars(parse("a|b"), [(0x61, 0x61)]))
    assert dfa.matches(b"b") and not dfa.matches(b"a")


@pytest.mark.parametrize("pattern,alphabet,length", [
    (r"(ab|a)c?[xy]{1,2}", "abcxy", 6),
    (r"(cat|dog)-[0-9]", "catdog-0", 5),
    (r"a(b|c)*d", "abcd", 5),
])
def test_live_prefixes_are_those_of_the_language(pattern, alphabet, length):
    """A prefix leads to a live state exactly when some string of the language starts
    with it, and to an accepting one when it is in the language; a final state is one no
    string extends. (Prefixes shorter than `length`: every pattern here extends a live
    prefix within one more character.)"""
    dfa = compile_regex(pattern)
    strings = ["".join(s) for n in range(length + 1)
               for s in itertools.product(alphabet, repeat=n)]
    language = [s for s in strings if re.fullmatch(pattern, s)]
    assert language
    for prefix in (s for s in strings if len(s) < length):
        state = dfa.walk(dfa.start, prefix.encode())
        live = any(s.startswith(prefix) for s in language)
        assert (state != DEAD) == live, prefix
        if live:
            assert dfa.accepting[state] == (prefix in language), prefix
            longer = any(s.startswith(prefix) and s != prefix for s in language)
            assert dfa.is_final(state) == (prefix in language and not longer), prefix


def test_choices_match_exactly_their_strings():
    choices = ("a.b", "a*", "(x|y)", "ok?", "中文", "back\\slash")
    dfa = compile_tree(guide_tree(("choice", choices)))
    for c in choices:
        assert dfa.matches(c.encode()), c
    for other in ("axb", "a", "aa", "x", "ok", "o", "中", "backslash"):
        assert not dfa.matches(other.encode()), other


def test_utf8_sequences_cover_exactly_their_code_points():
    def encodes(seqs, data):
        return any(len(s) == len(data) and all(lo <= b <= hi for b, (lo, hi) in zip(data, s))
                   for s in seqs)
    rng = random.Random(0)
    edges = [0, 0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]
    ranges = [(a, b) for a in edges for b in edges if a <= b]
    ranges += [tuple(sorted(rng.randrange(0x110000) for _ in range(2))) for _ in range(100)]
    for lo, hi in ranges:
        seqs = utf8_sequences(lo, hi)
        probes = {lo, hi, max(lo - 1, 0), min(hi + 1, 0x10FFFF)} | set(edges)
        probes |= {rng.randint(lo, hi) for _ in range(30)}
        for cp in probes:
            if not 0xD800 <= cp <= 0xDFFF:
                assert encodes(seqs, chr(cp).encode()) == (lo <= cp <= hi), (lo, hi, cp)
        assert not any(encodes(seqs, b"\xed" + bytes([b, 0x80])) for b in range(0xA0, 0xC0))


@pytest.mark.parametrize("pattern,says", [
    (r"(a)\1", "backreferences"),
    (r"(?=a)a", "lookaround"),
    (r"(?i)a", "inline flags"),
    (r"a\b", "word boundaries"),
    (r"a**", "multiple repeat"),
    (r"*a", "nothing to repeat"),
    (r"[z-a]", "bad character range"),
    (r"(a", "missing ')'"),
    (r"a)", "unbalanced ')'"),
    (r"a{2,1}", "n < m"),
    (r"a{1001}", "above 1000"),
    (r"a^b", "'^' is supported at the start only"),
    (r"a$b", "'$' is supported at the end only"),
    (r"[abc", "unterminated character class"),
    (r"\q", "unknown escape"),
    ("a\\", "trailing backslash"),
    (r"\x4", "hex digits"),
    (r"(a{1000}){1000}", "automaton states"),
])
def test_bad_patterns_say_what_to_fix(pattern, says):
    with pytest.raises(InvalidArgument, match=re.escape(says)) as err:
        compile_regex(pattern)
    assert "position" in str(err.value) or "states" in str(err.value)


def test_an_automaton_past_its_state_limit_raises(monkeypatch):
    """A DFA is built lazily: a pattern whose states multiply fails as it is walked."""
    monkeypatch.setattr("loraplex.engine.byte_regex.MAX_DFA_STATES", 40)
    dfa = compile_regex(r"[ab]*a[ab]{6}")
    rng = random.Random(0)
    walk = bytes(rng.choice(b"ab") for _ in range(200))
    with pytest.raises(GuideTooLarge):
        dfa.walk(dfa.start, walk)


def test_a_bounded_repeat_keeps_its_states_small():
    """x{0,n} is nested, (x(x(x)?)?)?: after k copies the automaton is in copy k + 1 or
    done, not in every copy after k as with x?x?x? (whose 200-state sets made the first
    mask of [^\n]{0,200} take 300 ms on a 128k vocabulary)."""
    dfa = compile_regex(r"[^\n]{0,200}\n")
    state = dfa.start
    for k in range(200):
        state = dfa.next(state, ord("a"))
        assert len(dfa._sets[state]) <= 8, (k, len(dfa._sets[state]))
    assert dfa.next(state, ord("a")) == DEAD and dfa.matches(b"a" * 200 + b"\n")


def _m(pattern: str, text: str) -> bool:
    return compile_regex(pattern).matches(text.encode())


def test_edges_of_classes_escapes_and_anchors():
    """Cases the differential samples can miss (each once seen to slip through a mutant)."""
    assert _m(r"\s", "\v") and _m(r"\s", "\f") and not _m(r"\S", "\v")
    assert _m(r"[^a]", "\x00") and _m(r".", "\x00") and _m(r"\W", "\x00")  # U+0000 counts
    assert _m(r"[a-zb-c]+", "xyz") and _m(r"[a-mc-d]", "k")  # overlapping ranges merge
    assert _m(r"a|[\uD000-\uD800]", "a")  # a range ending on a surrogate
    assert utf8_sequences(0xD000, 0xD800) == utf8_sequences(0xD000, 0xD7FF)
    assert _m(r"a$|b", "a") and _m(r"(a$)", "a")  # '$' at the end of a branch
    assert _m(r"[a-]", "-") and _m(r"[a-]", "a") and not _m(r"[a-]", "b")
    assert _m(r"a\0", "a\x00")
    for pattern, says in ((r"\xZZ", "hex digits"), (r"\U00110000", "U+10FFFF")):
        with pytest.raises(InvalidArgument, match=re.escape(says)):
            compile_regex(pattern)


def test_states_that_cannot_reach_a_match_are_dead():
    """An empty class makes its branch a dead end: trimmed, so its prefix is DEAD at once
    (a mask would otherwise allow tokens that lead nowhere)."""
    dfa = compile_regex(r"ac[^\x00-\U0010FFFF]|ab")
    assert dfa.walk(dfa.start, b"ac") == DEAD
    assert dfa.walk(dfa.start, b"a") != DEAD and dfa.matches(b"ab")


def test_without_chars_keeps_a_zero_repeat():
    restricted = to_pattern(without_chars(parse("ab{0}c"), [(0x22, 0x22)]))
    assert re.fullmatch(restricted, "ac") and not re.fullmatch(restricted, "abc")
