"""Guided decoding: which tokens a request may produce next, so that its output matches
a regular expression, is one of a list of choices, or is JSON a schema allows.

    guides = GuideCache(Vocabulary.of(tokenizer, vocab_size))  # (1.4 s for 128k tokens)
    guide = guides.get(("regex", pattern))  # compiled once per key (LRU), any thread;
                                          # also ("choice", strings), ("json", schema)
    state = guide.start
    mask = guide.mask(state, eos_ids)     # [vocab] bool: True = keeps a full match possible
    state = guide.advance(state, token)
    guide.is_final(state)                 # a full match nothing can extend: the output ends

A token is allowed when its bytes take the pattern's byte automaton (byte_regex) to a
live state; EOS is allowed once the output is a full match. A state's mask is found by
walking every token at once through the automaton as a table, over the trie of the
tokens' bytes so that a prefix tokens share is walked once (a C loop, cpu_kernels'
trie_walk, else numpy one level at a time), then kept per state, bit-packed.
Everything but `get` runs on the engine thread.
"""

from __future__ import annotations

import ctypes
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
    """The ordinary tokens as a trie of their bytes, for walking them all at once: a prefix
    that tokens share is walked once. Prefixes are listed level by level (all of one byte,
    then of two, ...); prefix i is prefix parents[i] followed by byte bytes[i], and prefix 0
    is the empty one."""

    size: int  # the model's vocabulary (mask length)
    # (intp: numpy indexes with them as they are; ~410,000 prefixes at 128k tokens)
    parents: np.ndarray  # [P] intp (parents[0] unused)
    bytes: np.ndarray  # [P] intp (bytes[0] unused)
    levels: list[tuple[int, int]]  # (start, stop) of the prefixes of d + 1 bytes, by d
    token_ids: np.ndarray  # [E] int64: the ordinary tokens
    token_prefixes: np.ndarray  # [E] intp: the prefix that is each one's bytes
    by_id: dict[int, bytes]

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> Vocabulary:
        by_id = token_bytes(tokenizer, vocab_size)
        levels: list[dict[tuple[int, int], int]] = []  # by d: (parent, byte) -> index in d
        ends = []  # (token id, level, index in level)
        for token, data in by_id.items():
            parent = 0
            for d, byte in enumerate(data):
                if d == len(levels):
                    levels.append({})
                parent = levels[d].setdefault((parent, byte), len(levels[d]))
            ends.append((token, len(data) - 1, parent))
        starts = np.cumsum([1] + [len(level) for level in levels])  # [levels + 1]
        parents, bytes_ = [np.zeros(1, dtype=np.intp)], [np.zeros(1, dtype=np.intp)]
        for d, level in enumerate(levels):
            above = starts[d - 1] if d else 0  # (where the parents' level starts)
            parents.append(np.array([p for p, _ in level], dtype=np.intp) + above)
            bytes_.append(np.array([b for _, b in level], dtype=np.intp))
        return cls(vocab_size, np.concatenate(parents), np.concatenate(bytes_),
                   [(int(starts[d]), int(starts[d + 1])) for d in range(len(levels))],
                   np.array([t for t, _, _ in ends], dtype=np.int64),
                   np.array([starts[d] + i for _, d, i in ends], dtype=np.intp), by_id)


# ---- one pattern -------------------------------------------------------------------

