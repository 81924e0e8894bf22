"""Guided decoding: which tokens a request may produce next, so that its output matches
a regular expression (or is one of a list of choices).

    guides = GuideCache(tokenizer, vocab_size)
    guide = guides.get(pattern)           # compiled once per pattern (LRU), any thread
    state = guide.start
    mask = guide.mask(state, eos_ids)     # [vocab] bool: True = keeps a full match possible
    state = guide.advance(state, token)
    guide.is_final(state)                 # a full match nothing can extend: the output ends

A token is allowed when its bytes take the pattern's byte automaton (byte_regex) to a
live state; EOS is allowed once the output is a full match. Masks are found by walking
the vocabulary sorted by bytes, so tokens that share a prefix share its walk and a dead
prefix skips every token under it, then kept per automaton state, bit-packed.
Everything but `get` runs on the engine thread.
"""

from __future__ import annotations

import bisect
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.engine.byte_regex import DEAD, ByteDFA, compile_regex

MAX_GUIDES = 16  # compiled patterns kept
MAX_MASKS = 1024  # masks kept per pattern (16 KiB each for a 128k vocabulary)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---- the vocabulary as bytes -------------------------------------------------------

def token_bytes(tokenizer, vocab_size: int) -> dict[int, bytes]:
    """The bytes each ordinary token adds to decoded text; special tokens, and ids past the
    tokenizer, are left out (never allowed but as EOS).

    Byte-level BPE (GPT-2, Llama 3, Qwen) spells each byte with a printable stand-in;
    SentencePiece models (Llama 2, Mistral, Gemma) write spaces as "▁" and bytes with no
    token of their own as "<0xNN>"; other tokenizers are read with convert_tokens_to_string.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    kinds = _decoder_kinds(decoder)
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or "Replace:▁" in kinds
    unbyte = {c: b for b, c in enumerate(_gpt2_byte_chars())}
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    out = {}
    for tok, i in tokenizer.get_vocab().items():
        if i in special or not 0 <= i < vocab_size:
            continue
        if byte_level:
            if any(c not in unbyte for c in tok):
                continue  # not a byte spelling: it decodes to nothing
            data = bytes(unbyte[c] for c in tok)
        elif "ByteFallback" in kinds and _BYTE_FALLBACK.fullmatch(tok):
            data = bytes([int(tok[3:5], 16)])
        elif metaspace:
            data = tok.replace("▁", " ").encode()
        else:
            data = tokenizer.convert_tokens_to_string([tok]).encode()
        if data:
            out[i] = data
    return out


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder["type"] == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in decoder["decoders"]))
    if decoder["type"] == "Replace":
        return {f"Replace:{decoder['pattern'].get('String', '')}"}
    return {decoder["type"]}


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (bytes_to_unicode)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@dataclass(frozen=True)
class Vocabulary:
    """The ordinary tokens sorted by their bytes."""

    size: int  # the model's vocabulary (mask length)
    tokens: list[bytes]  # sorted
    ids: list[int]  # ids[i] is the token spelled tokens[i]
    by_id: dict[int, bytes]

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> Vocabulary:
        by_id = token_bytes(tokenizer, vocab_size)
        ordered = sorted(by_id.items(), key=lambda item: item[1])
        return cls(vocab_size, [b for _, b in ordered], [i for i, _ in ordered], by_id)


# ---- one pattern -------------------------------------------------------------------

class Guide:
    def __init__(self, dfa: ByteDFA, vocabulary):
        self.dfa = dfa
        self._vocabulary = vocabulary  # () -> Vocabulary, built at first use
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()  # state -> packed bits

    @property
    def start(self) -> int:
        return self.dfa.start

    def advance(self, state: int, token: int) -> int:
        """The state after `token` (EOS and special tokens add no bytes)."""
        return self.dfa.walk(state, self._vocabulary().by_id.get(token, b""))

    def is_final(self, state: int) -> bool:
        """A full match that nothing can extend (or DEAD: nothing can follow)."""
        return state == DEAD or self.dfa.is_final(state)

    def mask(self, state: int, eos_ids: tuple[int, ...]) -> torch.Tensor:
        """[vocab] bool: the tokens that keep a full match possible, and `eos_ids` once
        the output is one. May raise byte_regex.GuideTooLarge."""
        packed = self._masks.get(state)
        if packed is None:
            packed = self._masks[state] = self._find_mask(state)
            if len(self._masks) > MAX_MASKS:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(state)
        size = self._vocabulary().size
        mask = torch.from_numpy(np.unpackbits(packed, count=size).astype(bool))  # [vocab]
        if eos_ids and self.dfa.accepting[state]:
            mask[list(eos_ids)] = True
        return mask

    def _find_mask(self, state: int) -> np.ndarray:
        vocab = self._vocabulary()
        tokens, row = vocab.tokens, self.dfa.row
        bits = np.zeros(vocab.size, dtype=bool)
        walked = [state]  # walked[d]: the state after the first d bytes of `prev`
        prev = b""
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            d = 0
            limit = min(len(prev), len(tok), len(walked) - 1)
            while d < limit and prev[d] == tok[d]:
                d += 1
            del walked[d + 1:]
            at = walked[-1]
            while d < len(tok):
                at = row(at)[tok[d]]
                if at == DEAD:
                    break
                walked.append(at)
                d += 1
            if at != DEAD:
                bits[vocab.ids[i]] = True
                prev = tok
                i += 1
            else:  # no token starting with tok[:d + 1] can be allowed: skip them all
                prev = tok[:d]
                i = bisect.bisect_left(tokens, _successor(tok[:d + 1]), i + 1) \
                    if tok[:d + 1].strip(b"\xff") else len(tokens)
        return np.packbits(bits)


def _successor(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string starting with `prefix`."""
    head = prefix.rstrip(b"\xff")
    return head[:-1] + bytes([head[-1] + 1])


class GuideCache:
    """Compiled patterns, most recently used kept. `get` may run on any thread (the
    request's validation); the vocabulary is built at the first mask, on the engine's."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._vocab: Vocabulary | None = None
        self._guides: OrderedDict[str, Guide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pattern: str) -> Guide:
        """The guide of `pattern`; raises InvalidArgument when it does not compile."""
        with self._lock:
            guide = self._guides.get(pattern)
            if guide is not None:
                self._guides.move_to_end(pattern)
                return guide
        guide = Guide(compile_regex(pattern), self.vocabulary)
        with self._lock:
            guide = self._guides.setdefault(pattern, guide)
            if len(self._guides) > MAX_GUIDES:
                self._guides.popitem(last=False)
        return guide

    def vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = Vocabulary.of(self._tokenizer, self._vocab_size)
        return self._vocab
