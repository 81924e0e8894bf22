"""vLLM's --reasoning-parser in the HTTP chat API: the model's thinking, written between
<think> and </think> (DeepSeek-R1 and its Qwen and Llama distills, Qwen3, QwQ), becomes
the message's `reasoning_content`; the text after it is the content, which the tool call
parser (openai_tools.py), if any, reads next.

The text is reasoning from its start, less a leading <think> (R1's and newer Qwen3
templates put it in the prompt; older ones let the model write it), up to the first
</think>; the whitespace after that tag is dropped. A <tool_call> block of XML calls
(<tool_call><function=...) ends the reasoning too, as Qwen3.5 may call without closing
it, as vLLM's qwen3 parser allows. A text that never closes the tag is all reasoning
(it was cut off while thinking). A request that turns thinking off
(chat_template_kwargs {"enable_thinking": false}, Qwen3's switch) gets no such parser: its
text is all content. Streamed, text that may be the start of a tag is held back until it
is known, so the pieces add up to the whole answer. No protobuf and no HTTP here.
"""

from __future__ import annotations

import re

from loraplex.openai_tools import Parser, Piece, Reasoning, tag_start

OPEN, CLOSE = "<think>", "</think>"  # (the tags of every parser in REASONING_PARSERS)


class ReasoningParser(Parser):
    """Splits the reasoning off a choice's text; what follows goes through `inner` (the
    tool call parser, or None: it is content as it is)."""

    def __init__(self, inner: Parser | None):
        super().__init__()
        self._inner = inner
        self._text = ""  # not yet sent
        self._state = "start"  # "start" (maybe <think>) | "reasoning" | "gap" | "content"

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        out: list[Piece] = []
        if self._state == "start":
            head = self._text.lstrip()
            if len(head) < len(OPEN) and OPEN.startswith(head):
                return out  # (whitespace, or what may be <think>)
            if head.startswith(OPEN):
                self._text = head[len(OPEN):]
            self._state = "reasoning"
        if self._state == "reasoning":
            end, call = self._text.find(CLOSE), _CALL.search(self._text)
            if call is not None and (end < 0 or call.start() < end):
                out += _reasoning(self._text[:call.start()])
                self._text, self._state = self._text[call.start():], "content"
            elif end >= 0:
                out += _reasoning(self._text[:end])
                self._text, self._state = self._text[end + len(CLOSE):], "gap"
            else:
                cut = len(self._text) - max(tag_start(self._text, CLOSE),
                                            _call_start(self._text))
                out += _reasoning(self._text[:cut])
                self._text = self._text[cut:]
                return out
        if self._state == "gap":
            self._text = self._text.lstrip()
            if not self._text:
                return out
            self._state = "content"
        text, self._text = self._text, ""
        return out + self._content(text)

    def finish(self) -> list[Piece]:
        held, self._text = self._text, ""
        out = _reasoning(held) if self._state in ("start", "reasoning") else []
        return out + (self._inner.finish() if self._inner is not None else [])

    def finish_reason(self, reason: str | None) -> str | None:
        return self._inner.finish_reason(reason) if self._inner is not None else reason

    def _content(self, text: str) -> list[Piece]:
        return self._inner.feed(text) if self._inner is not None else [text]


_CALL = re.compile(r"<tool_call>\s*<function=")  # (Qwen3.5 may call without </think>)


def _call_start(text: str) -> int:
    """How many characters at the end of `text` may be the start of a _CALL."""
    at = text.rfind("<tool_call>")
    rest = text[at + len("<tool_call>"):].lstrip() if at >= 0 else None
    if rest is not None and "<function=".startswith(rest):
        return len(text) - at
    return tag_start(text, "<tool_call>")


def _reasoning(text: str) -> list[Reasoning]:
    return [Reasoning(text)] if text else []
