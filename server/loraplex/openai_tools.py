"""OpenAI tool calling in the HTTP API (openai_api.py): a chat request's `tools` reach the
model through the chat template, and `tool_choice` decides what its text becomes.

    "none"          the tools are shown; the text is the message's content
    {"type": "function", "function": {"name": N}}
                    the output is guided (guided_json) to N's parameters schema: the text
                    is the arguments of one call of N (finish_reason "stop", as OpenAI's)
    "required"      guided to a JSON array of {"name", "parameters"} items, one of the
                    tools each (a single item with parallel_tool_calls false); every item
                    is a call (finish_reason "tool_calls")
    "auto"          the default when tools are given: the model chooses. Needs the server's
                    --tool-call-parser, which reads the calls out of the text; `hermes`:
                    <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (the
                    format of Qwen2.5/Qwen3, Hermes 2/3 and many fine-tunes), the rest of
                    the text being the content; a call's arguments stream as written (see
                    _Hermes). `qwen3_coder` (Qwen3-Coder, Qwen3.5):
                    the same blocks holding <function=f><parameter=a>...</parameter>
                    </function> XML, values typed by the tool's schema.
                    `llama3_json`: a text that is {"name": ..., "parameters": {...}}
                    objects (after Llama 3.1's <|python_tag|>, "; " between them) is calls.
                    `pythonic` (Llama 3.2 and 4, ToolACE): a text that is a Python list of
                    calls with literal keyword arguments, [f(a=1), g(b="x")], is calls.
                    In these two a text that begins otherwise is all content, and so is
                    one whose first call does not stream and that does not parse whole:
                    a llama3_json call's arguments stream as written, a pythonic one's
                    an argument at a time (see _Llama3Json, _Pythonic).
                    `mistral`: the text after Mistral's [TOOL_CALLS] is calls: a JSON array
                    of {"name", "arguments"} (tokenizers before v11), or f[ARGS]{...} with
                    [TOOL_CALLS] before each (v11 on), their arguments streamed, with
                    Mistral's 9-character call ids; the text before the tag is content,
                    and so is text that begins no call and does not parse whole.

A parser turns the completion's text, fed piece by piece as it streams, into `str` pieces
of the content and `CallDelta`s of the calls (and openai_reasoning's, `Reasoning` pieces),
so a streamed answer adds up to the whole one. No protobuf and no HTTP here.
"""

from __future__ import annotations

import ast
import io
import json
import re
import secrets
import string
import tokenize
from dataclasses import dataclass

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
NO_PARAMETERS = {"type": "object", "properties": {}}  # (OpenAI's meaning of none given)


class ToolError(ValueError):
    """A tools or tool_choice value that cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CallDelta:
    """A piece of tool call `index` (0, 1, ... in a choice): its first piece carries id and
    name, every piece some of the arguments' JSON text."""

    index: int
    arguments: str
    id: str = ""
    name: str = ""


@dataclass(frozen=True)
class Reasoning:
    """A piece of the model's reasoning (openai_reasoning.py), apart from the content."""

    text: str


Piece = str | CallDelta | Reasoning  # (str: a piece of the content)


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools and tool_choice ask for."""

    mode: str  # "none" | "named" | "required" | "auto"
    tools: tuple[dict, ...]  # OpenAI's {"type": "function", "function": {...}}, checked
    name: str = ""  # "named": the function
    parallel: bool = True
    parser: str = ""  # "auto": the --tool-call-parser

    def guided_json(self) -> dict | None:
        """The schema that the output must follow (None: the model writes freely)."""
        schemas = {t["function"]["name"]: t["function"].get("parameters") or NO_PARAMETERS
                   for t in self.tools}
        if self.mode == "named":
            return schemas[self.name]
        if self.mode == "required":
            defs: dict = {}  # every tool's $defs, at the root where the $refs now point
            items = [{"type": "object",
                      "properties": {"name": {"const": n}, "parameters": _rooted(n, s, defs)},
                      "required": ["name", "parameters"]} for n, s in schemas.items()]
            return {"type": "array", "items": {"anyOf": items}, "minItems": 1,
                    **({} if self.parallel else {"maxItems": 1}),
                    **({"$defs": defs} if defs else {})}
        return None

    def keeps_special_tokens(self) -> bool:
        """Whether the text must keep special tokens, as the parser reads some."""
        return self.mode == "auto" and _PARSERS[self.parser].KEEPS_SPECIAL

    def new_parser(self) -> Parser | None:
        """A parser for one choice (None: the text is all content)."""
        if self.mode == "named":
            return _Named(self.name)
        if self.mode == "required":
            return _Required()
        if self.mode == "auto":
            return _PARSERS[self.parser].for_plan(self)
        return None


def plan(tools, tool_choice, parallel_tool_calls, parser: str) -> ToolPlan | None:
    """Check a chat request's tools, tool_choice and parallel_tool_calls (None: not given);
    `parser`: the server's --tool-call-parser ("" = none). None when there are no tools."""
    if tools is not None and not isinstance(tools, list):
        raise ToolError("tools must be an array of {\"type\": \"function\", \"function\": "
                        "{\"name\", \"description\", \"parameters\"}}", "tools")
    checked = tuple(_tool(i, t) for i, t in enumerate(tools or ()))
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ToolError(f"tools: each function needs its own name, got {names}", "tools")
    choice = ("auto" if checked else "none") if tool_choice is None else tool_choice
    if not checked:
        if choice != "none":
            raise ToolError("tool_choice needs tools: give the functions the model may call",
                            "tool_choice")
        return None
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError('tool_choice must be "none", "auto", "required" or {"type": '
                            '"function", "function": {"name": ...}}', "tool_choice")
        if name not in names:
            raise ToolError(f"tool_choice names the function {name!r}, which is not in "
                            f"tools {names}", "tool_choice")
        return ToolPlan("named", checked, name=name, parallel=parallel)
    if choice in ("none", "required"):
        return ToolPlan(choice, checked, parallel=parallel)
    if choice != "auto":
        raise ToolError(f'tool_choice must be "none", "auto", "required" or a named '
                        f'function, got {json.dumps(choice)[:80]}', "tool_choice")
    if not parser:
        raise ToolError('tool_choice "auto" (the default with tools) needs a server started '
                        'with --tool-call-parser (hermes, llama3_json, mistral, pythonic or '
                        'qwen3_coder: the format the model writes calls in), which reads the '
                        'calls out of the text; or send tool_choice "required", "none" or a '
                        'named function',
                        "tool_choice")
    return ToolPlan("auto", checked, parallel=parallel, parser=parser)


