"""Guided decoding: which tokens a request may produce next, so that its output matches
a regular expression, is one of a list of choices, or is JSON a schema allows.

    guides = GuideCache(tokenizer, vocab_size)
    guide = guides.get(("regex", pattern))  # compiled once per key (LRU), any thread;
                                          # also ("choice", strings), ("json", schema)
    state = guide.start
    mask = guide.mask(state, eos_ids)     # [vocab] bool: True = keeps a full match possible
    state = guide.advance(state, token)
    guide.is_final(state)                 # a full match nothing can extend: the output ends

A token is allowed when its bytes take the pattern's byte automaton (byte_regex) to a
live state; EOS is allowed once the output is a full match. A state's mask is found by
walking every token at once through the automaton as a table (numpy, one byte position
at a time, dead tokens dropped), then kept per state, bit-packed.
Everything but `get` runs on the engine thread.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.engine.byte_regex import DEAD, ByteDFA
from loraplex.engine.guide_compiler import compile_guide

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
    unbyte = {c: b for b, c in enumerate(gpt2_byte_chars())}
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


def gpt2_byte_chars() -> list[str]:
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
    """The ordinary tokens as a byte matrix, shortest first, for walking them together."""

    size: int  # the model's vocabulary (mask length)
    ids: np.ndarray  # [T] int64: token ids, by length
    lengths: np.ndarray  # [T] int64: their byte lengths, nondecreasing
    columns: np.ndarray  # [max length, T] uint8: columns[j, i] = byte j of token i (or 0)
    by_id: dict[int, bytes]

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> Vocabulary:
        by_id = token_bytes(tokenizer, vocab_size)
        ordered = sorted(by_id.items(), key=lambda item: len(item[1]))
        lengths = np.array([len(b) for _, b in ordered], dtype=np.int64)
        columns = np.zeros((int(lengths.max(initial=0)), len(ordered)), dtype=np.uint8)
        for i, (_, data) in enumerate(ordered):
            columns[:len(data), i] = np.frombuffer(data, dtype=np.uint8)
        return cls(vocab_size, np.array([i for i, _ in ordered], dtype=np.int64), lengths,
                   columns, by_id)


# ---- one pattern -------------------------------------------------------------------

class Guide:
    def __init__(self, dfa: ByteDFA, vocabulary):
        self.dfa = dfa
        self._vocabulary = vocabulary  # () -> Vocabulary, built at first use
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()  # state -> packed bits
        self._rows = np.full((0, 256), DEAD, dtype=np.int32)  # the automaton as a table
        self._built = np.zeros(0, dtype=bool)  # [state]: whether its row is in _rows

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
        """Every token walked at once, one byte position at a time: the tokens still alive
        step through the automaton's table together, those that die drop out, those that
        end are allowed."""
        vocab = self._vocabulary()
        bits = np.zeros(vocab.size, dtype=bool)
        alive = np.arange(len(vocab.ids))  # [A] indices of the tokens not dead yet
        at = np.full(len(alive), state, dtype=np.int32)  # [A] their automaton states
        for j in range(vocab.columns.shape[0] + 1):
            ended = vocab.lengths[alive] == j  # (shortest first: a prefix of `alive`)
            bits[vocab.ids[alive[ended]]] = True
            alive, at = alive[~ended], at[~ended]
            if not len(alive):
                break
            at = self._table(at)[at, vocab.columns[j, alive]]  # [A] next states
            live = at != DEAD
            alive, at = alive[live], at[live]
        return np.packbits(bits)

    def _table(self, states: np.ndarray) -> np.ndarray:
        """[>= dfa.num_states, 256] int32: the automaton's transitions, with the rows of
        `states` built."""
        if self._rows.shape[0] < self.dfa.num_states:
            grown = np.full((2 * self.dfa.num_states, 256), DEAD, dtype=np.int32)
            grown[:self._rows.shape[0]] = self._rows
            self._rows = grown
            self._built = np.concatenate([self._built, np.zeros(len(grown) - len(self._built),
                                                                dtype=bool)])
        missing = states[~self._built[states]]
        for state in np.unique(missing).tolist():
            row = self.dfa.row(state)  # (may add states: the next call grows the table)
            self._rows[state] = row
            self._built[state] = True
        return self._rows


class GuideCache:
    """Compiled guides by key (SamplingParams.guide), most recently used kept. `get` may
    run on any thread (the request's validation); the vocabulary is built at the first
    mask, on the engine's. `compile` turns a key into its automaton (in this thread by
    default; the engine's compiles in a child process: guide_compiler)."""

    def __init__(self, tokenizer, vocab_size: int,
                 compile: Callable[[tuple], ByteDFA] = compile_guide):
        self._tokenizer = tokenizer
        self._compile = compile
        self._vocab_size = vocab_size
        self._vocab: Vocabulary | None = None
        self._guides: OrderedDict[tuple, Guide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str | tuple[str, ...]]) -> Guide:
        """The guide of `key`; raises InvalidArgument when it does not compile."""
        with self._lock:
            guide = self._guides.get(key)
            if guide is not None:
                self._guides.move_to_end(key)
                return guide
        guide = Guide(self._compile(key), self.vocabulary)
        with self._lock:
            guide = self._guides.setdefault(key, guide)
            if len(self._guides) > MAX_GUIDES:
                self._guides.popitem(last=False)
        return guide

    def vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = Vocabulary.of(self._tokenizer, self._vocab_size)
        return self._vocab
