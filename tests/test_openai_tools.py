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
        assert (call["id"].startswith("call_") and len(call["id"]) == 29
                or call["id"].isalnum() and len(call["id"]) == 9), call["id"]  # (mistral)
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
    ([WEATHER], None, "tool_choice", "--tool-call-parser"),  # auto, no parser
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


def test_hermes_streams_arguments_as_they_are_written():
    """Once a block shows {"name": ..., "arguments": {, its call begins (id and name) and
    its arguments follow piece by piece, the model's text as written (spacing, nesting,
    braces and quotes in strings), before the block is closed."""
    auto = plan([WEATHER], None, None, "hermes")
    parser = auto.new_parser()
    assert parser.feed('Sure. <tool_call>\n{"name": "get_weather", "argu') == ["Sure."]
    first = parser.feed('ments": {"city":')
    assert [(p.index, p.name, p.arguments) for p in first] == [(0, "get_weather", ""),
                                                              (0, "", '{"city":')]
    assert first[0].id.startswith("call_")
    assert parser.feed(' "Par') == [CallDelta(0, ' "Par')]
    assert parser.feed('is"}}\n</tool') == [CallDelta(0, 'is"}')]  # (the block's rest: not)
    assert parser.feed('_call> Done.') == ["Done."] and parser.finish() == []
    tricky = ('{"q": "a \\"}\\" b { [", "n": {"x": [1, {"y": "</b>"}]},"s":"<"}')
    text = (f'<tool_call>{{"name": "get_weather", "parameters": {tricky}}}</tool_call>'
            '\n<tool_call>{"name":"get_weather","arguments":{"city":"Rome"} }\n</tool_call>')
    msg = _whole_and_streamed(auto, text)
    assert _calls(msg) == [("get_weather", tricky), ("get_weather", '{"city":"Rome"}')]
    assert json.loads(tricky)["q"] == 'a "}" b { ['
    assert msg["content"] is None


def test_hermes_call_cut_off_keeps_what_was_written():
    """A block cut off (max_tokens) once its call began is that call, its arguments as far
    as they got (finish_reason length: the client knows); one that closes before its
    arguments object does keeps them to there; a second call is dropped without parallel
    calls, streaming or not."""
    auto = plan([WEATHER], None, None, "hermes")
    cut = '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'
    msg = _whole_and_streamed(auto, cut)
    assert _calls(msg) == [("get_weather", '{"city": "Pa')]
    parser = auto.new_parser()
    parser.feed(cut)
    assert parser.finish_reason("length") == "length"
    early = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"</tool_call> x'
    assert _ids_out(_whole_and_streamed(auto, early)) == {
        "content": "x", "tool_calls": [{"id": "-", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome"'}}]}
    single = plan([WEATHER], None, False, "hermes")
    two = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
           '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>ok')
    assert _whole_and_streamed(single, two)["tool_calls"][0]["function"]["arguments"] == (
        '{"city": "Rome"}')
    assert len(_whole_and_streamed(single, two)["tool_calls"]) == 1
    assert _whole_and_streamed(single, two)["content"] == "ok"


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


def _calls(msg: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]


def test_llama3_json_a_text_of_objects_is_calls():
    auto = plan([WEATHER, TIME], None, None, "llama3_json")
    for text in ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 ' \n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'):
        msg = _whole_and_streamed(auto, text)
        assert msg["content"] is None and _calls(msg) == [("get_weather", '{"city": "Paris"}')]
        assert _ids_out(msg)["tool_calls"][0]["id"] == "-"
    two = '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time"}'
    assert _calls(_whole_and_streamed(auto, two)) == [("get_weather", '{"city": "Rome"}'),
                                                      ("get_time", "{}")]
    single = plan([WEATHER, TIME], None, False, "llama3_json")
    assert _calls(_whole_and_streamed(single, two)) == [("get_weather", '{"city": "Rome"}')]
    parser = auto.new_parser()
    parser.feed(two)
    parser.finish()
    assert parser.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("text", [
    "The weather in Paris is mild.",  # (content from the start: streams as it comes)
    '{"name": "get_weather"} and more words',  # not calls alone (read whole)
    '{"city": "Paris"}',  # no name
    "<|python_tag|>print(1)",  # (Llama's code interpreter, not a function call)
    "<|pyth",  # a start of the tag, then the end
    "  ",
])
def test_llama3_json_any_other_text_is_all_content(text):
    auto = plan([WEATHER], None, None, "llama3_json")
    assert _whole_and_streamed(auto, text) == {"content": text}
    parser = auto.new_parser()
    assert parser.feed(text) + parser.finish() == [text]
    assert parser.finish_reason("stop") == "stop"


def test_llama3_json_streams_content_at_once_and_arguments_as_written():
    parser = plan([WEATHER], None, None, "llama3_json").new_parser()
    assert parser.feed(" ") == [] and parser.feed("Hi") == [" Hi"] and parser.feed("!") == ["!"]
    auto = plan([WEATHER, TIME], None, None, "llama3_json")
    parser = auto.new_parser()
    assert parser.feed('<|python_tag|>{"name": "get_weather", ') == []
    first = parser.feed('"parameters": {"city"')
    assert [(p.name, p.arguments) for p in first] == [("get_weather", ""), ("", '{"city"')]
    assert parser.feed(': "Rome"}}; {"name": "get_time"}') == [CallDelta(0, ': "Rome"}')]
    assert [(p.name, p.arguments) for p in parser.finish()] == [("get_time", "{}")]  # (whole)
    for text, calls in (('{"name": "get_weather", "parameters": {"city": "Pa',  # cut off
                         [("get_weather", '{"city": "Pa')]),
                        ('{"name": "get_weather", "parameters": {}} and more words',
                         [("get_weather", "{}")])):  # (after the calls: dropped)
        assert _calls(_whole_and_streamed(auto, text)) == calls


def test_mistral_an_array_of_calls_with_mistral_ids():
    auto = plan([WEATHER, TIME], None, None, "mistral")
    calls = ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
             '{"name": "get_time", "arguments": {}}]')
    for text in (calls, "[TOOL_CALLS]" + calls, "[TOOL_CALLS] " + calls):
        msg = _whole_and_streamed(auto, text)
        assert _calls(msg) == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in msg["tool_calls"])
    for text in ("[1] is a footnote.", "Sure: [x]", "[TOOL_CALLS] nothing", "[TOOL_CAL",
                 "[TOOL_CALLS]", "Look: [TOOL_CALLS][{\"name\": 1}]"):
        assert _whole_and_streamed(auto, text) == {"content": text}