def _tool(i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" \
            or not isinstance(tool.get("function"), dict):
        raise ToolError(f'{where} must be {{"type": "function", "function": {{"name", '
                        f'"description", "parameters"}}}}', "tools")
    fn = tool["function"]
    unknown = sorted(set(fn) - _FUNCTION_KEYS)
    if unknown:
        raise ToolError(f"{where}.function: unknown fields {unknown}; it takes "
                        f"{sorted(_FUNCTION_KEYS)}", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or "
                        f"'-', got {json.dumps(name)[:80]}", "tools")
    if not isinstance(fn.get("description", ""), str):
        raise ToolError(f"{where}.function.description must be a string", "tools")
    parameters = fn.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
    return {"type": "function", "function": {"name": name,
                                             "description": fn.get("description") or "",
                                             "parameters": parameters or NO_PARAMETERS}}


def _rooted(tool: str, schema: dict, defs: dict) -> dict:
    """`schema` (a tool's parameters) to sit inside another schema: its $defs /
    definitions move into `defs` as "tool:name", and its $refs point there."""
    def rewrite(node):
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        for prefix in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(prefix):
                out["$ref"] = f"#/$defs/{tool}:{ref[len(prefix):]}"
        return out

    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            defs[f"{tool}:{name}"] = rewrite(sub)
    return rewrite(schema)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _mistral_call_id() -> str:
    """Mistral's chat templates refuse any id but 9 letters and digits."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


# ---- parsers: a choice's text -> content and calls ------------------------------------

class Parser:
    """Feed a choice's text as it comes; each call returns what is now certain."""

    def __init__(self):
        self.calls = 0  # calls begun so far

    def feed(self, text: str) -> list[str | CallDelta]:
        raise NotImplementedError

    def finish(self) -> list[str | CallDelta]:
        """The end of the text: what was held back."""
        return []

    def finish_reason(self, reason: str | None) -> str | None:
        return reason

    def _call(self, name: str, arguments: str) -> CallDelta:
        self.calls += 1
        return CallDelta(self.calls - 1, arguments, self.new_id(), name)

    new_id = staticmethod(new_call_id)

    @classmethod
    def for_plan(cls, plan: ToolPlan) -> Parser:
        """The --tool-call-parser's parser of one choice of `plan` (its tool_choice auto)."""
        return cls(plan.parallel)

    KEEPS_SPECIAL = False  # True: it reads tags a tokenizer marks special (kept in the text)


class _Named(Parser):
    """The whole text is the arguments of one call of `name`."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    def feed(self, text: str) -> list[str | CallDelta]:
        if not self.calls:
            return [self._call(self._name, text)]
        return [CallDelta(0, text)] if text else []

    def finish(self) -> list[str | CallDelta]:
        return [] if self.calls else [self._call(self._name, "")]


class _Required(Parser):
    """The text is a JSON array of {"name", "parameters"}: each item is a call once it
    is closed (an item cut off by max_tokens is no call)."""

    def __init__(self):
        super().__init__()
        self._text, self._at = "", 0
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[str | CallDelta]:
        self._text += text
        out = []
        while True:
            while self._at < len(self._text) and self._text[self._at] in "[, ]":
                self._at += 1
            try:
                item, end = self._decoder.raw_decode(self._text, self._at)
            except json.JSONDecodeError:  # (not closed yet)
                return out
            self._at = end
            if isinstance(item, dict) and isinstance(item.get("name"), str):  # (guided so)
                out.append(self._call(item["name"], _dumps(item.get("parameters", {}))))

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason


class _Hermes(Parser):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks are calls; the text
    around them is the content, less the whitespace next to a block. While streaming, text
    that may be the start of a block is held back until it is known.

    A block that begins {"name": "<name>", "arguments": { (or "parameters") is a call from
    there on: its arguments stream as the model writes them, up to the end of that object
    (the rest of the block is dropped), or to the block's or the text's end when the model
    does not close the object; like OpenAI's, they are the model's text, to be checked as
    JSON. A block that begins otherwise is read whole when it closes: a call when it is such
    JSON (arguments given as a string too), else content, as is one that never closes."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    KEEPS_SPECIAL = True  # (some models' <tool_call> is a special token)

    def __init__(self, parallel: bool):
        super().__init__()
        self._parallel = parallel
        self._text = ""  # not yet sent: content, or a block's body while _inside
        self._inside = False
        self._gap = ""  # whitespace before the open block (content if it is no call)
        self._after_call = False  # at whitespace that follows a block: not content
        self._arguments: _ObjectEnd | None = None  # of the block's streaming call
        self._sends = False  # whether that call is sent (not a second one, unparallel)

    def feed(self, text: str) -> list[str | CallDelta]:
        self._text += text
        out: list[str | CallDelta] = []
        while True:
            if self._inside:
                end = self._text.find(self.CLOSE)
                if self._arguments is None and self._begins_call(end >= 0, out):
                    continue
                if self._arguments is not None:
                    out += self._stream(end)
                    if end < 0:
                        return out
                    continue
                if end < 0:
                    return out
                body, self._text = self._text[:end], self._text[end + len(self.CLOSE):]
                self._inside = False
                call = self._read(body)
                if call is None:
                    out += self._content(self._gap + self.OPEN + body + self.CLOSE)
                    continue
                self._after_call = True
                if self._parallel or not self.calls:
                    out.append(self._call(*call))
                continue
            start = self._text.find(self.OPEN)
            if start < 0:
                keep = _held_back(self._text, self.OPEN)
                out += self._content(self._text[:len(self._text) - keep])
                self._text = self._text[len(self._text) - keep:]
                return out
            before = self._text[:start]
            content = before.rstrip()
            self._gap = before[len(content):]
            out += self._content(content)
            self._text, self._inside = self._text[start + len(self.OPEN):], True

    def _begins_call(self, closed: bool, out: list) -> bool:
        """Whether the open block's text so far begins a streaming call (then the call is
        begun, its arguments' first text taken from there)."""
        head = self._head(self._text if not closed else self._text[:self._text.find(self.CLOSE)])
        if not head:
            return False
        name, at, self._arguments = head
        self._text = self._text[at:]
        self._sends = self._parallel or not self.calls
        self._gap, self._after_call = "", True
        if self._sends:
            out.append(self._call(name, ""))
        return True

    def _stream(self, end: int) -> list[CallDelta]:
        """The streaming call's next arguments: the text before the block's end (`end`: its
        index, -1: not there yet, less what may be its start)."""
        if end < 0:
            upto = len(self._text) - tag_start(self._text, self.CLOSE)
            part, self._text = self._text[:upto], self._text[upto:]
        else:
            part, self._text = self._text[:end], self._text[end + len(self.CLOSE):]
            self._inside = False
        piece = self._arguments.take(part)
        if end >= 0:
            piece += self._arguments.close()
            self._arguments = None
        return [CallDelta(self.calls - 1, piece)] if piece and self._sends else []

    def _head(self, body: str) -> tuple[str, int, _ObjectEnd] | None:
        """(name, where its arguments begin, their reader) when `body` begins a call with
        its name first, else None (also while too short to tell)."""
        match = _JSON_HEAD.match(body)
        if match is None:
            return None
        try:
            return json.loads(match.group(1)), match.end() - 1, _ObjectEnd()
        except ValueError:
            return None

    @staticmethod
    def _read(body: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of a block's body, None when it is no call."""
        try:
            return _call_of(_STRICT.decode(body))
        except ValueError:
            return None

    def finish(self) -> list[str | CallDelta]:
        if self._arguments is not None:  # (cut off: the call keeps what was written)
            piece = self._arguments.take(self._text) + self._arguments.cut()
            self._text, self._inside, self._arguments = "", False, None
            return [CallDelta(self.calls - 1, piece)] if piece and self._sends else []
        rest = self._gap + self.OPEN + self._text if self._inside else self._text
        self._text, self._inside = "", False
        return self._content(rest)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason

    def _content(self, text: str) -> list[str]:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return [text] if text else []


# a JSON call's head (hermes's, llama3_json's): {"name": "<a JSON string>", "arguments"
# (or "parameters"): {
_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'  # (valid escapes only)
_JSON_HEAD = re.compile(rf'\s*\{{\s*"name"\s*:\s*({_JSON_STRING})\s*,\s*'
                        r'"(?:arguments|parameters)"\s*:\s*\{')


class _ObjectEnd:
    """Takes a JSON object's text as it comes, up to the brace that closes it (the
    arguments of a hermes call)."""

    def __init__(self):
        self._depth = 0
        self._in_string = self._escaped = self.done = False

    def take(self, text: str) -> str:
        """The part of `text` that is still the object's."""
        if self.done:
            return ""
        for n, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return text[:n + 1]
        return text

    def close(self) -> str:
        """The block closed: what is left to send (nothing: the text is as written)."""
        return ""

    cut = close  # (the text ended)


class _Qwen3Coder(_Hermes):
    """Qwen3-Coder's (and Qwen3.5's) calls, XML in <tool_call> blocks:

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        </function>
        </tool_call>

    A value is text (less the newline after its tag and the one before its end); one whose
    parameter the tool's schema types other than string is read as JSON when it parses
    (a number, true, an object...), as vLLM's qwen3_coder parser does. A block that begins
    <function=...> is a call from there, its arguments streamed as they come (see
    _XmlArguments); one that begins otherwise is content."""

    def __init__(self, parallel: bool, tools: tuple[dict, ...]):
        super().__init__(parallel)
        self._types = {  # function -> parameter -> its schema's "type" (None: any)
            t["function"]["name"]: {
                k: v.get("type") if isinstance(v, dict) else None
                for k, v in ((t["function"].get("parameters") or {}).get("properties")
                             or {}).items()}
            for t in tools}

    @classmethod
    def for_plan(cls, plan: ToolPlan) -> Parser:
        return cls(plan.parallel, plan.tools)

    def _head(self, body: str) -> tuple[str, int, _XmlArguments] | None:
        match = _XML_HEAD.match(body)
        if match is None:
            return None
        name = match.group(1)
        return name, match.end(), _XmlArguments(self._types.get(name, {}))

    @staticmethod
    def _read(body: str) -> None:
        return None  # (a block that does not begin <function=...> is content)


_XML_HEAD = re.compile(r"\s*<function=([^>\s]{1,64})>")
_XML_PARAMETER = re.compile(r"<parameter=([^<>\s]{1,64})>")  # (no "<": a tag starts at the last)


class _XmlArguments:
    """Takes a qwen3_coder call's XML after <function=...> as it comes and gives the JSON
    text of its arguments: {"key": value, ...}. A value is the text between its tags (less
    the newline after the first and the one before the second); a string's streams as it
    comes, one whose parameter the schema types otherwise is sent at its end, as JSON when
    it parses as such. Text between the parameters is dropped; </function> (or the block's
    end) closes the object."""

    PARAMETER_END, FUNCTION_END = "</parameter>", "</function>"

    def __init__(self, types: dict):
        self._types = types  # parameter -> its schema's "type" (None: any)
        self._text = ""  # not yet read
        self._key: str | None = None  # the open parameter's
        self._streams = False  # whether its value streams (a string's)
        self._value = ""  # its value so far, when it does not stream
        self._lead = True  # the newline after its tag may still come
        self._count = 0  # parameters begun
        self._opened = self.done = False

    def take(self, text: str) -> str:
        out = [] if self._opened else ["{"]
        self._opened = True
        self._text += text
        while not self.done:
            if self._key is None:
                param = _XML_PARAMETER.search(self._text)
                end = self._text.find(self.FUNCTION_END)
                if end >= 0 and (param is None or end < param.start()):
                    self._text, self.done = "", True
                    out.append("}")
                    break
                if param is None:  # (keep what may be a tag's start)
                    lt = self._text.rfind("<")
                    self._text = self._text[lt:] if lt >= 0 and ">" not in self._text[lt:] else ""
                    break
                self._begin(param.group(1), out)
                self._text = self._text[param.end():]
                continue
            if self._lead:
                if not self._text:
                    break
                self._text, self._lead = self._text.removeprefix("\n"), False
            end = self._text.find(self.PARAMETER_END)
            if end >= 0:
                value, self._text = self._text[:end], self._text[end + len(self.PARAMETER_END):]
                out.append(self._end(value.removesuffix("\n")))
                continue
            keep = tag_start(self._text, self.PARAMETER_END)
            if self._text[:len(self._text) - keep].endswith("\n"):
                keep += 1  # (it may be the newline before the end tag)
            value, self._text = self._text[:len(self._text) - keep], self._text[len(self._text) - keep:]
            out.append(self._more(value))
            break
        return "".join(out)

    def close(self) -> str:
        """The block closed: the open value ends, then the object."""
        if self.done:
            return ""
        out = self._end(self._text.removesuffix("\n")) if self._key is not None else ""
        self._text, self.done = "", True
        return out + "}"

    def cut(self) -> str:
        """The text ended: the open value's rest as written (the object stays open)."""
        if self._key is None or self.done:
            return ""
        rest, self._text = self._text, ""
        return self._more(rest) if self._streams else self._value + rest

    def _begin(self, key: str, out: list) -> None:
        kind = self._types.get(key)
        kinds = kind if isinstance(kind, list) else [kind]
        self._key, self._streams = key, None in kinds or "string" in kinds
        self._value, self._lead = "", True
        out.append((", " if self._count else "") + _dumps(key) + ": "
                   + ('"' if self._streams else ""))
        self._count += 1

    def _more(self, text: str) -> str:
        if self._streams:
            return _dumps(text)[1:-1]  # (JSON escapes each character alone)
        self._value += text
        return ""

    def _end(self, text: str) -> str:
        self._key = None
        if self._streams:
            return _dumps(text)[1:-1] + '"'
        text = self._value + text
        try:
            return _dumps(_STRICT.decode(text.strip()))
        except ValueError:
            return _dumps(text)


class _StreamedCalls:
    """For a parser that reads JSON calls one after another out of its held text
    (`_text`), streaming each one's arguments object as it comes."""

    _arguments: _ObjectEnd | None = None  # the call being streamed's
    _sends = False  # whether it is sent (not a second call without parallel calls)

    def _begin_call(self, name: str) -> list[CallDelta]:
        """A call begins, its arguments object next in `_text`."""
        self._arguments, self._sends = _ObjectEnd(), self._parallel or not self.calls
        return [self._call(name, "")] if self._sends else []

    def _stream(self) -> list[CallDelta]:
        """The calls' pieces that the held text now holds."""
        out: list[CallDelta] = []
        while True:
            out += self._arguments_so_far()
            if self._arguments is not None:
                return out
            head = self._next_head()
            if head is None:  # (not yet, or not that form: held whole)
                return out
            self._streaming, self._text = True, self._text[head[1]:]
            out += self._begin_call(head[0])

    def _next_head(self) -> tuple[str, int] | None:
        """The next call's name and where its arguments object begins in `_text`."""
        raise NotImplementedError

    def _arguments_so_far(self) -> list[CallDelta]:
        """The streaming call's arguments in `_text` (taken from it); its reader goes once
        the object closes."""
        if self._arguments is None:
            return []
        piece = self._arguments.take(self._text)
        self._text = self._text[len(piece):]
        if self._arguments.done:
            self._arguments = None
        return [CallDelta(self.calls - 1, piece)] if piece and self._sends else []


class _WholeTextCalls(Parser):
    """A text that is calls from its start (after an optional `TAG`, which a tokenizer
    may also mark special and so leave out), in the format `parse` reads. Any other text
    is content, all of it: one that begins otherwise streams as it comes; one that begins
    like calls is held to its end, and is content if it does not parse whole."""

    TAG = ""
    STARTS = ()  # the first characters of calls (after TAG)
    parse = None  # text after TAG -> [(name, arguments JSON)], None: not calls alone

    def __init__(self, parallel: bool):
        super().__init__()
        self._parallel = parallel
        self._text = ""
        self._state = "open"  # "open" (undecided) | "calls" (held) | "content"

    def feed(self, text: str) -> list[str | CallDelta]:
        if self._state == "content":
            return [text] if text else []
        self._text += text
        if self._state == "calls":
            return []
        head, body = self._text.lstrip(), self._untagged(self._text)
        if body is not None and body[:1] in self.STARTS or head[:1] in self.STARTS:
            self._state = "calls"
            return []
        if body == "" or self.TAG.startswith(head):
            return []  # (whitespace, the tag or a start of it: still undecided)
        self._state, text, self._text = "content", self._text, ""
        return [text]

    def finish(self) -> list[str | CallDelta]:
        text, self._text = self._text, ""
        body = self._untagged(text)
        calls = self.parse(text.lstrip() if body is None else body)
        if calls is None:
            return [text] if text else []
        return [self._call(*c) for c in (calls if self._parallel else calls[:1])]

    def _untagged(self, text: str) -> str | None:
        """The text after its leading whitespace and TAG (None: it does not start so)."""
        head = text.lstrip()
        return head[len(self.TAG):].lstrip() if head.startswith(self.TAG) else None

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason


def _json_calls(text: str) -> list[tuple[str, str]] | None:
    """{"name", "parameters" or "arguments"} objects, or arrays of them, with ";" or
    whitespace between."""
    at, calls = 0, []
    while True:
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
        if at == len(text):
            return calls or None
        try:
            value, at = _STRICT.raw_decode(text, at)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _call_of(item)
            if call is None:
                return None
            calls.append(call)


def _python_calls(text: str) -> list[tuple[str, str]] | None:
    """A Python list of calls with literal keyword arguments: [f(a=1, b="x"), g()]."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) \
                    or call.args or any(k.arg is None for k in call.keywords):
                return None
            arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            calls.append((call.func.id, json.dumps(arguments, ensure_ascii=False,
                                                   allow_nan=False)))
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class _Llama3Json(_StreamedCalls, _WholeTextCalls):
    """Llama 3.1+'s calls: {"name": ..., "parameters": {...}} objects, "; " between them.
    A call that begins {"name": "<name>", "parameters": { (or "arguments") streams its
    arguments as written, up to the brace that closes them, as hermes's; from then on the
    text is calls, and what is left at its end is read as whole objects (a call with no
    parameters) or dropped. A text whose first call does not begin so is read whole."""

    TAG, STARTS = "<|python_tag|>", ("{",)
    parse = staticmethod(_json_calls)

    def __init__(self, parallel: bool):
        super().__init__(parallel)
        self._streaming = False  # some call began streaming

    def feed(self, text: str) -> list[str | CallDelta]:
        out = super().feed(text)
        return out + self._stream() if self._state == "calls" else out

    def _next_head(self) -> tuple[str, int] | None:
        head = _JSON_HEAD.match(self._text, self._next_call())
        return None if head is None else (json.loads(head.group(1)), head.end() - 1)

    def _next_call(self) -> int:
        """Where the next call's object may begin: after the tag (first), or after the
        closing brace and "; " that follow a call."""
        if self._streaming:
            return _BETWEEN_CALLS.match(self._text).end()
        body = self._untagged(self._text)
        return len(self._text) - len(body if body is not None else self._text.lstrip())

    def finish(self) -> list[str | CallDelta]:
        if not self._streaming:
            return super().finish()
        out = self._stream()
        rest, cut = self._text, self._arguments is not None  # (cut: keeps what was written)
        self._text, self._arguments = "", None
        if not cut and rest.strip():
            calls = _json_calls(rest[_BETWEEN_CALLS.match(rest).end():]) or []
            out += [self._call(*c) for c in calls if self._parallel]
        return out


_BETWEEN_CALLS = re.compile(r"[\s;}]*")  # (after a call's arguments: its brace, "; ")


class _Mistral(_StreamedCalls, Parser):
    """The text after Mistral's [TOOL_CALLS] tag is calls, in the form of the model's
    tokenizer version:

        v3 to v10 (Mistral 7B v0.3, Nemo)   [TOOL_CALLS][{"name": ..., "arguments": {...}}]
        v11 on (Small 3.1+, Devstral...)    [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}

    (v13 writes [CALL_ID] and an id before [ARGS]; the call gets a fresh id, as the others).
    The content before the tag streams, less text that may be the tag's start, held until
    known. A call begins at f[ARGS]{ (v11) or [{"name": "f", "arguments": { (the array)
    and its arguments stream as written, up to the brace that closes them, as hermes's
    do; from then on the text is calls: in the v11 form the text after a call's object,
    up to the next tag, is dropped; in the array the next call begins after "}, ", and
    what is left at the end is read as whole calls (one with no arguments) or dropped.
    Otherwise the text from the tag on is held to its end, and is content if it does not
    parse whole. With no tag (a tokenizer that leaves special tokens out), a text that
    begins like the array is read the same way."""

    TAG = "[TOOL_CALLS]"
    KEEPS_SPECIAL = True
    new_id = staticmethod(_mistral_call_id)

    def __init__(self, parallel: bool):
        super().__init__()
        self._parallel = parallel
        self._text = ""  # not yet sent
        self._held = ""  # the text is (maybe) calls, held to the end: "tagged" | "untagged"
        self._streamed = False  # some content was sent
        self._streaming = False  # some call began (the rest is calls, never content)
        self._array = False  # in the JSON array form

    def feed(self, text: str) -> list[str | CallDelta]:
        self._text += text
        if self._held == "tagged" or self._streaming:
            return self._stream()
        head = self._text.lstrip()
        if self._held or (not self._streamed and head[:1] in ("[", "{")
                          and not self.TAG.startswith(head)):
            self._held = "untagged"  # (the array, its tag left out; until a tag comes)
            out = self._stream()
            if self._streaming or self.TAG not in self._text:
                return out
        at = self._text.find(self.TAG)
        if at >= 0:
            content = self._text[:at].rstrip()  # (the whitespace goes if calls follow)
            self._text, self._held = self._text[len(content):], "tagged"
            return self._content(content) + self._stream()
        cut = len(self._text) - _held_back(self._text, self.TAG)
        content, self._text = self._text[:cut], self._text[cut:]
        return self._content(content)

    def _next_head(self) -> tuple[str, int] | None:
        """The next call's name and where its arguments begin in the held text."""
        if self._array:
            head = _JSON_HEAD.match(self._text, _BETWEEN_ITEMS.match(self._text).end())
            return None if head is None else (json.loads(head.group(1)), head.end() - 1)
        if self._streaming:  # (v11: the text between calls is dropped)
            at = self._text.find(self.TAG)
            keep = len(self._text) - at if at >= 0 else tag_start(self._text, self.TAG)
            self._text = self._text[len(self._text) - keep:]
            if at < 0:
                return None
        at = len(self._text) - len(self._text.lstrip())
        if self._text.startswith(self.TAG, at):
            at += len(self.TAG)
            head = _MISTRAL_HEAD.match(self._text, at)
            if head is not None:
                return head.group(1), head.end() - 1
        if self._streaming:
            return None
        head = _ARRAY_HEAD.match(self._text, at)
        self._array = head is not None
        return None if head is None else (json.loads(head.group(1)), head.end() - 1)

    def finish(self) -> list[str | CallDelta]:
        if self._streaming:  # (a call cut off keeps what was written)
            out = self._stream()
            rest, cut = self._text, self._arguments is not None
            self._text, self._arguments = "", None
            if self._array and not cut:  # (calls with no arguments object, read whole)
                calls = _json_calls("[" + rest[_BETWEEN_ITEMS.match(rest).end():]) or []
                out += [self._call(*c) for c in calls if self._parallel]
            return out
        text, self._text = self._text, ""
        body = text.lstrip()
        calls = _mistral_calls(body[len(self.TAG):] if body.startswith(self.TAG) else body) \
            if self._held else None
        if calls is None:
            return self._content(text)
        return [self._call(*c) for c in (calls if self._parallel else calls[:1])]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason

    def _content(self, text: str) -> list[str]:
        self._streamed = self._streamed or bool(text)
        return [text] if text else []


# a v11 call's head after its [TOOL_CALLS]: name, maybe v13's [CALL_ID] and id, [ARGS], {
_MISTRAL_HEAD = re.compile(r"\s*([a-zA-Z0-9_-]{1,64})\s*(?:\[CALL_ID\][a-zA-Z0-9]{9})?"
                           r"\[ARGS\]\s*\{")
# the array form's first call: [ (or none), then a JSON call's head
_ARRAY_HEAD = re.compile(r"\s*\[?" + _JSON_HEAD.pattern)
_BETWEEN_ITEMS = re.compile(r"[\s},]*")  # (after a call's arguments: its brace, ", ")
_MISTRAL_CALL = re.compile(r"\s*([a-zA-Z0-9_-]{1,64})\s*(?:\[CALL_ID\][a-zA-Z0-9]{9})?"
                           r"(?:\[ARGS\])?\s*(\{.*\})\s*", re.DOTALL)


def _mistral_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls after the first [TOOL_CALLS]: a JSON array of them (before v11), or
    name[ARGS]{arguments} with [TOOL_CALLS] between (v11 on)."""
    if text.lstrip()[:1] in ("[", "{"):
        return _json_calls(text)
    calls = []
    for piece in text.split(_Mistral.TAG):
        match = _MISTRAL_CALL.fullmatch(piece)
        try:
            arguments = _STRICT.decode(match.group(2)) if match else None
        except ValueError:
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append((match.group(1), _dumps(arguments)))
    return calls


class _Pythonic(_WholeTextCalls):
    """A Python list of calls with literal keyword arguments (Llama 3.2 / 4's). The calls
    stream: a call is sent once its first argument (or its closing parenthesis) is read
    and that argument is a literal JSON can hold; from then on the text is calls, each
    argument sent as JSON when it ends (one that is no such literal: its source text, as
    a JSON string). Text that is no keyword argument, no next call, or follows the list
    ends the calls, dropped (a call cut off keeps what was written). A text whose first
    call does not begin so is held and read whole."""

    STARTS = ("[",)

    def __init__(self, parallel: bool, names: tuple[str, ...] = ()):
        super().__init__(parallel)
        self._hyphenated = {n for n in names if "-" in n}  # (names Python cannot spell)
        self._reader = _PythonList(self._hyphenated)
        self._streaming = False  # the first call was sent: the rest is calls
        self._waiting: list[tuple] = []  # the reader's events before that
        self._sends = False  # whether the current call is sent (parallel, or the first)

    @classmethod
    def for_plan(cls, plan: ToolPlan) -> Parser:
        return cls(plan.parallel, tuple(t["function"]["name"] for t in plan.tools))

    def feed(self, text: str) -> list[str | CallDelta]:
        out = super().feed(text)
        if self._state != "calls" or self._reader.failed and not self._streaming:
            return out
        self._reader.text = self._text
        events = self._reader.read()
        if not self._streaming:
            self._waiting += events
            if not self._reader.sent:
                return out
            events, self._waiting, self._streaming = self._waiting, [], True
        return out + self._deltas(events)

    def finish(self) -> list[str | CallDelta]:
        if not self._streaming:
            return super().finish()
        self._text = ""  # (a call cut off keeps what was written; what follows is dropped)
        return []

    def _deltas(self, events: list[tuple]) -> list[CallDelta]:
        out: list[CallDelta] = []
        for kind, *what in events:
            if kind == "call":
                self._sends = self._parallel or not self.calls
                if self._sends:
                    out.append(self._call(what[0], ""))
            elif self._sends and kind == "argument":
                key, value, first = what
                out.append(CallDelta(self.calls - 1, ("{" if first else ", ")
                                     + _dumps(key) + ": " + value))
            elif self._sends:  # ("end", whether it had arguments)
                out.append(CallDelta(self.calls - 1, "}" if what[0] else "{}"))
        return out

    def parse(self, text: str) -> list[tuple[str, str]] | None:
        text, spelled = _respell(text, self._hyphenated)
        calls = _python_calls(text)
        return None if calls is None else [(spelled.get(n, n), a) for n, a in calls]


class _PythonList:
    """Reads `text` (growing) as a Python list of calls, from where it stopped: each
    `read` gives the events now certain, ("call", name), ("argument", key, its JSON,
    whether first) and ("end", whether it had arguments). `failed`: the text is not such
    a list (a positional or non-literal argument of the first call, a name that is no
    tool's, other text), which the caller then reads whole. Once the first call is sent,
    an argument that is no literal JSON can hold is its source text as a JSON string,
    and text that does not go on as a list of calls ends the reading ("done")."""

    def __init__(self, hyphenated: set[str]):
        self._hyphenated = hyphenated
        self.text = ""
        self.failed = False
        self._at = 0  # where reading resumes
        self._stage = "list"  # list | head | key | value | between | done
        self._key = ""
        self._arguments = 0  # of the current call
        self.sent = False  # a call is sent (its first argument or its end read)
        self._value: _ValueEnd | None = None  # the end of the argument being read

    def read(self) -> list[tuple]:
        out: list[tuple] = []
        while not self.failed and self._stage != "done":
            if not self._step(out):
                break
        return out

    def _step(self, out: list) -> bool:
        """Read one piece at `_at`, if it is all there (False: wait for more text)."""
        stage, text = self._stage, self.text
        if stage == "value":
            end = self._value.find(text)
            if end is None:
                return False
            source = text[self._at:end].strip()
            value = _literal_json(source) if text[end] in ",)" else None
            if value is None and not self.sent:
                self.failed = True
                return False
            if text[end] not in ",)":  # (a bracket or line that closes nothing open)
                self._stage = "done"
                return False
            out.append(("argument", self._key, value if value is not None else _dumps(source),
                        self._arguments == 0))
            self._arguments, self.sent = self._arguments + 1, True
            self._at, self._stage = end + 1, ("key" if text[end] == "," else "between")
            if text[end] == ")":
                out.append(("end", True))
            return True
        pattern, partial = _PY_STAGES[stage]
        match = pattern.match(text, self._at)
        if match is None:
            if partial.fullmatch(text, self._at):  # (its start, at the text's end: wait)
                return False
            if stage == "between" or self.sent:
                self._stage = "done"  # (after a call: what follows is dropped)
            else:
                self.failed = True
            return False
        self._at = match.end()
        if stage == "list":
            self._stage = "head"
        elif stage == "head":
            name = match.group(1)
            if "-" in name and name not in self._hyphenated:
                self.failed = not self.sent
                self._stage = "done"
                return False
            out.append(("call", name))
            self._stage, self._arguments = "key", 0
        elif stage == "key":
            if match.group(1) is None:  # ")"
                out.append(("end", self._arguments > 0))
                self._stage, self.sent = "between", True
            else:
                self._key, self._stage = match.group(1), "value"
                self._value = _ValueEnd(self._at)
        else:  # between
            self._stage = "head" if match.group(0).strip().startswith(",") else "done"
        return True


_PY_STAGES = {  # stage -> (its piece, a start of it that may go on)
    "list": (re.compile(r"\s*\[\s*"), re.compile(r"\s*")),
    "head": (re.compile(r"\s*([A-Za-z_][\w-]*)\s*\(\s*"),
             re.compile(r"\s*(?:[A-Za-z_][\w-]*\s*)?")),
    # (a "=" at the text's end may be "=="'s: the key waits for what follows it)
    "key": (re.compile(r"\s*(?:\)|([A-Za-z_]\w*)\s*=(?=[^=])\s*)"),
            re.compile(r"\s*(?:[A-Za-z_]\w*\s*=?)?")),
    "between": (re.compile(r"\s*(?:,\s*|\])"), re.compile(r"\s*")),
}


class _ValueEnd:
    """Finds where the Python expression from `at` ends, in a text that grows: the index
    of the "," or ")" after it at its own depth, or of a closing bracket or line end that
    is not its. Reading resumes where it stopped (inside a string too), so a long value
    fed a token at a time is read once."""

    def __init__(self, at: int):
        self._i, self._depth = at, 0
        self._quote = ""  # the open string's quote ("'", '"', or three of one), if any

    def find(self, text: str) -> int | None:
        """The end's index (None: not in `text` yet)."""
        i, n = self._i, len(text)
        while True:
            if self._quote:
                q = self._quote
                i = _PY_CONTENT[q].match(text, i).end()
                if text.startswith(q, i):
                    i, self._quote = i + len(q), ""
                    continue
                if len(q) == 1 and text.startswith("\n", i):
                    return i  # (a line ends an unclosed string: no literal)
                self._i = i  # (its end, or a backslash or quotes that may begin it, to come)
                return None
            i = _PY_PLAIN.match(text, i).end()
            if i >= n:
                self._i = i
                return None
            c = text[i]
            if c in "'\"":
                if n - i < 3 and text[i:] == c * (n - i):
                    self._i = i  # (one or two quotes at the end: maybe a triple's start)
                    return None
                self._quote = c * 3 if text.startswith(c * 3, i) else c
                i += len(self._quote)
                continue
            if c in "([{":
                self._depth += 1
            elif self._depth == 0:  # (a closing bracket or ",")
                return i
            elif c != ",":
                self._depth -= 1
            i += 1


_PY_PLAIN = re.compile(r"[^'\"()\[\]{},]*")
_PY_CONTENT = {  # a string's content so far, by its quote: up to its end (or the text's)
    **{q: re.compile(rf"(?:[^{q}\\\n]|\\.)*", re.DOTALL) for q in "'\""},
    **{q * 3: re.compile(rf"(?:[^{q}\\]|\\.|{q}(?=[^{q}]|{q}[^{q}]))*", re.DOTALL)
       for q in "'\""}}


def _literal_json(source: str) -> str | None:
    """The JSON of a Python literal's value (None: no literal, or none JSON can hold)."""
    try:
        return json.dumps(ast.literal_eval(source), ensure_ascii=False, allow_nan=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _respell(text: str, names: set[str]) -> tuple[str, dict[str, str]]:
    """`text` with each call of a hyphenated tool name (get-weather(...), outside string
    literals) renamed to an identifier, and the identifiers' names."""
    if not names:
        return text, {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return text, {}
    lines = [0]
    for line in text.splitlines(keepends=True):
        lines.append(lines[-1] + len(line))

    def at(pos: tuple[int, int]) -> int:
        return lines[pos[0] - 1] + pos[1]

    spans, spelled, i = [], {}, 0
    while i < len(tokens):
        j = i
        while (tokens[i].type == tokenize.NAME and j + 2 < len(tokens)
               and tokens[j + 1].string == "-" and tokens[j + 2].type in (tokenize.NAME,
                                                                          tokenize.NUMBER)
               and tokens[j].end == tokens[j + 1].start
               and tokens[j + 1].end == tokens[j + 2].start):
            j += 2
        name = text[at(tokens[i].start):at(tokens[j].end)] if j > i else ""
        if name in names and j + 1 < len(tokens) and tokens[j + 1].string == "(":
            alias = f"_loraplex_tool_{len(spelled)}"
            spelled[alias] = name
            spans.append((at(tokens[i].start), at(tokens[j].end), alias))
        i = j + 1
    for start, end, alias in reversed(spans):
        text = text[:start] + alias + text[end:]
    return text, spelled


def _call_of(item) -> tuple[str, str] | None:
    """(name, arguments JSON) of {"name": ..., "arguments" or "parameters": ...}."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return item["name"], arguments if isinstance(arguments, str) else _dumps(arguments)


def tag_start(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1)
                 if tag.startswith(text[len(text) - k:])), 0)


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` to keep: its trailing whitespace (which
    goes if a block follows) and any start of `tag`."""
    keep = tag_start(text, tag)
    body = text[:len(text) - keep]
    return keep + len(body) - len(body.rstrip())


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


_STRICT = json.JSONDecoder(parse_constant=_not_json)  # (NaN and Infinity are no JSON)


_PARSERS = {"hermes": _Hermes, "llama3_json": _Llama3Json, "mistral": _Mistral,
            "pythonic": _Pythonic, "qwen3_coder": _Qwen3Coder}


def message(pieces: list[Piece], reasoning: bool = False) -> dict:
    """A whole message's content and tool_calls (and `reasoning`: its reasoning_content)
    from all of a choice's pieces."""
    content = "".join(p for p in pieces if isinstance(p, str))
    thought = {"reasoning_content": "".join(p.text for p in pieces
                                            if isinstance(p, Reasoning)) or None
               } if reasoning else {}
    calls: list[dict] = []
    for p in pieces:
        if isinstance(p, CallDelta):
            if p.id:
                calls.append({"id": p.id, "type": "function",
                              "function": {"name": p.name, "arguments": ""}})
            calls[p.index]["function"]["arguments"] += p.arguments
    if not calls:
        return {"content": content, **thought}
    return {"content": content or None, **thought, "tool_calls": calls}


def delta(pieces: list[Piece]) -> dict:
    """A stream chunk's delta of these pieces ({} when there are none)."""
    out: dict = {}
    thought = "".join(p.text for p in pieces if isinstance(p, Reasoning))
    if thought:
        out["reasoning_content"] = thought
    content = "".join(p for p in pieces if isinstance(p, str))
    if content:
        out["content"] = content
    calls: list[dict] = []  # one entry per call: its pieces in this chunk joined
    for p in pieces:
        if not isinstance(p, CallDelta):
            continue
        if calls and calls[-1]["index"] == p.index:
            calls[-1]["function"]["arguments"] += p.arguments
            continue
        call: dict = {"index": p.index}
        if p.id:
            call.update(id=p.id, type="function")
        call["function"] = ({"name": p.name, "arguments": p.arguments} if p.id
                            else {"arguments": p.arguments})
        calls.append(call)
    if calls:
        out["tool_calls"] = calls
    return out
