"""Regular expressions compiled to a byte-level automaton, for guided decoding.

    dfa = compile_regex(r"(yes|no)[0-9]{1,3}")
    state = dfa.start
    for byte in b"yes42":
        state = dfa.next(state, byte)      # DEAD once no match can follow
    dfa.accepting[state]                    # True: "yes42" is a full match

The pattern is parsed into a small tree, built into a Thompson NFA over UTF-8 bytes
(a character class becomes the byte sequences of its code points, as RE2 and Rust's
regex do), trimmed to the states from which a match can still end, then determinised
lazily: a DFA state is a set of NFA states, made the first time a byte leads to it. So
every DFA state but DEAD can still reach a match, which is what a token mask needs.

The syntax is Python's, always matched in full (^ and $ are allowed at the ends only),
with ASCII classes: literals and escapes, `.` (any character but newline), classes
`[a-z]` `[^"\\]`, `\\d \\w \\s \\D \\W \\S`, groups `( )` `(?: )` `(?P<name> )`, `|`, and
`* + ? {n} {n,} {n,m}` (a lazy `?` after one is accepted: it matches the same strings).
Backreferences, lookaround, `\\b` and inline flags raise InvalidArgument: no finite
automaton has them.

A parsed pattern is a tree of tuples, which json_schema also builds directly:

    ("set", ranges)                     one code point in ranges (sorted, disjoint, inclusive)
    ("cat", [tree, ...])                each in turn
    ("alt", [tree, ...])                any one
    ("rep", tree, lo, hi)               lo to hi of it (hi None: no limit)
    ("list", item, sep, lo, hi)         lo to hi items, sep between two (a JSON array)
    ("subset", [(tree, required), ...], sep)
                                        some of the parts in their order, every required one
                                        among them, sep between two (a JSON object)

The last two have no regex syntax: written as a pattern (`to_pattern`) they repeat their
parts, a subset of n optional parts n(n+1)/2 times, which nests multiplicatively; the NFA
builds every part of them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.errors import InvalidArgument

MAX_NFA_STATES = 50_000  # bounds what a pattern like a{1000}{1000} can build
MAX_DFA_STATES = 20_000  # a pattern whose automaton outgrows this fails (GuideTooLarge)
MAX_REPEAT = 1_000
DEAD = -1

_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)  # not encodable in UTF-8

# a code point set is a sorted list of disjoint inclusive (lo, hi) ranges
_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20)]
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
_UNSUPPORTED_ESCAPES = {"b": "word boundaries (\\b)", "B": "\\B", "A": "\\A", "Z": "\\Z",
                        "z": "\\z", "G": "\\G"}


class GuideTooLarge(Exception):
    """The pattern's automaton outgrew MAX_DFA_STATES while a request was being served."""


def parse(pattern: str):
    """The tree of `pattern`; raises InvalidArgument saying what to fix."""
    return _Parser(pattern).parse()


def literal(text: str):
    """The tree matching `text` exactly."""
    return ("cat", [("set", [(ord(c), ord(c))]) for c in text])


def compile_regex(pattern: str) -> ByteDFA:
    """Parse and build `pattern`; raises InvalidArgument saying what to fix."""
    return compile_tree(parse(pattern))


def compile_tree(tree) -> ByteDFA:
    """Build a tree (see above); raises InvalidArgument when it matches nothing or is too
    large."""
    nfa = _NFA()
    start, accept = nfa.build(tree)
    return ByteDFA(nfa.trimmed(start, accept), start, accept)


def without_chars(tree, banned: list[tuple[int, int]]):
    """A parsed pattern with the code points in `banned` (inclusive ranges) taken out of
    every class and literal: it matches the strings `tree` matches that hold none of them
    (a JSON schema's pattern inside a JSON string, say, without what JSON escapes)."""
    kind = tree[0]
    if kind == "set":  # the set less banned
        return ("set", _complement(_normalize(_complement(tree[1]) + banned)))
    if kind == "rep":
        return ("rep", without_chars(tree[1], banned), *tree[2:])
    return (kind, [without_chars(n, banned) for n in tree[1]])  # "cat", "alt"


