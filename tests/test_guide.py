"""Guided decoding's token masks (engine.guide) on three kinds of tokenizer.

The bytes read for each token must be what decoding adds to a text, for byte-level BPE
(GPT-2 style, with merges), SentencePiece-style BPE ("▁" and <0xNN> byte fallback) and
the one-byte-per-token test tokenizer; a state's mask must allow exactly the tokens whose
bytes keep the automaton alive, found here token by token.
"""

import random

import pytest
import torch
from tokenizers import (AddedToken, Tokenizer, decoders, models as tk_models, pre_tokenizers,
                        trainers)
from transformers import PreTrainedTokenizerFast

from loraplex import cpu_kernels
from loraplex.engine.byte_regex import DEAD, compile_regex
from loraplex.engine.guide import Guide, GuideCache, Vocabulary, token_bytes
from loraplex.errors import InvalidArgument
from models import VOCAB_SIZE, char_tokenizer

CORPUS = ["the cat sat on the mat", "naïve café über straße", "中文 日本語 한국어",
          '{"name": "Ada", "age": 36, "tags": ["x", "y"]}', "emoji 😀 and 🎉 tokens",
          "def f(x):\n    return x * 2\n"] * 40
EOS = 2


@pytest.fixture(params=["numpy", "c"])
def kernels(request):
    """The two walks of a mask: numpy level by level, or cpu_kernels' trie_walk."""
    if request.param == "numpy":
        return None
    lib = cpu_kernels.load()
    assert lib is not None, "the CPU kernels did not build (see the log)"
    return lib


def byte_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE with merges (GPT-2 / Llama 3 style), trained here."""
    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (Llama 2 / Mistral): "▁" for spaces, <0xNN> byte fallback."""
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + list("▁abcdefghijklmnopqrstuvwxyz")
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁c", "at"), ("▁", "c")]
    pieces += ["".join(m) for m in merges]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                  byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    for s in specials:
        tok.add_special_tokens([s])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