@pytest.mark.parametrize("text, calls", [
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par',  # cut off
     [("get_weather", '{"city": "Par')]),
    ('[{"name": "get_weather", "arguments": {"a": NaN}}]',  # (as written, no tag)
     [("get_weather", '{"a": NaN}')]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": '
     '"get_time"}, {"name": "get_time", "arguments": "{}"}]',  # (the last two read whole)
     [("get_weather", '{"city": "Rome"}'), ("get_time", "{}"), ("get_time", "{}")]),
    ('[TOOL_CALLS] {"name": "get_time", "arguments": {}} and then',  # (after: dropped)
     [("get_time", "{}")]),
])
def test_mistral_an_array_call_begun_stands_with_its_arguments_as_written(text, calls):
    auto = plan([WEATHER, TIME], None, None, "mistral")
    msg = _whole_and_streamed(auto, text)
    assert msg["content"] is None and _calls(msg) == calls
    single = plan([WEATHER, TIME], None, False, "mistral")
    assert _calls(_whole_and_streamed(single, text)) == calls[:1]


def test_mistral_an_arrays_arguments_stream_as_written():
    parser = plan([WEATHER, TIME], None, None, "mistral").new_parser()
    assert parser.feed('[TOOL_CALLS][{"name": "get_weather", "argu') == []
    first = parser.feed('ments": {"city": ')
    assert [(c.index, c.name, c.arguments) for c in first] == [
        (0, "get_weather", ""), (0, "", '{"city": ')]
    more = parser.feed('"Rome"}}, {"name": "get_time", "arguments": {')
    assert [(c.index, c.name, c.arguments) for c in more] == [
        (0, "", '"Rome"}'), (1, "get_time", ""), (1, "", "{")]
    assert parser.feed("}}]") == [CallDelta(1, "}")] and parser.finish() == []
    assert parser.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',  # v11
    '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}'  # v13
    '[TOOL_CALLS]get_time[CALL_ID]Z9y8X7w6v[ARGS]{}',
    '[TOOL_CALLS]get_weather{"city":"Paris"} [TOOL_CALLS] get_time {}\n',  # (no [ARGS])
])
def test_mistral_v11_calls_name_then_arguments_after_each_tag(text):
    auto = plan([WEATHER, TIME], None, None, "mistral")
    msg = _whole_and_streamed(auto, text)
    assert msg["content"] is None and _calls(msg) == [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in msg["tool_calls"])
    assert "a1B2c3D4e" not in {c["id"] for c in msg["tool_calls"]}  # (a fresh id each)
    single = plan([WEATHER, TIME], None, False, "mistral")
    assert [n for n, _ in _calls(_whole_and_streamed(single, text))] == ["get_weather"]