class Guide:
    def __init__(self, dfa: ByteDFA, vocabulary: Vocabulary, kernels: ctypes.CDLL | None = None):
        self.dfa = dfa
        self._vocabulary = vocabulary
        self._kernels = kernels  # loraplex.cpu_kernels (trie_walk), else numpy
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()  # state -> packed bits
        self._rows = np.full((0, 256), DEAD, dtype=np.int32)  # the automaton as a table
        self._built = np.zeros(0, dtype=bool)  # [state]: whether its row is in _rows

    @property
    def start(self) -> int:
        return self.dfa.start

    def advance(self, state: int, token: int) -> int:
        """The state after `token` (EOS and special tokens add no bytes)."""
        return self.dfa.walk(state, self._vocabulary.by_id.get(token, b""))

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
        size = self._vocabulary.size
        mask = torch.from_numpy(np.unpackbits(packed, count=size).astype(bool))  # [vocab]
        if eos_ids and self.dfa.accepting[state]:
            mask[list(eos_ids)] = True
        return mask

    def _find_mask(self, state: int) -> np.ndarray:
        """Every token walked at once: each prefix of the trie takes its parent's state
        through the automaton's table by its byte, and a token is allowed when the state
        after its bytes is live."""
        vocab = self._vocabulary
        at = np.empty(len(vocab.parents), dtype=np.int32)  # [P] the state after each prefix
        at[0] = state
        if self._kernels is not None:
            self._walk_kernel(at)
        else:
            self._walk_levels(at)
        bits = np.zeros(vocab.size, dtype=bool)
        bits[vocab.token_ids] = at[vocab.token_prefixes] != DEAD
        return np.packbits(bits)

    def _walk_kernel(self, at: np.ndarray) -> None:
        """All prefixes in one C loop, which stops at a state whose row is not built yet."""
        vocab, i = self._vocabulary, 1
        while i < len(at):
            rows = self._table(at[vocab.parents[i:i + 1]])
            i = self._kernels.trie_walk(rows.ctypes.data, self._built.ctypes.data,
                                        vocab.parents.ctypes.data, vocab.bytes.ctypes.data,
                                        at.ctypes.data, i, len(at))

    def _walk_levels(self, at: np.ndarray) -> None:
        """One level of the trie per numpy pass; a DEAD parent (-1) reads the table's last
        row, which is always all DEAD."""
        vocab = self._vocabulary
        for start, stop in vocab.levels:
            before = at[vocab.parents[start:stop]]  # [N_d]
            at[start:stop] = self._table(before)[before, vocab.bytes[start:stop]]
            if not (at[start:stop] != DEAD).any():
                at[stop:] = DEAD
                break

    def _table(self, states: np.ndarray) -> np.ndarray:
        """[> dfa.num_states, 256] int32: the automaton's transitions, with the rows of
        `states` (DEAD among them) built; the last row is never a state's, so all DEAD."""
        self._grow()
        missing = states[(states != DEAD) & ~self._built[states]]
        if missing.size:  # (most levels need no new row: skip np.unique's fixed cost)
            for state in np.unique(missing).tolist():
                self._rows[state] = self.dfa.row(state)
                self._built[state] = True
            self._grow()  # (a row may have added states)
        return self._rows

    def _grow(self) -> None:
        if self._rows.shape[0] <= self.dfa.num_states:
            grown = np.full((2 * self.dfa.num_states, 256), DEAD, dtype=np.int32)
            grown[:self._rows.shape[0]] = self._rows
            self._rows = grown
            self._built = np.concatenate([self._built, np.zeros(len(grown) - len(self._built),
                                                                dtype=bool)])


class GuideCache:
    """Compiled guides by key (SamplingParams.guide), most recently used kept; `get` may
    run on any thread (the request's validation). `compile` turns a key into its
    automaton (in this thread by default; the engine's compiles in a child process:
    guide_compiler). `kernels` (loraplex.cpu_kernels.load()) walks the masks in C."""

    def __init__(self, vocabulary: Vocabulary,
                 compile: Callable[[tuple], ByteDFA] = compile_guide,
                 kernels: ctypes.CDLL | None = None):
        self.vocabulary = vocabulary
        self._compile = compile
        self._kernels = kernels
        self._guides: OrderedDict[tuple, Guide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str | tuple[str, ...]]) -> Guide:
        """The guide of `key`; raises InvalidArgument when it does not compile."""
        with self._lock:
            guide = self._guides.get(key)
            if guide is not None:
                self._guides.move_to_end(key)
                return guide
        guide = Guide(self._compile(key), self.vocabulary, self._kernels)
        with self._lock:
            guide = self._guides.setdefault(key, guide)
            if len(self._guides) > MAX_GUIDES:
                self._guides.popitem(last=False)
        return guide
