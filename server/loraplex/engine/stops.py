"""Stop strings on streamed text: hold back what might be the start of a stop string."""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stops: tuple[str, ...], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop  # a hit releases the stop string too
        self.pending = ""  # text produced but not yet released

    def feed(self, text: str, armed: bool = True) -> tuple[str, bool]:
        """Add new text; return (text safe to release now, whether a stop string was hit).
        On a hit, the released text ends right before the stop string (`include_stop`:
        right after it; the earliest one, the longest of those starting there). Not `armed`
        (before min_tokens), stop strings are let through; a start of one is still held
        back, so one that ends once armed is caught."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(i, -len(s)) for i, s in ((self.pending.find(s), s) for s in self.stops)
                if i >= 0] if armed else []
        if hits:
            start, minus_len = min(hits)
            end = start - minus_len if self.include_stop else start
            released, self.pending = self.pending[:end], ""
            return released, True
        keep = max((self._partial(s) for s in self.stops), default=0)
        released = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return released, False

    def flush(self) -> str:
        """The held-back text, once the sequence ends for another reason."""
        released, self.pending = self.pending, ""
        return released

    def _partial(self, stop: str) -> int:
        """Length of the longest suffix of pending that is a proper prefix of stop."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0