def to_pattern(tree) -> str:
    """A pattern in Python's syntax matching what `tree` matches (for re; see above)."""
    kind = tree[0]
    if kind == "set":
        if not tree[1]:
            return "[^\\x00-\\U0010ffff]"  # matches nothing
        return "[" + "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}"
                             for lo, hi in tree[1]) + "]"
    if kind == "cat":
        return "(?:" + "".join(to_pattern(n) for n in tree[1]) + ")"
    if kind == "alt":
        return "(?:" + "|".join(to_pattern(n) for n in tree[1]) + ")"
    if kind == "rep":
        _, child, lo, hi = tree
        return f"(?:{to_pattern(child)}){{{lo},{'' if hi is None else hi}}}"
    if kind == "list":
        _, item, sep, lo, hi = tree
        if hi == 0:
            return "(?:)"
        one, more = to_pattern(item), f"(?:{to_pattern(sep)}{to_pattern(item)})"
        body = f"{one}{more}{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        return f"(?:{body})" if lo else f"(?:{body})?"
    _, parts, sep = tree  # "subset": the alternatives of which part comes first
    texts = [(to_pattern(n), required) for n, required in parts]
    options = []
    for first, (text, required) in enumerate(texts):
        rest = "".join(f"(?:{to_pattern(sep)}{t})" + ("" if r else "?")
                       for t, r in texts[first + 1:])
        options.append(text + rest)
        if required:
            break
    body = "(?:" + "|".join(options) + ")"
    return body if any(r for _, r in texts) else f"(?:{body})?"


# ---- code point sets ---------------------------------------------------------------

