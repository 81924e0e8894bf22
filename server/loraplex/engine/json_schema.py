"""A JSON schema as the regular language of the JSON texts it allows (guided_json).

    tree = schema_to_tree('{"type": "object", "properties": {"name": {"type": "string"},'
                          ' "age": {"type": "integer"}}, "required": ["name"]}')
    compile_tree(tree)  # (byte_regex) matches {"name": "Ada", "age": 36} and {"name": "Ada"}

The text is compact JSON with an optional single space after each ':' and ',' (no
newlines: a model cannot pad the output with whitespace forever). Object properties
come in the schema's order, required ones always, the others when the model chooses.
Covered: type (one or a list), enum, const, anyOf / oneOf, $ref into $defs /
definitions (not recursive), string (minLength, maxLength, pattern: less the
characters JSON escapes, format date /
time / date-time / uuid), integer (minimum, maximum, exclusiveMinimum, exclusiveMaximum),
number (no bounds), boolean, null, array (items, minItems, maxItems), object
(properties, required; only the listed properties: "properties": {} allows {} alone).
Anything else that constrains the
text raises InvalidArgument naming it; annotations (title, description, ...) are
ignored. Free-form JSON, which a schema of no type ({}, or annotations only), an object
with no properties and an array with no items allow, nests containers at most
FREE_DEPTH deep, that one counted: JSON with unbounded nesting is not a regular
language.

The result is a byte_regex tree, not a pattern: an object's properties are a "subset"
node and an array's items a "list" node, which the automaton builds with each property
and item once (as a pattern, n optional properties are written n(n+1)/2 times, and
nested objects multiply that).
"""

from __future__ import annotations

import functools
import json
import math

from loraplex.engine.byte_regex import MAX_REPEAT, literal, parse, without_chars
from loraplex.errors import InvalidArgument

MAX_DEPTH = 16  # nested schemas ($refs included)
FREE_DEPTH = 4  # arrays and objects in arrays and objects, in free-form JSON
_QUOTE = literal('"')
_SPACE = ("rep", literal(" "), 0, 1)
_COMMA = ("cat", [literal(","), _SPACE])  # between items and between properties
_JSON_ESCAPED = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # control characters, quote, backslash
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # one JSON string character
_TYPES = {
    "integer": r"-?(?:0|[1-9][0-9]*)",
    "number": r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?",
    "boolean": "(?:true|false)",
    "null": "null",
}
_FORMATS = {
    "date": r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
    "time": r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})?",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
_FORMATS["date-time"] = f"{_FORMATS['date']}T{_FORMATS['time']}"
_STRING = parse(f'"{_CHAR}*"')
_ANNOTATIONS = {"title", "description", "examples", "default", "$schema", "$id", "$comment",
                "$defs", "definitions", "additionalProperties", "deprecated", "readOnly",
                "writeOnly"}
_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_HANDLED = {"type", "enum", "const", "anyOf", "oneOf", "$ref", "properties", "required",
            "items", "minItems", "maxItems", "minLength", "maxLength", "pattern", "format",
            *_NUMERIC_BOUNDS}


