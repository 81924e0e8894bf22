"""The reasoning parser (server/loraplex/openai_reasoning.py): a choice's <think>...</think>
becomes reasoning_content and the rest the content (read by the tool call parser next),
whole and streamed alike. The HTTP API's side: test_openai_api.py."""

from __future__ import annotations

import pytest

from loraplex.openai_reasoning import ReasoningParser
from loraplex.openai_tools import Reasoning, delta, message, plan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def _run(parser, text: str, size: int | None) -> list:
    chunks = [text] if size is None else [text[i:i + size] for i in range(0, len(text), size)]
    return [p for c in chunks for p in parser.feed(c)] + parser.finish()


def _whole_and_streamed(text: str, tools=None) -> dict:
    """The whole message; each streamed run, its deltas merged, says the same."""
    new = (lambda: ReasoningParser(tools.new_parser())) if tools else (
        lambda: ReasoningParser(None))
    whole = message(_run(new(), text, None), reasoning=True)
    for size in (1, 2, 3, 5, 8):
        pieces = _run(new(), text, size)
        assert all(delta([p]) for p in pieces), pieces  # (no empty piece)
        got = message(pieces, reasoning=True)
        for call in got.get("tool_calls", ()) + whole.get("tool_calls", ()):
            call["id"] = "-"
        assert got == whole, (size, pieces)
    return whole


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nThe user greets.\n</think>\n\nHello!", "\nThe user greets.\n", "Hello!"),
    ("The user greets.\n</think>\n\nHello!", "The user greets.\n", "Hello!"),  # (R1, Qwen3.5)
    ("  <think>a</think>b", "a", "b"),
    ("<think></think>Hi", None, "Hi"),
    ("<think>never done", "never done", ""),  # (cut off while thinking)
    ("<thi", "<thi", ""),
    ("a < b, </thin and </ think> too</think>x", "a < b, </thin and </ think> too", "x"),
    ("", None, ""),
    ("r</think>c</think>d", "r", "c</think>d"),  # (the first tag ends it)
])
def test_think_tags_split_reasoning_from_content(text, reasoning, content):
    assert _whole_and_streamed(text) == {"content": content, "reasoning_content": reasoning}


def test_reasoning_streams_as_it_comes_and_holds_only_a_tag_start():
    parser = ReasoningParser(None)
    assert parser.feed("<th") == [] and parser.feed("ink>Let") == [Reasoning("Let")]
    assert parser.feed(" me think </th") == [Reasoning(" me think ")]
    assert parser.feed("ink>\n") == [] and parser.feed("\nYes") == ["Yes"]
    assert parser.feed(" indeed") == [" indeed"] and parser.finish() == []
    assert parser.finish_reason("stop") == "stop"


def test_the_content_after_thinking_goes_to_the_tool_call_parser():
    tools = plan([WEATHER], None, None, "hermes")
    text = ('<think>I need the weather.</think>\n\nLet me check.\n<tool_call>{"name": '
            '"get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    msg = _whole_and_streamed(text, tools)
    assert msg["reasoning_content"] == "I need the weather."
    assert msg["content"] == "Let me check."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("get_weather", '{"city": "Rome"}')]
    parser = ReasoningParser(tools.new_parser())
    parser.feed(text)
    parser.finish()
    assert parser.finish_reason("stop") == "tool_calls"
    # a call written while thinking is part of the reasoning, not a call
    inside = ('<think><tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
              '</think>ok')
    assert _whole_and_streamed(inside, tools) == {
        "content": "ok", "reasoning_content": inside[7:-10]}


def test_messages_without_reasoning_have_no_such_field():
    assert message(["hi"]) == {"content": "hi"}
    assert delta([Reasoning("a"), "b", Reasoning("c")]) == {"reasoning_content": "ac",
                                                            "content": "b"}


def test_an_xml_call_ends_the_reasoning_without_its_tag():
    """Qwen3.5 may write <tool_call><function=...> while thinking, no </think> first: the
    call is a call; a <tool_call> that opens no function is still reasoning."""
    tools = plan([WEATHER], None, None, "qwen3_coder")
    text = ("<think>I need the weather.\n<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>")
    msg = _whole_and_streamed(text, tools)
    assert msg["reasoning_content"] == "I need the weather.\n" and msg["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("get_weather", '{"city": "Rome"}')]
    mention = "<think>a <tool_call> tag is how I call</think>ok"
    assert _whole_and_streamed(mention, tools) == {
        "content": "ok", "reasoning_content": "a <tool_call> tag is how I call"}
    assert _whole_and_streamed("<think>x <tool_call>\n <func", tools) == {
        "content": "", "reasoning_content": "x <tool_call>\n <func"}
