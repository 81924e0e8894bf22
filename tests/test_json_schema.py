"""JSON schemas as regular expressions (engine.json_schema, guided_json).

Documents the schema allows must match, in json.dumps' spacing and compact, and those
it does not allow must not; served with sampling, every output parses and is allowed.
"""

import json
import re

import pytest

from engine_helpers import build_engine, run_all
from loraplex.engine.byte_regex import DEAD, compile_tree, to_pattern
from loraplex.engine.json_schema import schema_to_tree
from loraplex.engine.request import FinishReason, GenerationRequest, SamplingParams
from loraplex.errors import InvalidArgument
from models import make_prompts

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"], "format": "uuid"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "ç"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "ok"],
}
CASES = {
    "person": (PERSON, [
        ({"name": "Ada", "ok": True}, True),
        ({"name": "Ada", "age": -3, "ok": False}, True),
        ({"name": "Ada", "age": 7, "tags": ["ç", "a"], "ok": True}, True),
        ({"name": "Ada", "email": None, "ok": True}, True),
        ({"name": "Ada", "email": "123e4567-e89b-12d3-a456-426614174000", "ok": True}, True),
        ({"name": "Ada \"q\"", "ok": True}, True),
        ({"name": "", "ok": True}, False),  # minLength
        ({"name": "Adalovelace", "ok": True}, False),  # maxLength
        ({"name": "Ada"}, False),  # ok is required
        ({"ok": True, "name": "Ada"}, False),  # properties in the schema's order
        ({"name": "Ada", "age": 1.5, "ok": True}, False),
        ({"name": "Ada", "tags": ["a", "b", "a"], "ok": True}, False),  # maxItems
        ({"name": "Ada", "tags": ["c"], "ok": True}, False),
        ({"name": "Ada", "email": "x", "ok": True}, False),
    ]),
    "refs and unions": ({
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                             "y": {"type": "number"}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"at": {"$ref": "#/$defs/point"},
                       "kind": {"anyOf": [{"const": "dot"}, {"type": "integer"}]},
                       "when": {"type": "string", "format": "date-time"},
                       "path": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                "minItems": 1}},
        "required": ["at"],
    }, [
        ({"at": {"x": 1, "y": -2.5e3}}, True),
        ({"at": {"x": 0, "y": 0}, "kind": "dot"}, True),
        ({"at": {"x": 0, "y": 0}, "kind": 12}, True),
        ({"at": {"x": 0, "y": 0}, "when": "2026-12-03T14:05:00Z"}, True),
        ({"at": {"x": 0, "y": 0}, "path": [{"x": 1, "y": 2}, {"x": 3, "y": 4}]}, True),
        ({"at": {"x": 0}}, False),
        ({"at": {"x": 0, "y": 0}, "kind": "line"}, False),
        ({"at": {"x": 0, "y": 0}, "path": []}, False),
        ({"at": {"x": 0, "y": 0}, "when": "2026-13-03T14:05:00Z"}, False),
        ({"at": {"x": 0, "y": 0}, "kind": 1.5}, False),
    ]),
    "all optional": ({"type": "object", "properties": {"a": {"type": "null"},
                                                       "b": {"type": "string",
                                                             "pattern": "^[0-9]{3}$"}}}, [
        ({}, True), ({"a": None}, True), ({"b": "123"}, True), ({"a": None, "b": "007"}, True),
        ({"b": "12"}, False), ({"b": "1234"}, False), ({"b": 123}, False),
    ]),
    "no properties (a tool with no arguments)": ({"type": "object", "properties": {}}, [
        ({}, True), ({"a": 1}, False), ([], False), (None, False),
    ]),
    "top-level array": ({"type": "array", "items": {"type": "integer"}, "minItems": 2,
                         "maxItems": 3}, [
        ([1, 2], True), ([1, 2, 3], True), ([1], False), ([1, 2, 3, 4], False), ([], False),
    ]),
    # free-form JSON: containers nested FREE_DEPTH (4) deep, the free-form one counted
    "free-form object (json_object)": ({"type": "object"}, [
        ({}, True), ({"a": 1, "b": [None, "x\"y", {"c": True, "d": -2.5e3}]}, True),
        ({"a": {"b": {"c": {"d": "é"}}}}, True), ({"": []}, True),
        ({"a": {"b": {"c": {"d": []}}}}, False), ([], False), ("x", False), (None, False),
    ]),
    "any value (no type)": ({"description": "anything"}, [
        (3, True), ("s", True), (None, True), (False, True), ([[[[1]]]], True),
        ({"a": [{}]}, True), ([[[[[1]]]]], False),
    ]),
    "free-form array with bounds": ({"type": "array", "maxItems": 2}, [
        ([], True), ([1, {"a": "b"}], True), ([[[[0]]]], True), ([1, 2, 3], False),
        ([[[[[0]]]]], False), ({}, False),
    ]),
    "free-form value inside a schema": ({"type": "object", "properties": {
        "id": {"type": "integer"}, "meta": {"type": "object"}}, "required": ["id"]}, [
        ({"id": 1}, True), ({"id": 1, "meta": {"k": {"k": {"k": {"k": 0}}}}}, True),
        ({"id": 1, "meta": {"k": {"k": {"k": {"k": {}}}}}}, False),
        ({"id": 1, "other": 2}, False), ({"meta": {}}, False),
    ]),
}


