"""OpenAI tool calling (server/loraplex/openai_tools.py): the checks of tools and
tool_choice, and the parsers that turn a choice's text into content and calls, whole and
streamed. The HTTP API's side: test_openai_api.py."""

from __future__ import annotations

import json

import pytest

from loraplex import openai_tools
from loraplex.engine.byte_regex import compile_tree
from loraplex.engine.json_schema import schema_to_tree
from loraplex.openai_tools import CallDelta, ToolError, delta, message, plan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # (no parameters)


def _run(parser, text: str, size: int | None) -> list:
    """All pieces of `text` fed whole (size None) or `size` characters at a time."""
    chunks = [text] if size is None else [text[i:i + size] for i in range(0, len(text), size)]
    return [p for c in chunks for p in parser.feed(c)] + parser.finish()


def _whole_and_streamed(mode_plan, text: str) -> dict:
    """The whole message; each streamed run, its deltas merged, must say the same."""
    whole = message(_run(mode_plan.new_parser(), text, None))
    for size in (1, 2, 3, 7):
        pieces = _run(mode_plan.new_parser(), text, size)
        assert all(delta([p]) for p in pieces), pieces  # (no empty piece)
        assert _ids_out(message(pieces)) == _ids_out(whole), (size, pieces)
    return whole


def _ids_out(msg: dict) -> dict:
    for call in msg.get("tool_calls", ()):
        assert call["id"].startswith("call_") and len(call["id"]) == 29
    return {**msg, "tool_calls": [{**c, "id": "-"} for c in msg.get("tool_calls", ())]}


# ---------------------------------------------------------------- plan()

def test_plan_defaults_and_modes():
    assert plan(None, None, None, "") is None  # no tools: no plan
    assert plan([], "none", None, "") is None
    auto = plan([WEATHER, TIME], None, None, "hermes")
    assert (auto.mode, auto.parallel, auto.parser) == ("auto", True, "hermes")
    assert auto.guided_json() is None
    assert auto.tools[1] == {"type": "function", "function": {
        "name": "get_time", "description": "", "parameters": openai_tools.NO_PARAMETERS}}
    assert plan([WEATHER], "none", None, "").new_parser() is None
    named = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}},
                 False, "")
    assert named.mode == "named" and named.guided_json() == WEATHER["function"]["parameters"]
    required = plan([WEATHER, TIME], "required", False, "").guided_json()
    assert required["type"] == "array" and (required["minItems"], required["maxItems"]) == (1, 1)
    assert [i["properties"]["name"] for i in required["items"]["anyOf"]] == [
        {"const": "get_weather"}, {"const": "get_time"}]
    assert "maxItems" not in plan([WEATHER], "required", None, "").guided_json()


def test_required_keeps_each_tools_refs_apart():
    """Each tool's $defs move to the root of the array schema, so its $refs still resolve,
    and two tools' defs of one name stay two."""
    def tool(name, unit_enum):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"u": {"$ref": "#/$defs/unit"},
                                             "v": {"$ref": "#/definitions/unit"}},
            "required": ["u", "v"], "$defs": {"unit": {"enum": unit_enum}},
            "definitions": {"unit": {"enum": unit_enum}}}}}

    schema = plan([tool("a", ["m"]), tool("b", ["s"])], "required", None, "").guided_json()
    dfa = compile_tree(schema_to_tree(json.dumps(schema)))

    def allowed(calls):
        return dfa.matches(json.dumps(calls).encode())

    assert allowed([{"name": "a", "parameters": {"u": "m", "v": "m"}}])
    assert allowed([{"name": "b", "parameters": {"u": "s", "v": "s"}},
                    {"name": "a", "parameters": {"u": "m", "v": "m"}}])
    assert not allowed([{"name": "a", "parameters": {"u": "s", "v": "m"}}])  # b's unit
    assert not allowed([{"name": "b", "parameters": {"u": "s", "v": "m"}}])