def test_parsers_that_read_special_tags_keep_special_tokens():
    assert [plan([WEATHER], None, None, p).keeps_special_tokens()
            for p in ("hermes", "mistral", "llama3_json", "pythonic")] == [True, True, False,
                                                                          False]
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert not plan([WEATHER], named, None, "mistral").keeps_special_tokens()
    assert not plan([WEATHER], "none", None, "hermes").keeps_special_tokens()


def test_mistral_content_streams_before_the_tag():
    auto = plan([WEATHER], None, None, "mistral")
    text = 'Let me check.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'
    msg = _whole_and_streamed(auto, text)
    assert msg["content"] == "Let me check." and _calls(msg) == [
        ("get_weather", '{"city": "Rome"}')]
    parser = auto.new_parser()
    assert parser.feed("Let me") == ["Let me"] and parser.feed(" check. [TOOL") == [" check."]
    assert parser.feed("_CALLS]get_weather") == []
    first = parser.feed('[ARGS]{"city": ')  # (the v11 form: the call begins, then streams)
    assert [(c.name, c.arguments) for c in first] == [("get_weather", ""), ("", '{"city": ')]
    assert parser.feed('"Rome"}') == [CallDelta(0, '"Rome"}')] and parser.finish() == []
    assert parser.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS]get_weather[ARGS]["Paris"]',  # arguments no object
    '[TOOL_CALLS]get weather[ARGS]{}',  # no name
    '[TOOL_CALLS]get_weather{"a": NaN}',  # no JSON (and no [ARGS]: read whole)
])
def test_mistral_v11_text_that_is_not_calls_whole_is_content(text):
    auto = plan([WEATHER, TIME], None, None, "mistral")
    assert _whole_and_streamed(auto, text) == {"content": text}
    parser = auto.new_parser()
    parser.feed(text)
    parser.finish()
    assert parser.finish_reason("stop") == "stop"


@pytest.mark.parametrize("text, calls", [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', [("get_weather", '{"city": "Par')]),  # cut
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} and then',  # (after the object: dropped)
     [("get_weather", '{"city": "Paris"}')]),
    ('[TOOL_CALLS]get_weather[ARGS]{"a": NaN}', [("get_weather", '{"a": NaN}')]),  # as written
    ('[TOOL_CALLS]get_weather[ARGS]{}[TOOL_CALLS]', [("get_weather", "{}")]),  # a tag, no call
    ('Hi [TOOL_CALLS]get_weather[ARGS]{} [TOOL_CALLS]get_time[ARGS]', [("get_weather", "{}")]),
])
def test_mistral_v11_a_call_begun_stands_with_its_arguments_as_written(text, calls):
    """From f[ARGS]{ on, the text is calls (their arguments the model's text, as
    hermes's): what follows a call's object up to the next tag, or a last tag that
    begins no call, is dropped."""
    auto = plan([WEATHER, TIME], None, None, "mistral")
    msg = _whole_and_streamed(auto, text)
    assert _calls(msg) == calls and msg["content"] == ("Hi" if text.startswith("Hi") else None)
    parser = auto.new_parser()
    parser.feed(text)
    parser.finish()
    assert parser.finish_reason("stop") == "tool_calls"


def test_pythonic_a_list_of_calls_is_calls():
    auto = plan([WEATHER, TIME], None, None, "pythonic")
    text = '[get_weather(city="Paris", days=2, hourly=True, hours=[1, 2]), get_time()]'
    msg = _whole_and_streamed(auto, text)
    assert msg["content"] is None and _calls(msg) == [
        ("get_weather", '{"city": "Paris", "days": 2, "hourly": true, "hours": [1, 2]}'),
        ("get_time", "{}")]
    single = plan([WEATHER, TIME], None, False, "pythonic")
    assert [n for n, _ in _calls(_whole_and_streamed(single, text))] == ["get_weather"]
    for content in ("Paris is sunny.", "[1, 2]", "[]", "[get_weather(city=x)]",  # (no literal)
                    "[get_weather('Paris')]", "[get_weather(**a)]", "[os.system(c='ls')]",
                    "[f(a=1e999)]", "[f(a={1, 2})]", "[f(a=1", "[get_time(", "[f(a=1]",
                    '[f(a="x\n")]'):
        assert _whole_and_streamed(auto, content) == {"content": content}, content


