"""OpenAI's Responses API (server/loraplex/openai_responses.py): a request as the chat
request it asks for, and the stream's events as they come. Served: test_openai_api.py."""

from __future__ import annotations

import json

import pytest

from loraplex.openai_responses import (Events, ResponsesError, chat_body, conversation,
                                       input_items, output_items, page, response, usage)
from loraplex.openai_store import ResponseStore, owner_of
from loraplex.openai_tools import CallDelta, Reasoning

TOOL = {"type": "function", "name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_a_request_is_the_chat_request_it_asks_for():
    body = {"model": "alpha", "instructions": "be brief", "max_output_tokens": 9,
            "temperature": 0, "top_k": 5, "store": True, "metadata": {"a": "b"},
            "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "x",
                                "schema": {"type": "object"}, "strict": True}},
            "input": [{"role": "developer", "content": "rules"},
                      {"role": "user", "content": [{"type": "input_text", "text": "Paris"},
                                                   {"type": "input_text", "text": "?"}]},
                      {"type": "reasoning", "id": "rs_1", "summary": []},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather",
                       "arguments": '{"city": "Paris"}'},
                      {"type": "function_call", "call_id": "c2", "name": "get_weather",
                       "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                      {"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": "Sunny."}]}]}
    assert chat_body(body) == {
        "model": "alpha", "temperature": 0, "top_k": 5, "max_completion_tokens": 9,
        "messages": [
            {"role": "system", "content": "be brief"}, {"role": "system", "content": "rules"},
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "weather",
            "parameters": TOOL["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object"}, "strict": True}}}
    assert chat_body({"model": "m", "input": "hi", "text": {"format": {"type": "text"}}}) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body, param, words", [
    ({"input": "x", "background": True}, "background", "background"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include", "include"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning", "--reasoning-parser"),
    ({"input": "x", "truncation": "auto"}, "truncation", "disabled"),
    ({"input": []}, "input", "input is required"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input", "text"),
    ({"input": [{"type": "web_search_call"}]}, "input", "not supported"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "function tools"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text", "json_schema"),
])
def test_what_cannot_be_honoured_is_refused(body, param, words):
    with pytest.raises(ResponsesError, match=words) as err:
        chat_body({"model": "m", **body})
    assert err.value.param == param


def test_a_continued_conversation_is_the_stored_one_then_the_input():
    """previous_response_id: the stored response's messages (less its instructions, which
    OpenAI does not carry over; its output's message and calls, less the reasoning) come
    after the new instructions and before the new input."""
    first = {"model": "m", "instructions": "be brief", "input": "Weather in Paris?"}
    chat = chat_body(first)
    output = output_items([Reasoning("hm"), "Checking.", CallDelta(0, '{"city": "Paris"}',
                                                                   "call_1", "get_weather")])
    history = conversation(first, chat, output)
    assert history == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    second = {"model": "m", "instructions": "be kind", "previous_response_id": "resp_1",
              "input": [{"type": "function_call_output", "call_id": "call_1",
                         "output": "sunny"}]}
    assert chat_body(second, tuple(history))["messages"] == [
        {"role": "system", "content": "be kind"}, *history,
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert response(second, chat_body(second, tuple(history)), "resp_2", [], "completed",
                    None, True)["previous_response_id"] == "resp_1"


def test_the_store_keeps_each_callers_responses_within_its_budget():
    def answer(i: int, text: str = "") -> dict:
        return {"id": f"resp_{i}", "output": text}

    one = len(json.dumps(answer(0))) + 2 * len("[]")  # (its JSON, no conversation, no input)
    store = ResponseStore(max_bytes=3 * one)
    alice, bob = owner_of("Bearer a"), owner_of("Bearer b")
    for i in range(3):
        store.put(alice, answer(i), [], [])
    assert len(store) == 3 and store.bytes == 3 * one
    assert store.get(bob, "resp_0") is None  # (another token's: not found)
    assert store.get(alice, "resp_0").response == answer(0)  # (read: now the most recent)
    store.put(bob, answer(3), [], [])  # over the budget: alice's resp_1, least recently used, goes
    assert [store.get(alice, f"resp_{i}") is not None for i in range(3)] == [True, False, True]
    assert store.get(bob, "resp_3").conversation == ()
    assert store.delete(alice, "resp_0") and not store.delete(alice, "resp_0")
    assert store.bytes == 2 * one
    store.put(alice, answer(9, "x" * 10 * one), [{"role": "user", "content": "hi"}], [])
    assert len(store) == 1 and store.get(alice, "resp_9") is not None  # (the newest stays)


def test_input_items_are_the_input_with_ids_and_parts():
    items = input_items([
        {"role": "user", "content": "weather?", "id": "msg_mine"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]}])
    assert [(i["type"], i["id"][:3]) for i in items] == [
        ("message", "msg"), ("function_call", "fc_"), ("function_call_output", "fco"),
        ("message", "msg")]
    assert items[0]["id"] == "msg_mine"  # (the caller's id is kept)
    assert items[0]["content"] == [{"type": "input_text", "text": "weather?"}]
    assert items[3]["content"] == [{"type": "output_text", "text": "Sunny."}]
    assert (items[1]["name"], items[2]["output"]) == ("get_weather", "sunny")
    assert len({i["id"] for i in items}) == 4
    [one] = input_items("hi")
    assert (one["role"], one["content"]) == ("user", [{"type": "input_text", "text": "hi"}])


