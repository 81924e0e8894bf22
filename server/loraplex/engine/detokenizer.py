"""Turn a growing list of token ids into text pieces, never splitting a character.

The method of TGI and vLLM: decode a short window of recent tokens twice (with
and without the newest) and emit the difference, holding it back while it ends
in an incomplete UTF-8 sequence (the replacement character U+FFFD).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens  # False: they are text too
        self.ids: list[int] = list(prompt_ids[-6:])  # context so the first piece gets its spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes ('' while held back)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """The text held back at the end of the output: a character whose last bytes never
        came, as U+FFFD (so that all the pieces add up to the decoded output)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