TOKENIZERS = {"char": char_tokenizer, "byte_bpe": byte_bpe, "sentencepiece": sentencepiece_bpe}


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_token_bytes_are_what_decoding_adds(kind):
    tokenizer = TOKENIZERS[kind]()
    size = len(tokenizer)
    spelled = token_bytes(tokenizer, size)
    special = set(tokenizer.all_special_ids)
    assert not special & set(spelled)
    context = tokenizer.encode("the", add_special_tokens=False)
    before = tokenizer.decode(context)
    checked = 0
    for i, data in spelled.items():
        try:
            text = data.decode()
        except UnicodeDecodeError:
            continue  # part of a character: decoding alone shows U+FFFD
        assert tokenizer.decode(context + [i])[len(before):] == text, (i, data)
        checked += 1
    assert checked > 0.4 * len(spelled)
    assert len(spelled) == size - len(special)  # every ordinary token is read
    if kind == "sentencepiece":
        assert spelled[tokenizer.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
        assert spelled[tokenizer.convert_tokens_to_ids("▁the")] == b" the"


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("pattern,walks", [
    (r'\{"name": "[^"]{0,12}", "age": [0-9]{1,3}\}', ['{"name": "Ada", "age": 36}', '{"na']),
    (r"(café|naïve|中文|😀)+( |!)", ["café中文", "😀😀 "]),
    (r"(the|cat|sat|on)( (the|cat|sat|on))*", ["the cat", "on the mat"]),
])
def test_masks_allow_exactly_the_tokens_that_keep_a_match_possible(kind, pattern, walks,
                                                                   kernels):
    tokenizer = TOKENIZERS[kind]()
    vocab = Vocabulary.of(tokenizer, len(tokenizer) + 3)  # (ids past the tokenizer: padding)
    guide = Guide(compile_regex(pattern), vocab, kernels)
    dfa = guide.dfa
    states = {dfa.start}
    for text in walks:
        data = text.encode()
        for n in range(1, len(data) + 1):
            state = dfa.walk(dfa.start, data[:n])
            if state != DEAD:
                states.add(state)
    assert len(states) > 3
    for state in sorted(states):
        mask = guide.mask(state, (EOS,))
        assert mask.shape == (vocab.size,) and mask.dtype == torch.bool
        want = torch.zeros(vocab.size, dtype=torch.bool)
        for i, data in vocab.by_id.items():
            want[i] = dfa.walk(state, data) != DEAD
        want[EOS] = dfa.accepting[state]
        assert torch.equal(mask, want), state
        assert torch.equal(guide.mask(state, (EOS,)), want)  # (kept: the same again)
        assert mask.any()


def test_advance_follows_each_tokens_bytes_and_final_states_end():
    tokenizer = byte_bpe()
    cache = GuideCache(Vocabulary.of(tokenizer, len(tokenizer)))
    guide = cache.get(("regex", r"(yes|no)!"))
    assert cache.get(("regex", r"(yes|no)!")) is guide
    ids = tokenizer.encode("yes!", add_special_tokens=False)
    state = guide.start
    for i in ids:
        assert not guide.is_final(state)
        assert guide.mask(state, ())[i]
        state = guide.advance(state, i)
    assert guide.is_final(state)
    assert guide.advance(state, EOS) == state  # special tokens add no bytes
    assert guide.is_final(DEAD)
    with pytest.raises(InvalidArgument, match="lookaround"):
        cache.get(("regex", r"(?=a)"))


def test_a_mask_is_the_walk_over_the_whole_vocabulary_for_random_states(kernels):
    """The all-tokens-at-once table walk against one walk per token, on a pattern whose
    states allow many shapes of token (the table grows as the walks find states)."""
    tokenizer = byte_bpe()
    vocab = Vocabulary.of(tokenizer, len(tokenizer))
    guide = Guide(compile_regex(r"([a-m ]|é|中)*[n-z]{2}\.?"), vocab, kernels)
    rng = random.Random(0)
    alphabet = list("abcmnz é中.")
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        state = guide.dfa.walk(guide.start, text.encode())
        if state == DEAD:
            continue
        mask = guide.mask(state, ())
        for i, data in vocab.by_id.items():
            assert bool(mask[i]) == (guide.dfa.walk(state, data) != DEAD), (text, data)


def test_the_test_vocabulary_is_the_models():
    assert len(char_tokenizer()) == VOCAB_SIZE


def test_token_bytes_leave_out_added_specials_and_ids_past_the_model():
    tokenizer = char_tokenizer()
    tokenizer.add_tokens([AddedToken("<tool>", special=True)])
    assert tokenizer.convert_tokens_to_ids("<tool>") not in token_bytes(tokenizer, len(tokenizer))
    assert max(token_bytes(tokenizer, VOCAB_SIZE - 1)) < VOCAB_SIZE - 1


def test_byte_pieces_are_literal_without_a_byte_fallback_decoder():
    pieces = ["<unk>", "<s>", "</s>", "<0x41>", "▁", "a", "b"]
    tok = Tokenizer(tk_models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[],
                                  unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    assert tokenizer.decode([3]) == "<0x41>"
    assert token_bytes(tokenizer, len(tokenizer))[3] == b"<0x41>"


def test_masks_and_guides_are_kept_most_recently_used(monkeypatch):
    monkeypatch.setattr("loraplex.engine.guide.MAX_MASKS", 2)
    monkeypatch.setattr("loraplex.engine.guide.MAX_GUIDES", 2)
    tokenizer = char_tokenizer()
    cache = GuideCache(Vocabulary.of(tokenizer, len(tokenizer)))
    guide = cache.get(("regex", "abc"))
    s0 = guide.start
    s1 = guide.advance(s0, tokenizer.convert_tokens_to_ids("a"))
    s2 = guide.advance(s1, tokenizer.convert_tokens_to_ids("b"))
    for state in (s0, s1, s0, s2):
        guide.mask(state, ())
    assert list(guide._masks) == [s0, s2]
    first = cache.get(("regex", "a"))
    cache.get(("regex", "b"))
    cache.get(("regex", "a"))
    cache.get(("regex", "c"))
    assert [source for _, source in cache._guides] == ["a", "c"] and cache.get(("regex", "a")) is first  # "b" went


@pytest.mark.parametrize("pattern", [r"[^\n]{0,40}\n", r'\{"a": "[^"]{0,8}"(, "b": [0-9]{1,4})?\}',
                                     r"(ab|cd|é)*[a-d]{3}"])
def test_the_c_walk_agrees_with_numpy_while_the_automaton_grows(pattern):
    """The first mask of a fresh guide builds its rows as it walks: the C loop stops at each
    state without a row, and the rows it makes add states past the table, which grows."""
    tokenizer = byte_bpe()
    vocab = Vocabulary.of(tokenizer, len(tokenizer))
    lib = cpu_kernels.load()
    assert lib is not None
    by_c, by_numpy = Guide(compile_regex(pattern), vocab, lib), Guide(compile_regex(pattern), vocab)
    masks = by_c.mask(by_c.start, ()), by_numpy.mask(by_numpy.start, ())
    assert torch.equal(*masks) and 0 < int(masks[0].sum()) < vocab.size
    assert by_c.dfa.num_states == by_numpy.dfa.num_states > 2  # (the table began with 2 rows)
    for text in ['{"a": "xé', "abcd", "x" * 30]:  # (each automaton numbers its own states)
        states = [g.dfa.walk(g.start, text.encode()) for g in (by_c, by_numpy)]
        if DEAD not in states:
            assert torch.equal(by_c.mask(states[0], (EOS,)), by_numpy.mask(states[1], (EOS,)))