@pytest.mark.parametrize("query, ids, more", [
    ({}, [5, 4, 3, 2, 1, 0], False),  # (newest first)
    ({"order": "asc", "limit": "4"}, [0, 1, 2, 3], True),
    ({"order": "asc", "limit": "4", "after": "i3"}, [4, 5], False),
    ({"after": "i4", "limit": "2"}, [3, 2], True),
    ({"after": "i4", "before": "i1"}, [3, 2], False),
    ({"order": "asc", "before": "i2"}, [0, 1], False),
    ({"after": "i0"}, [], False),
])
def test_a_page_of_items_follows_openais_cursors(query, ids, more):
    items = [{"id": f"i{k}"} for k in range(6)]
    got = page(items, query)
    assert [int(i["id"][1:]) for i in got["data"]] == ids and got["has_more"] is more
    assert (got["first_id"], got["last_id"]) == ((f"i{ids[0]}", f"i{ids[-1]}") if ids
                                                 else (None, None))


@pytest.mark.parametrize("query, param", [
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"),
    ({"order": "newest"}, "order"), ({"after": "nosuch"}, "after"),
    ({"include": "message.input_image.image_url"}, "include")])
def test_a_bad_page_query_says_which_parameter(query, param):
    with pytest.raises(ResponsesError) as err:
        page([{"id": "i0"}], query)
    assert err.value.param == param and param in str(err.value)


def test_output_items_of_a_whole_answer():
    pieces = [Reasoning("think"), "Let me ", "check.", CallDelta(0, '{"city":', "call_1",
                                                                 "get_weather"),
              CallDelta(0, ' "Rome"}')]
    items = output_items(pieces)
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert items[1]["content"][0]["text"] == "Let me check." and items[1]["role"] == "assistant"
    assert (items[2]["call_id"], items[2]["name"], items[2]["arguments"]) == (
        "call_1", "get_weather", '{"city": "Rome"}')
    assert [i["type"] for i in output_items([CallDelta(0, "{}", "c", "f")])] == [
        "function_call"]  # (no empty message beside a call)
    assert output_items([])[0]["content"][0]["text"] == ""  # (an empty answer: a message)


def test_events_add_each_item_grow_it_and_close_it_before_the_next():
    head = response({"model": "m"}, {}, "resp_1", [], "in_progress", None)
    events = Events(head)
    out = events.start()
    out += events.feed([Reasoning("a"), Reasoning("b"), "x"])
    out += events.feed(["y", CallDelta(0, "{", "c1", "f"), CallDelta(0, "}")])
    out += events.feed([CallDelta(1, "{}", "c2", "g")])
    out += events.finish("completed", usage(3, 4))
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    added = [e for e in out if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1, 2, 3]
    final = out[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 7
    assert [(i["type"], i.get("arguments")) for i in final["output"]] == [
        ("reasoning", None), ("message", None), ("function_call", "{}"),
        ("function_call", "{}")]
    assert final["output"][1]["content"][0]["text"] == "xy"
    assert out[0]["response"]["output"] == [] and out[0]["response"]["status"] == "in_progress"
    cut = Events(head)
    last = (cut.start() + cut.feed(["a"]) + cut.finish("incomplete", usage(1, 1)))[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