@pytest.mark.parametrize("tools, choice, param, words", [
    ({"a": 1}, None, "tools", "tools must be an array"),
    ([{"type": "retrieval"}], None, "tools", 'tools[0] must be {"type": "function"'),
    ([{"type": "function", "function": {"name": "a b"}}], None, "tools", "1 to 64 letters"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, "tools", "1 to 64"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools",
     "parameters must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "args": {}}}], None, "tools",
     "unknown fields ['args']"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "tools",
     "description must be a string"),
    ([TIME, TIME], None, "tools", "each function needs its own name"),
    (None, "required", "tool_choice", "tool_choice needs tools"),
    ([WEATHER], "sometimes", "tool_choice", 'got "sometimes"'),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "'nope', which is not in tools ['get_weather']"),
    ([WEATHER], {"type": "function"}, "tool_choice", 'or {"type": "function", "function"'),
    ([WEATHER], None, "tool_choice", "--tool-call-parser hermes"),  # auto, no parser
])
def test_plan_refuses_what_it_cannot_serve(tools, choice, param, words):
    with pytest.raises(ToolError) as info:
        plan(tools, choice, None, "")
    assert words in str(info.value) and info.value.param == param


# ---------------------------------------------------------------- parsers

def test_named_the_text_is_the_arguments():
    named = plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, "")
    msg = _whole_and_streamed(named, '{"city": "Rome"}')
    assert _ids_out(msg) == {"content": None, "tool_calls": [
        {"id": "-", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    parser = named.new_parser()
    assert parser.finish_reason("stop") == "stop"  # (as OpenAI's named tool_choice)
    assert message(_run(named.new_parser(), "", None))["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": ""}  # (max_tokens hit at once: still the call)


def test_required_each_closed_item_is_a_call():
    required = plan([WEATHER, TIME], "required", None, "")
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}},
                       {"name": "get_time", "parameters": {}}])
    msg = _whole_and_streamed(required, text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in msg["tool_calls"]] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert msg["content"] is None
    cut = required.new_parser()  # max_tokens inside the second item
    pieces = cut.feed(text[:-10]) + cut.finish()
    assert [p.name for p in pieces] == ["get_weather"] and cut.finish_reason("length") == "length"
    assert cut.finish_reason("stop") == "tool_calls"


HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
          '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n')


def test_hermes_blocks_are_calls_and_the_rest_is_content():
    auto = plan([WEATHER, TIME], None, None, "hermes")
    msg = _whole_and_streamed(auto, HERMES)
    assert msg["content"] == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    parser = auto.new_parser()
    parser.feed(HERMES)
    assert parser.finish_reason("stop") == "tool_calls"
    assert parser.finish_reason("length") == "length"
    plain = _whole_and_streamed(auto, "No tools needed: 2 < 3 and <b>bold</b>.  ")
    assert plain == {"content": "No tools needed: 2 < 3 and <b>bold</b>.  "}
    assert auto.new_parser().finish_reason("stop") == "stop"  # (no call made)


def test_hermes_keeps_what_is_no_call_as_content():
    auto = plan([WEATHER], None, None, "hermes")
    bad = "a <tool_call>not json</tool_call> b"
    assert _whole_and_streamed(auto, bad) == {"content": bad}
    unclosed = 'ok <tool_call>{"name": "get_weather", "argu'
    assert _whole_and_streamed(auto, unclosed) == {"content": unclosed}
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert _whole_and_streamed(auto, no_name) == {"content": no_name}
    text_args = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": 1}"}</tool_call>'
    call = _whole_and_streamed(auto, text_args)["tool_calls"][0]["function"]
    assert call["arguments"] == '{"city": 1}'  # (arguments already as text: kept so)


def test_hermes_without_parallel_calls_keeps_the_first():
    single = plan([WEATHER, TIME], None, False, "hermes")
    msg = _whole_and_streamed(single, HERMES)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]


def test_a_stream_delta_names_each_call_once():
    pieces = [CallDelta(0, '{"a"', "call_x", "f"), CallDelta(0, ": 1}"), "hi",
              CallDelta(1, "{}", "call_y", "g")]
    assert delta(pieces) == {"content": "hi", "tool_calls": [
        {"index": 0, "id": "call_x", "type": "function",
         "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"index": 1, "id": "call_y", "type": "function", "function": {"name": "g",
                                                                      "arguments": "{}"}}]}
    assert delta([CallDelta(0, "}")]) == {"tool_calls": [{"index": 0,
                                                          "function": {"arguments": "}"}}]}
    assert delta([]) == {}