def _pattern(schema_text: str) -> str:
    """The schema's language as a pattern in Python's syntax (for re)."""
    return to_pattern(schema_to_tree(schema_text))


@pytest.mark.parametrize("case", list(CASES))
def test_schema_regex_matches_exactly_the_allowed_documents(case):
    schema, docs = CASES[case]
    dfa = compile_tree(schema_to_tree(json.dumps(schema)))
    for doc, allowed in docs:
        for text in (json.dumps(doc, ensure_ascii=False),
                     json.dumps(doc, ensure_ascii=False, separators=(",", ":"))):
            assert dfa.matches(text.encode()) == allowed, (case, text)


@pytest.mark.parametrize("schema,says", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON schema object"),
    ('{"type": "object", "required": ["a"]}', "required ['a'] not in properties"),
    ('{"type": "object", "properties": [1]}', "properties must be an object of schemas"),
    ('{"type": "number", "minimum": 3}', "minimum on a number"),
    ('{"type": "integer", "minimum": 3, "exclusiveMaximum": 3.0, "maximum": 9}',
     "bounds that no integer meets"),
    ('{"type": "integer", "maximum": "9"}', "maximum must be a finite number"),
    ('{"type": "integer", "minimum": true}', "minimum must be a finite number"),
    ('{"type": "integer", "multipleOf": 2}', "unsupported keywords ['multipleOf']"),
    ('{"type": "string", "format": "email"}', "string format 'email'"),
    ('{"$ref": "#/$defs/nope"}', "not one of this schema's $defs"),
    ('{"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},'
     ' "$ref": "#/$defs/n"}', "nested more than 16 deep"),
    ('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}',
     "required ['b'] not in properties"),
    ('{"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 2}',
     "minItems / maxItems"),
    ('{"type": "date"}', "unknown type 'date'"),
])
def test_schemas_that_cannot_be_used_say_why(schema, says):
    with pytest.raises(InvalidArgument, match=re.escape(says)):
        schema_to_tree(schema)


def test_sampled_guided_json_parses_and_is_allowed(tiny_models, adapters):
    """Sampled at temperature 1 from a random model, every output is a document of the
    schema (the model would rather write noise)."""
    schema = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": -20, "exclusiveMaximum": 300},
        "label": {"enum": ["cat", "dog"]},
        "score": {"type": "number"}, "note": {"type": "string", "maxLength": 6}},
        "required": ["id", "label"]}
    arch = "llama"
    names = sorted(adapters[arch])[:3]
    prompts = make_prompts(6, min_len=4, max_len=20, seed=31)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=96, temperature=1.0,
                                                    seed=i, guided_json=json.dumps(schema)),
                                  adapter=names[i % 3] if i % 4 else "")
                for i, p in enumerate(prompts)]
    engine = build_engine(tiny_models[arch], adapters[arch][names[0]].parent)
    try:
        outs = run_all(engine, requests)
    finally:
        engine.stop()
    finished = 0
    for out in outs:
        if out.finish_reason is FinishReason.LENGTH:  # (a long number may run out of tokens)
            continue
        finished += 1
        doc = json.loads(out.text)
        assert isinstance(doc["id"], int) and -20 <= doc["id"] < 300
        assert doc["label"] in ("cat", "dog")
        assert set(doc) <= set(schema["properties"])
        assert isinstance(doc.get("score", 0.0), (int, float))
        assert len(doc.get("note", "")) <= 6
    assert finished >= 3


