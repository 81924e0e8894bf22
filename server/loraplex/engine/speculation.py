"""Draft tokens for speculative decoding by prompt lookup (n-gram matching).

A decoding sequence whose last n tokens also occur earlier in its prompt or output is
likely to go on as it went on there (code edits, summaries, extraction, a quoted
passage). `NgramProposer.propose` returns the tokens that followed the latest earlier
occurrence of the longest such n-gram (n from `max_n` down to `min_n`), as vLLM's
`ngram` speculator and HF's `prompt_lookup_num_tokens` do. The engine computes those
drafts together with the sequence's next token in one step and keeps the ones its own
sampling reproduces (engine.Engine.step): a draft costs a little compute, never a
different output.

Tokens are searched as 4-byte words in a bytearray kept per sequence (extended by the
tokens added since the last step), so a lookup is one `bytes.rfind` in C, not a Python
loop over the context.
"""

from __future__ import annotations

import array

from loraplex.engine.sequence import Sequence

WORD = 4  # bytes a token takes in the lookup buffer


class NgramProposer:
    def __init__(self, num_tokens: int, max_n: int, min_n: int):
        self.num_tokens = num_tokens  # most drafts a step
        self.max_n = max_n
        self.min_n = min_n

    def propose(self, seq: Sequence, limit: int) -> tuple[int, ...]:
        """Up to min(num_tokens, limit) draft tokens to follow seq's tokens; () when none
        of its last n-grams occurred before."""
        limit = min(limit, self.num_tokens)
        if limit < 1:
            return ()
        buf = _lookup_buffer(seq)
        size = len(buf) // WORD
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            start = _latest(buf, bytes(buf[-n * WORD:]), end=(size - 1) * WORD)
            if start >= 0:
                follow = start + n * WORD  # the match's next token, before the last n
                words = buf[follow:follow + limit * WORD]
                return tuple(array.array("i", words))
        return ()


def _lookup_buffer(seq: Sequence) -> bytearray:
    """seq's prompt + output as 4-byte words, brought up to date."""
    buf = seq.lookup
    known = len(buf) // WORD
    if known < seq.num_tokens:
        buf += array.array("i", seq.token_ids(known, seq.num_tokens)).tobytes()
    return buf


def _latest(buf: bytearray, pattern: bytes, end: int) -> int:
    """The byte offset of the last word-aligned occurrence of `pattern` that ends at or
    before byte `end`; -1 if none."""
    while True:
        start = buf.rfind(pattern, 0, end)
        if start < 0 or start % WORD == 0:
            return start
        end = start + len(pattern) - 1  # (a misaligned hit: look further back)