@pytest.mark.parametrize("text, calls", [
    ('[get_weather(city="Paris", days=', [("get_weather", '{"city": "Paris"')]),  # cut off
    ("[get_time()] and then", [("get_time", "{}")]),  # (after the list: dropped)
    ('[get_weather(city="Rome", days=x)]',  # (after the first: a non-literal as written)
     [("get_weather", '{"city": "Rome", "days": "x"}')]),
    ('[get_weather(city="Rome", 2)]', [("get_weather", '{"city": "Rome"')]),  # (ends there)
    ("[get_time(), os.system(c='ls')]", [("get_time", "{}")]),
    ('[get_weather(city="a, b) \\" \'c\'", note=\'\'\'x"\'y\'\'\', at=(1, [2]),)]',
     [("get_weather", '{"city": "a, b) \\" \'c\'", "note": "x\\"\'y", "at": [1, [2]]}')]),
])
def test_pythonic_a_call_begun_stands_with_its_arguments_as_read(text, calls):
    auto = plan([WEATHER, TIME], None, None, "pythonic")
    msg = _whole_and_streamed(auto, text)
    assert msg["content"] is None and _calls(msg) == calls


def test_pythonic_arguments_stream_one_by_one():
    parser = plan([WEATHER, TIME], None, None, "pythonic").new_parser()
    assert parser.feed('[get_weather(city="Par') == []  # (not yet known to be calls)
    first = parser.feed('is", days=')
    assert [(c.index, c.name, c.arguments) for c in first] == [
        (0, "get_weather", ""), (0, "", '{"city": "Paris"')]
    more = parser.feed("2), get_time(")
    assert [(c.index, c.name, c.arguments) for c in more] == [
        (0, "", ', "days": 2'), (0, "", "}"), (1, "get_time", "")]
    assert parser.feed(")]") == [CallDelta(1, "{}")] and parser.finish() == []
    assert parser.finish_reason("stop") == "tool_calls"


QWEN_TOOL = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "nights": {"type": "integer"},
                                     "rate": {"type": "number"}, "late": {"type": "boolean"},
                                     "guests": {"type": "array"}, "note": {},
                                     "zip": {"type": ["string", "null"]}}}}}


def test_qwen3_coder_reads_xml_calls_typed_by_the_schema():
    auto = plan([QWEN_TOOL, TIME], None, None, "qwen3_coder")
    text = ("I will book it.\n<tool_call>\n<function=book>\n<parameter=city>\nNew York\n"
            "</parameter>\n<parameter=nights>\n3\n</parameter>\n<parameter=rate>\n99.5\n"
            "</parameter>\n<parameter=late>\ntrue\n</parameter>\n<parameter=guests>\n"
            '["ann", "bo"]\n</parameter>\n<parameter=note>\n42\n</parameter>\n'
            "<parameter=zip>\n02134\n</parameter>\n</function>\n</tool_call>\n"
            "<tool_call>\n<function=get_time>\n</function>\n</tool_call>")
    msg = _whole_and_streamed(auto, text)
    assert msg["content"] == "I will book it."
    assert [(n, json.loads(a)) for n, a in _calls(msg)] == [
        ("book", {"city": "New York", "nights": 3, "rate": 99.5, "late": True,
                  "guests": ["ann", "bo"], "note": "42", "zip": "02134"}),
        ("get_time", {})]
    typo = text.replace("\n3\n", "\nthree\n")  # (not JSON: kept as the text it is)
    assert json.loads(_calls(_whole_and_streamed(auto, typo))[0][1])["nights"] == "three"
    content = "<tool_call>{\"name\": \"book\", \"arguments\": {}}</tool_call>"
    assert _whole_and_streamed(auto, content) == {"content": content}  # (JSON: not its form)
    stray = "<tool_call>\n<function=book>\nstray\n</function>\n</tool_call> ok"
    assert _calls(_whole_and_streamed(auto, stray)) == [("book", "{}")]  # (text between: dropped)
    assert _whole_and_streamed(auto, stray)["content"] == "ok"