def schema_to_tree(schema_text: str):
    """The byte_regex tree of the JSON texts `schema_text` (a JSON schema) allows; raises
    InvalidArgument saying what to fix."""
    try:
        schema = json.loads(schema_text)
    except ValueError as exc:
        raise InvalidArgument(f"guided_json is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("guided_json must be a JSON schema object")
    return _Converter(schema).tree(schema, "#", 0)


class _Converter:
    def __init__(self, root: dict):
        self.root = root

    def error(self, where: str, what: str) -> InvalidArgument:
        return InvalidArgument(f"guided_json: {what} at {where}")

    def tree(self, schema, where: str, depth: int):
        if depth > MAX_DEPTH:
            raise self.error(where, f"schemas nested more than {MAX_DEPTH} deep (a recursive "
                             f"$ref?)")
        if schema is True:
            return _free(FREE_DEPTH)
        if not isinstance(schema, dict):
            raise self.error(where, "a schema that is not an object")
        unknown = set(schema) - _HANDLED - _ANNOTATIONS
        if unknown:
            raise self.error(where, f"unsupported keywords {sorted(unknown)}")
        if "$ref" in schema:
            return self.tree(self.resolve(schema["$ref"], where), schema["$ref"], depth + 1)
        if "const" in schema:
            return _json(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise self.error(where, "enum must be a non-empty list")
            return ("alt", [_json(v) for v in schema["enum"]])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise self.error(where, f"{key} must be a non-empty list")
                return ("alt", [self.tree(s, f"{where}/{key}/{i}", depth + 1)
                                for i, s in enumerate(options)])
        kind = schema.get("type")
        if kind is None:
            kind = ("object" if "properties" in schema else "array" if "items" in schema
                    else "string" if {"pattern", "format", "minLength", "maxLength"} & set(schema)
                    else None)
            if kind is None:
                return _free(FREE_DEPTH)
        if isinstance(kind, list):
            return ("alt", [self.tree({**schema, "type": k}, where, depth + 1) for k in kind])
        bounded = [k for k in _NUMERIC_BOUNDS if k in schema]
        if kind == "integer" and bounded:
            return self.integer(schema, where)
        if kind == "number" and bounded:
            raise self.error(where, f"{bounded[0]} on a number (bounds are supported on "
                             "integers only): use type integer, or a string pattern")
        if kind in _TYPES:
            return _parsed(_TYPES[kind])
        if kind == "string":
            return self.string(schema, where)
        if kind == "array":
            return self.array(schema, where, depth)
        if kind == "object":
            return self.object(schema, where, depth)
        raise self.error(where, f"unknown type {kind!r}")

    def resolve(self, ref, where: str) -> dict:
        for prefix in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(prefix):
                found = self.root.get(prefix[2:-1], {}).get(ref[len(prefix):])
                if found is not None:
                    return found
        raise self.error(where, f"$ref {ref!r} is not one of this schema's $defs")

    def string(self, schema: dict, where: str):
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise self.error(where, "pattern must be a string")
            # (what JSON escapes left out: the text between the quotes is the value as is)
            return ("cat", [_QUOTE, without_chars(parse(pattern), _JSON_ESCAPED), _QUOTE])
        if "format" in schema:
            if schema["format"] not in _FORMATS:
                raise self.error(where, f"string format {schema['format']!r} (supported: "
                                 f"{', '.join(sorted(_FORMATS))})")
            return _parsed(f'"{_FORMATS[schema["format"]]}"')
        lo, hi = _bounds(schema, "minLength", "maxLength", self.error, where)
        return ("cat", [_QUOTE, ("rep", _parsed(_CHAR), lo, hi), _QUOTE])

    def integer(self, schema: dict, where: str):
        lo = hi = None
        for key in _NUMERIC_BOUNDS:
            if key not in schema:
                continue
            value = schema[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    value != value or abs(value) == float("inf"):
                raise self.error(where, f"{key} must be a finite number")
            if key == "minimum":
                bound, is_low = math.ceil(value), True
            elif key == "exclusiveMinimum":
                bound, is_low = math.floor(value) + 1, True
            elif key == "maximum":
                bound, is_low = math.floor(value), False
            else:
                bound, is_low = math.ceil(value) - 1, False
            if is_low:
                lo = bound if lo is None else max(lo, bound)
            else:
                hi = bound if hi is None else min(hi, bound)
        if lo is not None and hi is not None and lo > hi:
            raise self.error(where, "bounds that no integer meets")
        return parse("|".join(integer_range(lo, hi)))

    def array(self, schema: dict, where: str, depth: int):
        item = (self.tree(schema["items"], f"{where}/items", depth + 1) if "items" in schema
                else _free(FREE_DEPTH - 1))
        lo, hi = _bounds(schema, "minItems", "maxItems", self.error, where)
        return ("cat", [literal("["), ("list", item, _COMMA, lo, hi), literal("]")])

    def object(self, schema: dict, where: str, depth: int):
        properties = schema.get("properties")
        required = set(schema.get("required", []))
        if properties is None and not required:
            return _free_object(FREE_DEPTH - 1)
        properties = {} if properties is None else properties
        if not isinstance(properties, dict):
            raise self.error(where, "properties must be an object of schemas")
        if not properties and not required:  # ("properties": {}: a tool with no arguments)
            return ("cat", [literal("{"), _SPACE, literal("}")])
        missing = required - set(properties)
        if missing:
            raise self.error(where, f"required {sorted(missing)} not in properties")
        parts = [(("cat", [_json(name), literal(":"), _SPACE,
                           self.tree(sub, f"{where}/properties/{name}", depth + 1)]),
                  name in required)
                 for name, sub in properties.items()]
        return ("cat", [literal("{"), _SPACE, ("subset", parts, _COMMA), _SPACE, literal("}")])


@functools.cache
def _free(depth: int):
    """Any JSON value with arrays and objects at most `depth` deep."""
    scalar = ("alt", [_STRING, _parsed(_TYPES["number"]), _parsed("true|false|null")])
    if depth == 0:
        return scalar
    array = ("cat", [literal("["), ("list", _free(depth - 1), _COMMA, 0, None), literal("]")])
    return ("alt", [scalar, array, _free_object(depth - 1)])


@functools.cache
def _free_object(depth: int):
    """An object of any properties, its values any JSON `depth` deep."""
    member = ("cat", [_STRING, literal(":"), _SPACE, _free(depth)])
    return ("cat", [literal("{"), _SPACE, ("list", member, _COMMA, 0, None), _SPACE,
                    literal("}")])


def integer_range(lo: int | None, hi: int | None) -> list[str]:
    """Patterns whose union matches the JSON integers in [lo, hi] (None = unbounded):
    no leading zeros, no -0."""
    parts = []
    if hi is None or hi >= 0:  # 0 and up
        parts += _magnitudes(max(lo or 0, 0), hi)
    if lo is None or lo < 0:  # below 0: "-" and a magnitude
        low = 1 if hi is None or hi >= 0 else -hi
        parts += ["-" + p for p in _magnitudes(low, None if lo is None else -lo)]
    return parts


def _magnitudes(a: int, b: int | None) -> list[str]:
    """Patterns of the decimal numbers in [a, b] (b None = unbounded), 0 <= a, a <= b."""
    parts = []
    while b is None or a <= b:
        digits = len(str(a))
        top = 10 ** digits - 1
        if b is None and a == 10 ** (digits - 1) and digits > 1:  # all longer numbers too
            return parts + [f"[1-9][0-9]{{{digits - 1},}}"]
        end = top if b is None else min(b, top)
        parts += _same_width(str(a), str(end))
        a = end + 1
    return parts


def _same_width(lo: str, hi: str) -> list[str]:
    """Patterns of the digit strings from lo to hi, both of the same length."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _same_width(lo[1:], hi[1:])]
    rest = len(lo) - 1
    parts, first, last = [], int(lo[0]), int(hi[0])
    if lo[1:] != "0" * rest:  # lo's first digit only partly
        parts += [lo[0] + p for p in _same_width(lo[1:], "9" * rest)]
        first += 1
    tail = []
    if hi[1:] != "9" * rest:
        tail = [hi[0] + p for p in _same_width("0" * rest, hi[1:])]
        last -= 1
    if first <= last:
        digit = str(first) if first == last else f"[{first}-{last}]"
        parts.append(f"{digit}[0-9]{{{rest}}}")
    return parts + tail


@functools.cache
def _parsed(pattern: str):
    return parse(pattern)


def _json(value):
    """The tree of `value` written as JSON."""
    return literal(json.dumps(value, ensure_ascii=False))


def _bounds(schema: dict, low: str, high: str, error, where: str) -> tuple[int, int | None]:
    lo, hi = schema.get(low, 0), schema.get(high)
    if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int)
                                                                 or hi < lo)):
        raise error(where, f"{low} / {high} must be integers with 0 <= {low} <= {high}")
    if max(lo, hi or 0) > MAX_REPEAT:
        raise error(where, f"{low} / {high} above {MAX_REPEAT}")
    return lo, hi