def _normalize(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for lo, hi in _normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_CODE_POINT:
        out.append((nxt, _MAX_CODE_POINT))
    return out


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points lo..hi (surrogates left out) as byte-range sequences: a string of
    bytes encodes one of them iff it matches one sequence, byte i in range i."""
    out: list[list[tuple[int, int]]] = []
    pending = [(lo, hi)]
    while pending:
        lo, hi = pending.pop()
        if lo > hi:
            continue
        if lo <= _SURROGATES[1] and hi >= _SURROGATES[0]:  # cut the surrogates out
            pending += [(lo, _SURROGATES[0] - 1), (_SURROGATES[1] + 1, hi)]
            continue
        split = next((b for b in (0x7F, 0x7FF, 0xFFFF) if lo <= b < hi), None)
        if split is not None:  # one encoded length per range
            pending += [(lo, split), (split + 1, hi)]
            continue
        if lo < 0x80:
            out.append([(lo, hi)])
            continue
        for i in range(1, 4):  # align the range on the continuation bytes' 6-bit fields
            mask = (1 << (6 * i)) - 1
            if lo & ~mask != hi & ~mask:
                if lo & mask:
                    pending += [(lo, lo | mask), ((lo | mask) + 1, hi)]
                    break
                if hi & mask != mask:
                    pending += [(lo, (hi & ~mask) - 1), (hi & ~mask, hi)]
                    break
        else:
            a, b = chr(lo).encode(), chr(hi).encode()
            out.append(list(zip(a, b)))
    return out


# ---- parsing -----------------------------------------------------------------------
# tree nodes: ("set", ranges) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, lo, hi)

class _Parser:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"guided regex: {what} at position {self.i} of {self.p!r}")

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        tree = self.alternation()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return tree

    def alternation(self):
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self):
        items = []
        while self.peek() not in ("", "|", ")"):
            if self.peek() == "$":
                self.i += 1
                if self.peek() not in ("", "|", ")"):
                    raise self.error("'$' is supported at the end only (every match is full)")
                continue
            items.append(self.repetition())
        return ("cat", items)

    def repetition(self):
        node = self.atom()
        quantified = False
        while True:
            start = self.i
            bounds = self.quantifier()
            if bounds is None:
                return node
            if quantified:
                self.i = start
                raise self.error("multiple repeat")
            quantified = True
            if self.peek() == "?":  # lazy: the same strings match
                self.i += 1
            node = ("rep", node, *bounds)

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        close = self.p.find("}", self.i)
        body = self.p[self.i + 1:close] if close > 0 else ""
        lo, comma, hi = body.partition(",")
        if not (lo.isdigit() or (comma and not lo)) or (hi and not hi.isdigit()):
            return None  # not a repeat: '{' is a literal, as in Python
        lo_n = int(lo) if lo else 0
        hi_n = (int(hi) if hi else None) if comma else lo_n
        if max(lo_n, hi_n or 0) > MAX_REPEAT:
            raise self.error(f"a repeat count above {MAX_REPEAT}")
        if hi_n is not None and hi_n < lo_n:
            raise self.error("a repeat {m,n} with n < m")
        self.i = close + 1
        return lo_n, hi_n

    def atom(self):
        c = self.peek()
        if c in ("*", "+", "?"):
            raise self.error("nothing to repeat")
        self.i += 1
        if c == "(":
            return self.group()
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", _complement([(0x0A, 0x0A)]))
        if c == "^":
            self.i -= 1
            raise self.error("'^' is supported at the start only (every match is full)")
        if c == "\\":
            return ("set", self.escape(in_class=False))
        return ("set", [(ord(c), ord(c))])

    def group(self):
        if self.p.startswith("?:", self.i):
            self.i += 2
        elif self.p.startswith("?P<", self.i):
            close = self.p.find(">", self.i)
            if close < 0:
                raise self.error("an unterminated group name")
            self.i = close + 1
        elif self.peek() == "?":
            raise self.error("lookaround, inline flags and other (?...) groups are not "
                             "supported")
        tree = self.alternation()
        if self.peek() != ")":
            raise self.error("a missing ')'")
        self.i += 1
        return tree

    def escape(self, in_class: bool) -> list[tuple[int, int]]:
        c = self.peek()
        if not c:
            raise self.error("a trailing backslash")
        self.i += 1
        if c.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[c.lower()]
            return _complement(ranges) if c.isupper() else ranges
        if c in _CHAR_ESCAPES:
            return [(ord(_CHAR_ESCAPES[c]),) * 2]
        if c in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {width} hex digits")
            self.i += width
            point = int(digits, 16)
            if point > _MAX_CODE_POINT:
                raise self.error("a code point above U+10FFFF")
            return [(point, point)]
        if c in _UNSUPPORTED_ESCAPES and not in_class:
            raise self.error(f"{_UNSUPPORTED_ESCAPES[c]} is not supported")
        if c.isdigit():
            raise self.error("backreferences are not supported")
        if c.isascii() and c.isalpha():
            raise self.error(f"unknown escape \\{c}")
        return [(ord(c), ord(c))]

    def char_class(self) -> list[tuple[int, int]]:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.error("an unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_item()
            if len(lo) == 1 and lo[0][0] == lo[0][1] and self.peek() == "-" \
                    and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if len(hi) != 1 or hi[0][0] != hi[0][1]:
                    raise self.error("a range ending in a class escape")
                if hi[0][0] < lo[0][0]:
                    raise self.error("a bad character range (its end is before its start)")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges += lo
        return _complement(ranges) if negate else _normalize(ranges)

    def class_item(self) -> list[tuple[int, int]]:
        c = self.peek()
        self.i += 1
        if c == "\\":
            return self.escape(in_class=True)
        return [(ord(c), ord(c))]


# ---- the NFA -----------------------------------------------------------------------

@dataclass
class _NFA:
    eps: list[list[int]] = field(default_factory=list)  # [state] -> states reached freely
    edges: list[list[tuple[int, int, int]]] = field(default_factory=list)  # (lo, hi, to)

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise InvalidArgument(f"guided decoding: the pattern or schema needs more than "
                                  f"{MAX_NFA_STATES} automaton states; lower its repeat counts "
                                  f"({{n,m}}, maxLength, maxItems) or make it smaller")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        """(start, end) of a fragment matching `node`; end has no edges yet."""
        kind = node[0]
        if kind == "set":
            start, end = self.state(), self.state()
            for lo, hi in node[1]:
                for seq in utf8_sequences(lo, hi):
                    at = start
                    for k, (blo, bhi) in enumerate(seq):
                        to = end if k == len(seq) - 1 else self.state()
                        self.edges[at].append((blo, bhi, to))
                        at = to
            return start, end
        if kind == "cat":
            start = end = self.state()
            for item in node[1]:
                s, e = self.build(item)
                self.eps[end].append(s)
                end = e
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for branch in node[1]:
                s, e = self.build(branch)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        if kind == "list":
            return self.list(*node[1:])
        if kind == "subset":
            return self.subset(*node[1:])
        _, inner, lo, hi = node  # "rep"
        start = end = self.state()
        for _ in range(lo):
            s, e = self.build(inner)
            self.eps[end].append(s)
            end = e
        if hi is None:  # then any number more
            s, e = self.build(inner)
            self.eps[end].append(s)
            self.eps[e].append(s)
            tail = self.state()
            self.eps[end].append(tail)
            self.eps[e].append(tail)
            return start, tail
        # then up to hi - lo more, nested, as (x(x(x)?)?)?: leaving the repetition after
        # k copies goes to its end, not on through the copies after k (x?x?x? would keep
        # all of them in every state of the DFA: [^\n]{0,200} made 200-state sets)
        finish = self.state()
        for _ in range(hi - lo):
            s, e = self.build(inner)
            self.eps[end] += [s, finish]
            end = e
        self.eps[end].append(finish)
        return start, finish

    def list(self, item, sep, lo: int, hi: int | None) -> tuple[int, int]:
        """lo..hi items, sep between two: hi copies of the item, or max(lo, 1) when
        unbounded, the last one looped back to through sep."""
        start, end = self.state(), self.state()
        if lo == 0:
            self.eps[start].append(end)
        at = start
        for j in range(1, (max(lo, 1) if hi is None else hi) + 1):
            if j > 1:
                sep_s, sep_e = self.build(sep)
                self.eps[at].append(sep_s)
                at = sep_e
            item_s, item_e = self.build(item)
            self.eps[at].append(item_s)
            at = item_e
            if j >= lo:
                self.eps[at].append(end)
        if hi is None:
            sep_s, sep_e = self.build(sep)
            self.eps[at].append(sep_s)
            self.eps[sep_e].append(item_s)
        return start, end

    def subset(self, parts, sep) -> tuple[int, int]:
        """Each part built once, between two chains of states: `none[i]` before part i
        with no part written yet, `some[i]` with one written (so part i needs sep first).
        A part leads to some[i + 1]; an optional one may be skipped from either chain."""
        none = start = self.state()
        some = self.state()
        for part, required in parts:
            s, e = self.build(part)
            sep_s, sep_e = self.build(sep)
            self.eps[none].append(s)
            self.eps[some].append(sep_s)
            self.eps[sep_e].append(s)
            next_none, next_some = self.state(), self.state()
            self.eps[e].append(next_some)
            if not required:
                self.eps[none].append(next_none)
                self.eps[some].append(next_some)
            none, some = next_none, next_some
        end = self.state()
        self.eps[none].append(end)
        self.eps[some].append(end)
        return start, end

    def trimmed(self, start: int, accept: int) -> _NFA:
        """The same automaton without the moves into states that cannot reach `accept`."""
        back: list[list[int]] = [[] for _ in self.eps]
        for q in range(len(self.eps)):
            for t in self.eps[q]:
                back[t].append(q)
            for _, _, t in self.edges[q]:
                back[t].append(q)
        alive, todo = {accept}, [accept]
        while todo:
            for q in back[todo.pop()]:
                if q not in alive:
                    alive.add(q)
                    todo.append(q)
        if start not in alive:
            raise InvalidArgument("guided regex: the pattern matches no string")
        return _NFA([[t for t in ts if t in alive] for ts in self.eps],
                    [[e for e in es if e[2] in alive] for es in self.edges])


# ---- the lazy DFA ------------------------------------------------------------------

class ByteDFA:
    """Deterministic over bytes, built as it is walked. States are ints; DEAD = no match
    can follow. Not thread-safe: one thread walks it (the engine's)."""

    def __init__(self, nfa: _NFA, start: int, accept: int):
        self._nfa = nfa
        self._accept = accept
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._rows: list[list[int] | None] = []  # [state] -> 256 next states, once built
        self.accepting: list[bool] = []
        self.start = self._intern(self._closure([start]))

    @property
    def num_states(self) -> int:
        return len(self._sets)

    def next(self, state: int, byte: int) -> int:
        return self.row(state)[byte]

    def row(self, state: int) -> list[int]:
        """The 256 successors of `state` (DEAD where none)."""
        row = self._rows[state]
        if row is None:
            row = self._rows[state] = self._build_row(state)
        return row

    def walk(self, state: int, data: bytes) -> int:
        for byte in data:
            if state == DEAD:
                break
            state = self.row(state)[byte]
        return state

    def matches(self, data: bytes) -> bool:
        state = self.walk(self.start, data)
        return state != DEAD and self.accepting[state]

    def is_final(self, state: int) -> bool:
        """A full match that no byte can extend."""
        return self.accepting[state] and all(t == DEAD for t in self.row(state))

    def _closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for t in self._nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _intern(self, states: frozenset[int]) -> int:
        state = self._ids.get(states)
        if state is None:
            if len(self._sets) >= MAX_DFA_STATES:
                raise GuideTooLarge(f"the pattern's automaton passed {MAX_DFA_STATES} states")
            state = self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._rows.append(None)
            self.accepting.append(self._accept in states)
        return state

    def _build_row(self, state: int) -> list[int]:
        targets: list[set[int]] = [set() for _ in range(256)]
        for q in self._sets[state]:
            for lo, hi, to in self._nfa.edges[q]:
                for byte in range(lo, hi + 1):
                    targets[byte].add(to)
        made: dict[frozenset[int], int] = {}
        row = []
        for ts in targets:
            if not ts:
                row.append(DEAD)
                continue
            key = frozenset(ts)
            if key not in made:
                made[key] = self._intern(self._closure(key))
            row.append(made[key])
        return row