def test_sampled_free_form_json_parses(tiny_models, adapters):
    """response_format json_object's schema, sampled: each output that ends is an object
    (and one that runs out of tokens is a start of one)."""
    arch = "qwen2"
    name = sorted(adapters[arch])[0]
    prompts = make_prompts(6, min_len=4, max_len=20, seed=37)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=64, temperature=1.0, seed=i,
                                                    guided_json='{"type": "object"}'),
                                  adapter=name if i % 2 else "")
                for i, p in enumerate(prompts)]
    engine = build_engine(tiny_models[arch], adapters[arch][name].parent)
    try:
        outs = run_all(engine, requests)
    finally:
        engine.stop()
    dfa = compile_tree(schema_to_tree('{"type": "object"}'))
    for out in outs:
        assert out.text.startswith("{") and dfa.walk(dfa.start, out.text.encode()) != DEAD
        if out.finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(out.text), dict)
    assert {o.finish_reason for o in outs} == {FinishReason.STOP, FinishReason.LENGTH}


def _allows(schema, doc) -> bool:
    dfa = compile_tree(schema_to_tree(json.dumps(schema)))
    return dfa.matches(json.dumps(doc, ensure_ascii=False).encode())


def test_edges_of_values_refs_and_bounds():
    """Cases the documents above can miss (each once seen to slip through a mutant)."""
    assert _allows({"type": "array", "items": {"type": "integer"}, "maxItems": 0}, [])
    assert not _allows({"type": "array", "items": {"type": "integer"}, "maxItems": 0}, [1])
    enum = {"enum": ["a.b", "x*"]}  # regex characters in values are literal
    assert _allows(enum, "a.b") and _allows(enum, "x*")
    assert not _allows(enum, "axb") and not _allows(enum, "xxx")
    assert _allows({"const": "café"}, "café")
    # a pattern that allows what JSON escapes: those characters are left out of it, so
    # the text between the quotes is always the value as it is
    quoted = {"type": "string", "pattern": '^[a-z"\\\\\n]{1,4}$'}
    assert _allows(quoted, "ab") and not _allows(quoted, 'a"') and not _allows(quoted, "a\n")
    assert not compile_tree(schema_to_tree(json.dumps(quoted))).matches(b'"a"b"')
    assert _allows({"type": "string"}, "\x01")  # written "\u0001"
    assert not compile_tree(schema_to_tree('{"type": "string"}')).matches(b'"\x1f"')
    assert _allows({"type": "number"}, 1e-05)
    assert _allows({"type": "string", "minLength": 2, "maxLength": 2}, "ab")
    assert _allows({"properties": {"a": {"type": "null"}}}, {"a": None})  # object inferred
    assert _allows({"definitions": {"p": {"type": "integer"}}, "type": "object",
                    "properties": {"x": {"$ref": "#/definitions/p"}}, "required": ["x"]},
                   {"x": 3})
    deep = {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
    assert _allows(deep, [[1, 2], [], [3]])


@pytest.mark.parametrize("lo,hi", [
    (0, None), (None, 0), (1, None), (10, None), (99, None), (100, None),
    (-5, 5), (-1200, -3), (7, 7), (0, 0), (-100, None), (None, -10), (None, -1), (13, 987),
    (100, 1000), (-999, -100), (5, 99_999), (-1_000_000, 1_000_000)])
def test_integer_bounds_match_exactly_the_integers_between(lo, hi):
    """Against the bounds themselves, over -1200..1200 and around every power of ten up to
    10^7; never a leading zero or -0. Through the serving automaton for the cases with an
    upper bound (the others: Python's re, the pattern being Python syntax)."""
    schema = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    tree = schema_to_tree(json.dumps(schema))
    pattern, automaton = to_pattern(tree), compile_tree(tree)
    values = list(range(-1200, 1200)) + [s * 10 ** k + d for s in (1, -1) for k in range(1, 8)
                                          for d in (-1, 0, 1)]
    for x in values:
        inside = (lo is None or x >= lo) and (hi is None or x <= hi)
        assert (re.fullmatch(pattern, str(x)) is not None) == inside, (x, pattern)
        assert automaton.matches(str(x).encode()) == inside, (x, pattern)
    for text in ("-0", "01", "00", "-01", "007", "", "-", "+1", "1.0"):
        assert not re.fullmatch(pattern, text) and not automaton.matches(text.encode()), text


def test_exclusive_and_fractional_integer_bounds():
    """exclusiveMinimum / exclusiveMaximum leave the bound out; fractional bounds round
    inwards; several bounds meet in the narrowest."""
    def allowed(**bounds):
        pattern = _pattern(json.dumps({"type": "integer", **bounds}))
        return [x for x in range(-30, 30) if re.fullmatch(pattern, str(x))]
    assert allowed(exclusiveMinimum=3, exclusiveMaximum=7) == [4, 5, 6]
    assert allowed(minimum=2.5, maximum=5.5) == [3, 4, 5]
    assert allowed(exclusiveMinimum=2.5, exclusiveMaximum=5.5) == [3, 4, 5]
    assert allowed(minimum=-3, exclusiveMinimum=0, maximum=9, exclusiveMaximum=4) == [1, 2, 3]
    assert allowed(minimum=-2.0, maximum=-2.0) == [-2]


@pytest.mark.parametrize("schema", ['{"type": "integer", "minimum": NaN}',
                                    '{"type": "integer", "exclusiveMaximum": -Infinity}'])
def test_non_finite_bounds_are_invalid_argument(schema):
    with pytest.raises(InvalidArgument, match="must be a finite number"):
        schema_to_tree(schema)


def test_a_pattern_loses_control_characters():
    pattern = _pattern(json.dumps({"type": "string", "pattern": "[\\x00-\\x7f]*"}))
    assert re.fullmatch(pattern, '"a b"')
    for text in ('"a\tb"', '"a\nb"', '"\x00"', '"\x1f"'):
        assert not re.fullmatch(pattern, text), repr(text)


def _object(n: int, value: dict, required=()) -> dict:
    return {"type": "object", "properties": {f"p{i}": value for i in range(n)},
            "required": list(required)}


@pytest.mark.parametrize("required", [(), ("p0",), ("p2",), ("p1", "p3"), ("p0", "p1", "p2",
                                                                           "p3")])
def test_object_properties_are_any_ordered_subset_holding_the_required(required):
    """The automaton (each property built once) against Python's re on the pattern (each
    written once per way it can come first), over every subset of the properties in
    order, out of order and repeated."""
    schema = _object(4, {"type": "integer", "minimum": 0, "maximum": 9}, required)
    tree = schema_to_tree(json.dumps(schema))
    automaton, pattern = compile_tree(tree), re.compile(to_pattern(tree))
    names = [f"p{i}" for i in range(4)]
    docs = [[names[i] for i in range(4) if mask >> i & 1] for mask in range(16)]
    docs += [["p1", "p0"], ["p3", "p2", "p1", "p0"], ["p0", "p0"], ["p2", "p2", "p3"]]
    allowed = 0
    for keys in docs:
        for sep in (", ", ","):
            text = "{" + sep.join(f'"{k}": 5' for k in keys) + "}"
            want = keys == sorted(set(keys)) and set(required) <= set(keys)
            allowed += want
            assert (pattern.fullmatch(text) is not None) == want, text
            assert automaton.matches(text.encode()) == want, text
    assert not automaton.matches(b"{,}") and not automaton.matches(b'{"p0": 5,}')
    assert allowed == 2 * 2 ** (4 - len(required))


@pytest.mark.parametrize("lo,hi", [(0, None), (1, None), (3, None), (0, 1), (2, 4), (0, 0),
                                   (3, 3)])
def test_array_items_are_between_min_and_max(lo, hi):
    schema = {"type": "array", "items": {"enum": ["a", "bc"]}, "minItems": lo}
    if hi is not None:
        schema["maxItems"] = hi
    tree = schema_to_tree(json.dumps(schema))
    automaton, pattern = compile_tree(tree), re.compile(to_pattern(tree))
    for count in range(7):
        for sep in (", ", ","):
            text = "[" + sep.join('"bc"' if k % 2 else '"a"' for k in range(count)) + "]"
            want = lo <= count and (hi is None or count <= hi)
            assert (pattern.fullmatch(text) is not None) == want, text
            assert automaton.matches(text.encode()) == want, text
    assert not automaton.matches(b'["a",]') and not automaton.matches(b'[,"a"]')


def test_the_automaton_grows_linearly_with_optional_properties():
    """As a pattern, n optional properties are written n(n+1)/2 times, and 60 of them (or
    objects of 10 in an object of 10) passed the automaton's state limit; built from the
    tree, each property is built once."""
    def states(schema) -> int:
        return len(compile_tree(schema_to_tree(json.dumps(schema)))._nfa.eps)
    string = {"type": "string"}
    assert states(_object(60, string)) <= 2.05 * states(_object(30, string))
    nested = _object(10, _object(10, string))
    assert states(nested) <= 11 * states(_object(10, string))
    doc = {"p3": {"p0": "x", "p9": "y"}, "p7": {}}
    assert compile_tree(schema_to_tree(json.dumps(nested))).matches(json.dumps(doc).encode())
    deep = {"type": "integer"}
    for _ in range(16):  # exactly the depth limit; each level builds its items once
        deep = {"type": "array", "items": deep}
    assert states(deep) < 16 * states({"type": "array", "items": {"type": "integer"}})