def test_qwen3_coder_streams_string_values_and_sends_typed_ones_at_their_end():
    """A call begins at <function=...>; a string's value streams as written (JSON-escaped,
    the newlines next to its tags held back until known), a typed one is sent when its
    parameter ends; a call cut off keeps what was written, one whose block closes first
    is closed."""
    auto = plan([QWEN_TOOL], None, None, "qwen3_coder")
    parser = auto.new_parser()
    assert parser.feed("Booking.\n<tool_call>\n<function=bo") == ["Booking."]
    first = parser.feed("ok>\n<parameter=city>\nNew")
    assert [(p.name, p.arguments) for p in first] == [("book", ""), ("", '{"city": "New')]
    assert parser.feed(' "York"\n') == [CallDelta(0, ' \\"York\\"')]  # (its newline: held)
    assert parser.feed("\n</param") == [CallDelta(0, "\\n")]  # (now known to be the value's)
    assert parser.feed("eter>\n<parameter=nights>\n3") == [CallDelta(0, '", "nights": ')]
    assert parser.feed("\n</parameter>\n</function>") == [CallDelta(0, "3}")]
    assert parser.feed("\n</tool_call>") == [] and parser.finish() == []
    cut = "<tool_call>\n<function=book>\n<parameter=city>\nRome"
    assert _calls(_whole_and_streamed(auto, cut)) == [("book", '{"city": "Rome')]
    closed = "<tool_call>\n<function=book>\n<parameter=nights>\n2\n</tool_call>"
    assert _calls(_whole_and_streamed(auto, closed)) == [("book", '{"nights": 2}')]


def test_pythonic_reads_hyphenated_tool_names():
    """MCP-style names (get-weather) that Python cannot spell: a call of one is read when
    the tool has that name; inside a string, or spelled with spaces, it is no name."""
    hyphen = {"type": "function", "function": {"name": "get-weather"}}
    auto = plan([hyphen, TIME], None, None, "pythonic")
    text = '[get-weather(city="get-weather(x)", days=2), get_time()]'
    assert _calls(_whole_and_streamed(auto, text)) == [
        ("get-weather", '{"city": "get-weather(x)", "days": 2}'), ("get_time", "{}")]
    for content in ("[get - weather(city=1)]", "[get-weather(city=1]", "[other-tool(a=1)]"):
        assert _whole_and_streamed(auto, content) == {"content": content}, content


def test_json_parsers_refuse_what_is_not_json():
    for parser, text in (("hermes", '<tool_call>{"arguments": {"a": NaN}, "name": "f"}'
                                    '</tool_call>'),
                         ("llama3_json", '{"parameters": {"a": Infinity}, "name": "f"}'),
                         ("hermes", '<tool_call>{"name": "\\x", "arguments": {}}</tool_call>'),
                         ("llama3_json", '{"name": "f\\q", "parameters": {}}'),  # (no escape)
                         ("mistral", '[{"name": "\\x", "arguments": {}}]')):
        assert _whole_and_streamed(plan([WEATHER], None, None, parser), text) == {
            "content": text}


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


_FRAGMENTS = ['[', ']', '(', ')', '{', '}', ',', ' ', '\n', '"', "'", "'''", '\\', '=', ';',
              'x', '1', '<tool_call>', '</tool_call>', '[TOOL_CALLS]', '[ARGS]', 'get_time',
              '"name": ', '"arguments": ', '</parameter>', '</function>']
_CALLS = {
    "hermes": 'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
              '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                   '{"name": "get_time", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
               '{"name": "get_time", "arguments": {}}][TOOL_CALLS]get_time[ARGS]{}',
    "pythonic": "[get_weather(city=\"Paris\", days=2, at=(1, [2]), note='''a\"b'''), "
                "get_time()]",
    "qwen3_coder": 'Hi <tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n'
                   '</parameter>\n</function>\n</tool_call>',
}


@pytest.mark.parametrize("parser", sorted(_CALLS))
def test_broken_calls_stream_as_they_read_whole(parser):
    """Each format's calls, cut and spliced at random (pieces of the formats put in,
    spans taken out): a parser never fails on one, and fed 1, 2, 3 or 7 characters at a
    time it says what it says fed whole."""
    import random

    rng = random.Random(7)
    auto = plan([WEATHER, TIME], None, None, parser)
    with_calls = 0
    for _ in range(200):
        text = _CALLS[parser]
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(text) + 1)
            if rng.random() < 0.5:
                text = text[:at] + rng.choice(_FRAGMENTS) + text[at:]
            else:
                text = text[:at] + text[at + rng.randrange(1, 8):]
        with_calls += bool(_whole_and_streamed(auto, text).get("tool_calls"))
    assert with_calls > 50  # (most stay calls: the mutations are small)
