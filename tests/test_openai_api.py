"""The OpenAI-compatible HTTP API (serve --http-port), called with OpenAI's own Python
client against real servers, its answers checked against the gRPC API's for the same
requests. Fixtures: conftest_api.py."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.error
import urllib.request

import openai
import pytest

from conftest_api import (ADMIN_TOKEN, GENERATE_TOKEN, Gateway, RunningServer,  # noqa: F401
                          assets, free_port, make_config, make_tls_cert)
from loraplex_client import Client
from models import BOS_ID

PROMPT = "Hello, world"
LONG = {"max_tokens": 16000, "extra_body": {"ignore_eos": True}}  # cancelled long before


@pytest.fixture(scope="module")
def served(assets):
    s = RunningServer(make_config(assets, http_port=free_port(), served_model_name="tiny-llama",
                                  tool_call_parser="hermes")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api(served):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served.server.http_port}/v1",
                       api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(served):
    with Client(served.target, timeout=60) as c:
        yield c


# ---------------------------------------------------------------- completions

def test_a_completion_is_what_the_grpc_api_generates(api, grpc_client):
    raw = api.completions.with_raw_response.create(model="alpha", prompt=PROMPT, max_tokens=12,
                                                   temperature=0)
    out = raw.parse()
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=12)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref.prompt_tokens,
                                                                      ref.completion_tokens)
    assert out.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
    assert out.object == "text_completion" and out.model == "alpha"
    assert out.id.startswith("cmpl-req-")
    assert raw.headers["x-loraplex-adapter"] == ref.adapter  # alpha@<version>
    base = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                  temperature=0)
    assert base.choices[0].text == grpc_client.generate(PROMPT, max_new_tokens=12).text
    assert base.choices[0].text != out.choices[0].text


def test_prompts_token_ids_n_and_usage(api, grpc_client):
    ids = list(grpc_client.tokenize("abc").token_ids)
    out = api.completions.create(model="beta", prompt=[PROMPT, "abc"], max_tokens=5, n=2,
                                 temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    refs = [grpc_client.generate(p, adapter="beta", max_new_tokens=5) for p in (PROMPT, "abc")]
    assert [c.text for c in out.choices] == [refs[0].text] * 2 + [refs[1].text] * 2
    assert out.usage.prompt_tokens == refs[0].prompt_tokens + refs[1].prompt_tokens
    assert out.usage.completion_tokens == 2 * sum(r.completion_tokens for r in refs)
    by_ids = api.completions.create(model="beta", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == grpc_client.generate(input_ids=ids, adapter="beta",
                                                          max_new_tokens=5).text
    echoed = api.completions.create(model="beta", prompt=[ids], max_tokens=5, temperature=0,
                                    echo=True)
    assert echoed.choices[0].text == grpc_client.detokenize(ids) + by_ids.choices[0].text


def test_sampling_is_seeded_and_defaults_to_temperature_one(api, grpc_client):
    a = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, seed=5)
    b = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, seed=5)
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=8, seed=5,
                               temperature=1.0)
    greedy = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=8)
    assert a.choices[0].text == b.choices[0].text == ref.text != greedy.text


def test_continuous_usage_stats_count_each_choice_so_far(api):
    """vLLM's stream_options.continuous_usage_stats: every chunk says its choice's usage so
    far; stream_options needs a stream and takes no other key."""
    kw = dict(model="alpha", prompt=[PROMPT, PROMPT + " and more"], max_tokens=6, n=2,
              temperature=0.8, seed=3, stream=True, extra_body={"ignore_eos": True})
    chunks = list(api.completions.create(**kw, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    *deltas, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4 * 6
    seen: dict[int, list[int]] = {}  # choice -> its chunks' completion_tokens
    for c in deltas:
        seen.setdefault(c.choices[0].index, []).append(c.usage.completion_tokens)
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 6
               and len(counts) > 1 for counts in seen.values()), seen
    assert {c.usage.prompt_tokens for c in deltas if c.choices[0].index >= 2} == {
        last.usage.prompt_tokens - deltas[0].usage.prompt_tokens}
    plain = list(api.completions.create(**kw, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage == last.usage
    for options, stream in (({"include_usage": True}, False), ({"chunk_size": 4}, True),
                            ({"include_usage": 1}, True)):
        with pytest.raises(openai.BadRequestError, match="stream_options"):
            api.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, stream=stream,
                                   stream_options=options)


def test_a_streamed_completion_adds_up_to_the_whole(api):
    whole = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(api.completions.create(model="alpha", prompt=PROMPT, max_tokens=10,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_logprobs_name_their_tokens(api, grpc_client):
    out = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0,
                                 logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=6, ignore_eos=True,
                               logprobs=True, top_logprobs=3)
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    assert lp.tokens == [x.token.decode(errors="replace") for x in ref.logprobs]
    assert all(len(top) <= 3 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_scores_the_prompt(api, grpc_client):
    """lm-eval's loglikelihood request: the prompt's tokens and logprobs lead the choice's
    (the first token has none), then the generated token's; the same streamed."""
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=1, ignore_eos=True,
                               logprobs=True, top_logprobs=2, prompt_logprobs=2)
    ids = grpc_client.tokenize(PROMPT).token_ids
    out = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=1, temperature=0,
                                 echo=True, logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT + ref.text and len(lp.tokens) == len(ids) + 1
    assert lp.tokens[0] == grpc_client.detokenize(ids[:1]) and lp.token_logprobs[0] is None
    scored = [*ref.prompt_logprobs, *ref.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx([x.logprob for x in scored], abs=1e-5)
    assert lp.tokens[1:] == [x.token.decode(errors="replace") for x in scored]
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(api.completions.create(model="alpha", prompt=PROMPT, max_tokens=1,
                                         temperature=0, echo=True, logprobs=2, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs, abs=1e-5)


def test_echo_shows_the_prompt_as_truncated(api, grpc_client):
    """With truncate_prompt_tokens, echo (and its scored rows) is the prompt the model saw:
    its last N tokens."""
    ids = list(grpc_client.tokenize(PROMPT).token_ids)
    kept = ids[-4:]
    ref = grpc_client.generate(input_ids=kept, adapter="alpha", max_new_tokens=2,
                               ignore_eos=True, prompt_logprobs=0)
    out = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, temperature=0,
                                 echo=True, logprobs=0, extra_body={
                                     "truncate_prompt_tokens": 4, "ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == grpc_client.detokenize(kept) + ref.text
    assert len(choice.logprobs.tokens) == 4 + 2 and out.usage.prompt_tokens == 4
    assert choice.logprobs.tokens[0] == grpc_client.detokenize(kept[:1])
    assert choice.logprobs.token_logprobs[1:4] == pytest.approx(
        [x.logprob for x in ref.prompt_logprobs], abs=1e-5)
    plain = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, temperature=0,
                                   echo=True, extra_body={"truncate_prompt_tokens": 4,
                                                          "ignore_eos": True})
    assert plain.choices[0].text == choice.text


def test_prompt_logprobs_are_vllms(api, grpc_client):
    """vLLM's prompt_logprobs: None for the first prompt token, then {id: {logprob, rank,
    decoded_token}} with the token's own entry first; a completion choice's field, chat's
    top-level one, in a stream's first chunk; beside echo's rows with their own count."""
    ids = grpc_client.tokenize(PROMPT).token_ids
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=1, ignore_eos=True,
                               prompt_logprobs=3)
    ranks = [x.rank for x in ref.prompt_logprobs]  # (gRPC's TokenLogprob.rank)
    assert min(ranks) >= 1 and max(ranks) > 1  # (some prompt token is not the top)

    def check(scored, top, ref_rows, prompt_ids):
        assert scored[0] is None and len(scored) == len(prompt_ids)
        for row, lp, tok in zip(scored[1:], ref_rows, prompt_ids[1:]):
            assert next(iter(row)) == str(tok)
            assert row[str(tok)] == {"logprob": pytest.approx(lp.logprob, abs=1e-5),
                                     "rank": lp.rank,
                                     "decoded_token": lp.token.decode(errors="replace")}
            assert set(row) == {str(tok), *(str(t) for t, _ in lp.top[:top])}
            assert all(row[str(t)] == {"logprob": pytest.approx(p, abs=1e-5), "rank": r,
                                       "decoded_token": row[str(t)]["decoded_token"]}
                       for r, (t, p) in enumerate(lp.top[:top], 1) if t != tok)

    kw = dict(model="alpha", prompt=PROMPT, max_tokens=1, temperature=0)
    out = api.completions.create(**kw, extra_body={"prompt_logprobs": 3, "ignore_eos": True})
    check(out.choices[0].model_extra["prompt_logprobs"], 3, ref.prompt_logprobs, ids)
    assert out.choices[0].logprobs is None
    both = api.completions.create(**kw, echo=True, logprobs=1, extra_body={
        "prompt_logprobs": 2, "ignore_eos": True})
    check(both.choices[0].model_extra["prompt_logprobs"], 2, ref.prompt_logprobs, ids)
    assert all(len(t) <= 1 for t in both.choices[0].logprobs.top_logprobs[1:])
    chunks = list(api.completions.create(**kw, stream=True, extra_body={"prompt_logprobs": 3}))
    check(chunks[0].choices[0].model_extra["prompt_logprobs"], 3, ref.prompt_logprobs, ids)
    assert all("prompt_logprobs" not in (c.choices[0].model_extra or {}) for c in chunks[1:])
    assert "prompt_logprobs" not in api.completions.create(**kw).choices[0].model_extra

    chat_ids = grpc_client.tokenize(messages=MESSAGES).token_ids
    chat_ref = grpc_client.generate(messages=MESSAGES, adapter="alpha", max_new_tokens=1,
                                    prompt_logprobs=0)
    chat = dict(model="alpha", messages=MESSAGES, max_tokens=2, temperature=0,
                extra_body={"prompt_logprobs": 0})
    check(api.chat.completions.create(**chat).model_extra["prompt_logprobs"], 0,
          chat_ref.prompt_logprobs, chat_ids)
    streamed = list(api.chat.completions.create(**chat, stream=True))
    check(streamed[0].model_extra["prompt_logprobs"], 0, chat_ref.prompt_logprobs, chat_ids)
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs must be 0 to 20"):
        api.completions.create(**kw, extra_body={"prompt_logprobs": 21})


def test_bad_words_are_vllms(api, grpc_client):
    """vLLM's bad_words reach the engine: a word the logit bias makes the only choice is
    never written."""
    word = grpc_client.detokenize([50])  # (the byte tokenizer: one character)
    kw = dict(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0,
              logit_bias={"50": 100})
    assert api.completions.create(**kw).choices[0].text == word * 4
    out = api.completions.create(**kw, extra_body={"bad_words": [word, "zz"],
                                                   "ignore_eos": True})
    assert word not in out.choices[0].text and out.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="bad_words"):
        api.completions.create(**kw, extra_body={"bad_words": [" "]})


# ---------------------------------------------------------------- chat

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]


def test_chat_is_the_templated_conversation(api, grpc_client):
    out = api.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8,
                                      temperature=0)
    ref = grpc_client.generate(messages=MESSAGES, adapter="alpha", max_new_tokens=8)
    msg = out.choices[0].message
    assert (msg.role, msg.content) == ("assistant", ref.text) and out.object == "chat.completion"
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.id.startswith("chatcmpl-")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                          {"type": "text", "text": "world"}]}]
    joined = api.chat.completions.create(model="alpha", messages=parts, max_tokens=8,
                                         temperature=0)
    assert joined.choices[0].message.content == grpc_client.generate(
        messages=[{"role": "user", "content": PROMPT}], adapter="alpha", max_new_tokens=8).text


def test_a_streamed_chat_starts_with_the_role(api):
    whole = api.chat.completions.create(model="beta", messages=MESSAGES, max_completion_tokens=9,
                                        temperature=0, n=2)
    chunks = list(api.chat.completions.create(model="beta", messages=MESSAGES,
                                              max_completion_tokens=9, temperature=0, n=2,
                                              stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and all(m.delta.role is None for m in mine[1:])
        assert "".join(m.delta.content or "" for m in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == "length"


def test_chat_logprobs_carry_bytes(api):
    out = api.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=5,
                                      temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert bytes(b for c in content for b in c.bytes).decode(errors="replace") == \
        out.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
               for c in content)
    chosen = api.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=5,
                                         temperature=0, logprobs=True)  # no alternatives
    assert [(c.token, c.logprob, c.top_logprobs) for c in chosen.choices[0].logprobs.content] \
        == [(c.token, pytest.approx(c.logprob, abs=1e-5), []) for c in content]
    plain = api.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=5,
                                        temperature=0)
    assert plain.choices[0].logprobs is None


def test_response_format_json_schema_is_guided(api):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"]}
    out = api.chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    value = json.loads(out.choices[0].message.content)
    assert value["answer"] in ("yes", "no") and isinstance(value["n"], int)
    choice = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=10,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in ("left", "right")


def test_structured_outputs_and_completions_response_format_are_vllms(api, grpc_client):
    """vLLM's structured_outputs (json, regex, choice, json_object) are the guided_* fields,
    in completions and chat; completions take response_format too, as vLLM's."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    kw = dict(model="alpha", prompt=PROMPT, max_tokens=20, temperature=0)
    for spec, guide in (({"json": schema}, {"guided_json": schema}),
                        ({"regex": "[ab]{3}"}, {"guided_regex": "[ab]{3}"}),
                        ({"choice": ["left", "right"]}, {"guided_choice": ["left", "right"]}),
                        ({"json_object": True, "disable_fallback": False},
                         {"guided_json": {"type": "object"}})):
        out = api.completions.create(**kw, extra_body={"structured_outputs": spec})
        ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=20, **guide)
        assert out.choices[0].text == ref.text, spec
        chat = api.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=20,
                                           temperature=0, extra_body={"structured_outputs": spec})
        assert chat.choices[0].message.content == grpc_client.generate(
            messages=MESSAGES, adapter="alpha", max_new_tokens=20, **guide).text, spec
    assert json.loads(api.completions.create(**kw, extra_body={"response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    ).choices[0].text) in ({"ok": True}, {"ok": False})
    for extra, words in (({"structured_outputs": {"grammar": "root ::= x"}}, "grammar"),
                         ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "one of"),
                         ({"structured_outputs": {"regex": 5}}, "wrong type"),
                         ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"},
                          "not both"),
                         ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
                          "not both")):
        with pytest.raises(openai.BadRequestError, match=words):
            api.completions.create(**kw, extra_body=extra)


def test_response_format_json_object_is_free_form_json(api, grpc_client):
    """json_object is guided_json {"type": "object"}: free-form, nested 4 deep (this random
    model only starts one; test_json_schema samples some that end)."""
    body = dict(model="beta", messages=MESSAGES, max_tokens=24, temperature=0,
                response_format={"type": "json_object"})
    out = api.chat.completions.create(**body).choices[0]
    ref = grpc_client.generate(messages=MESSAGES, adapter="beta", max_new_tokens=24,
                               guided_json={"type": "object"})
    assert (out.message.content, out.finish_reason) == (ref.text, ref.finish_reason)
    assert out.message.content.startswith('{"')  # (test_json_schema: outputs that end parse)


# ---------------------------------------------------------------- tool calling

TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "the weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                             "days": {"enum": [1, 2, 3]}},
                            "required": ["city", "days"]}}},
         {"type": "function", "function": {"name": "get_time"}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CITY_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "(Paris|Rome)"}}</tool_call>'


def _streamed_calls(chunks) -> tuple[str, list[dict]]:
    """(content, calls) that a stream's deltas add up to, as OpenAI's clients add them."""
    content, calls = "", {}
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            if d.id:  # (a call's first delta: its id, type and name, once)
                assert d.index not in calls and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)]


def _calls(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or ()]


def test_a_named_tool_choice_guides_the_arguments(api, grpc_client):
    body = dict(model="alpha", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=60,
                temperature=0)
    out = api.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # (as OpenAI's)
    [call] = _calls(choice.message)
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    args = json.loads(call["arguments"])
    assert args["city"] in ("Paris", "Rome") and args["days"] in (1, 2, 3)
    ref = grpc_client.generate(messages=MESSAGES, tools=TOOLS, adapter="alpha", max_new_tokens=60,
                               guided_json=TOOLS[0]["function"]["parameters"])
    assert call["arguments"] == ref.text and out.usage.prompt_tokens == ref.prompt_tokens
    content, calls = _streamed_calls(api.chat.completions.create(**body, stream=True))
    assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", ref.text)]


def test_required_tool_choice_makes_every_item_a_call(api, grpc_client):
    body = dict(model="beta", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, max_tokens=80, temperature=0)
    out = api.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = _calls(choice.message)  # (parallel_tool_calls false: one item)
    ref = grpc_client.generate(messages=MESSAGES, tools=TOOLS, adapter="beta", max_new_tokens=80,
                               guided_json={"type": "array", "minItems": 1, "maxItems": 1,
                                            "items": {"anyOf": [
                                                {"type": "object", "required": ["name",
                                                                                "parameters"],
                                                 "properties": {"name": {"const": t["function"]["name"]},
                                                                "parameters": t["function"].get(
                                                                    "parameters", {"type": "object",
                                                                                   "properties": {}})}}
                                                for t in TOOLS]}})
    [item] = json.loads(ref.text)
    assert (call["name"], json.loads(call["arguments"])) == (item["name"], item["parameters"])
    content, calls = _streamed_calls(api.chat.completions.create(**body, stream=True))
    assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [
        (call["name"], call["arguments"])]


def test_auto_tool_choice_reads_hermes_blocks_out_of_the_text(api, grpc_client):
    """The server's --tool-call-parser hermes; the random model is steered to write a block
    with guided_regex, which tool_choice auto leaves to the request."""
    body = dict(model="alpha", messages=MESSAGES, tools=TOOLS, max_tokens=90, temperature=0,
                extra_body={"guided_regex": "Sure\\. " + CITY_CALL})
    out = api.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    [call] = _calls(choice.message)
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris",
                                                                                      "Rome")
    chunks = list(api.chat.completions.create(**body, stream=True))
    content, calls = _streamed_calls(chunks)
    assert content == "Sure." and [(c["name"], c["arguments"]) for c in calls] == [
        (call["name"], call["arguments"])]
    pieces = [d.function.arguments for c in chunks for d in c.choices[0].delta.tool_calls or ()
              if d.function.arguments]
    assert len(pieces) > 2  # (the arguments streamed as written, not at the block's end)
    free = api.chat.completions.create(model="alpha", messages=MESSAGES, tools=TOOLS,
                                       max_tokens=12, temperature=0)  # (no block: all content)
    ref = grpc_client.generate(messages=MESSAGES, tools=TOOLS, adapter="alpha", max_new_tokens=12)
    assert (free.choices[0].message.content, free.choices[0].message.tool_calls) == (ref.text,
                                                                                     None)
    assert free.choices[0].finish_reason == ref.finish_reason
    none = api.chat.completions.create(model="alpha", messages=MESSAGES, tools=TOOLS,
                                       tool_choice="none", max_tokens=12, temperature=0)
    assert none.choices[0].message.content == ref.text  # (the tools are still shown)


def test_special_tokens_are_kept_on_request_and_for_hermes_tool_calls(api):
    """vLLM's skip_special_tokens; with tools and the hermes parser they are kept unless the
    request says otherwise (some models' <tool_call> is a special token)."""
    bos = {"logit_bias": {str(BOS_ID): 100}, "max_tokens": 3}
    kept = api.completions.create(model="alpha", prompt=PROMPT, **bos,
                                  extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == "<s>" * 3
    assert api.completions.create(model="alpha", prompt=PROMPT, **bos).choices[0].text == ""
    chat = dict(model="alpha", messages=MESSAGES, tools=TOOLS, **bos)
    assert api.chat.completions.create(**chat).choices[0].message.content == "<s>" * 3
    skipped = api.chat.completions.create(**chat, extra_body={"skip_special_tokens": True})
    assert skipped.choices[0].message.content == ""
    none = api.chat.completions.create(**chat, tool_choice="none")  # (no parser at work)
    assert none.choices[0].message.content == ""


def test_prefill_and_template_kwargs_are_vllms(served, api, grpc_client):
    """continue_final_message (with add_generation_prompt false, as vLLM asks) and
    chat_template_kwargs: /tokenize and chat see what the gRPC API renders."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "Sure, "}]
    url = f"http://127.0.0.1:{served.server.http_port}/tokenize"
    for extra, kw in (({"continue_final_message": True, "add_generation_prompt": False},
                       {"continue_final_message": True}),
                      ({"chat_template_kwargs": {"enable_thinking": False}},
                       {"chat_template_kwargs": {"enable_thinking": False}})):
        messages = prefill if "continue_final_message" in kw else MESSAGES
        status, out = _http(url, json.dumps({"messages": messages, **extra}).encode(),
                            {"Content-Type": "application/json"})
        want = grpc_client.tokenize(messages=messages, **kw)
        assert status == 200 and out["tokens"] == list(want.token_ids), extra
        chat = api.chat.completions.create(model="alpha", messages=messages, max_tokens=6,
                                           temperature=0, extra_body=extra)
        ref = grpc_client.generate(messages=messages, adapter="alpha", max_new_tokens=6, **kw)
        assert (chat.choices[0].message.content, chat.usage.prompt_tokens) == (
            ref.text, ref.prompt_tokens)
    assert grpc_client.tokenize(messages=prefill, continue_final_message=True) \
        != grpc_client.tokenize(messages=prefill)  # (so the field did something)
    for extra, words in (({"continue_final_message": True, "add_generation_prompt": True},
                          "add_generation_prompt true"),
                         ({"add_generation_prompt": False}, "only with continue_final_message"),
                         ({"chat_template_kwargs": {"add_generation_prompt": False}},
                          "cannot set ['add_generation_prompt']")):
        with pytest.raises(openai.BadRequestError, match=re.escape(words)):
            api.chat.completions.create(model="alpha", messages=prefill, extra_body=extra)


def test_a_conversation_with_tool_results_is_templated(served, api, grpc_client):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    status, tokens = _http(f"http://127.0.0.1:{served.server.http_port}/tokenize",
                           json.dumps({"messages": history, "tools": TOOLS}).encode(),
                           {"Content-Type": "application/json"})
    want = grpc_client.tokenize(messages=history, tools=TOOLS)
    assert status == 200 and tokens["tokens"] == list(want.token_ids)
    text = grpc_client.detokenize(want.token_ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}' in text
    assert "<tool>sunny" in text and text.startswith('<tools>[{"type": "function"')
    out = api.chat.completions.create(model="gamma", messages=history, tools=TOOLS,
                                      tool_choice="none", max_tokens=8, temperature=0)
    ref = grpc_client.generate(messages=history, tools=TOOLS, adapter="gamma", max_new_tokens=8)
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(want.token_ids)


# ---------------------------------------------------------------- models, routes, errors

def test_version_is_loraplexs(served):
    from importlib import metadata

    assert _http(f"http://127.0.0.1:{served.server.http_port}/version") == (
        200, {"version": metadata.version("loraplex")})


def test_models_lists_the_base_adapters_and_routes(api, grpc_client):
    grpc_client.set_route("canary", {"alpha": 50, "beta": 50})
    try:
        models = {m.id: m for m in api.models.list().data}
        raw = api.completions.with_raw_response.create(model="canary", prompt=PROMPT,
                                                       max_tokens=2, user="user-7")
    finally:
        grpc_client.delete_route("canary")
    assert {"tiny-llama", "alpha", "beta", "gamma", "canary"} <= set(models)
    assert models["tiny-llama"].parent is None and models["alpha"].parent == "tiny-llama"
    assert models["alpha"].root.startswith("alpha@")  # loaded; gamma is still on disk
    limit = grpc_client.tokenize(PROMPT).max_model_len
    assert {m.model_extra["max_model_len"] for m in models.values()} == {limit} and limit > 0
    assert raw.headers["x-loraplex-route"] == "canary"
    assert raw.headers["x-loraplex-adapter"].split("@")[0] in ("alpha", "beta")


@pytest.mark.parametrize("call, error, words", [
    (lambda api: api.completions.create(model="nosuch", prompt=PROMPT),
     openai.NotFoundError, "nosuch"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, temperature=-1),
     openai.BadRequestError, "temperature must be in [0, 100]"),
    (lambda api: api.completions.create(model="alpha", prompt="", max_tokens=3),
     openai.BadRequestError, "empty"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, max_tokens=10**6),
     openai.BadRequestError, "max_new_tokens"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, extra_body={"bogus": 1}),
     openai.BadRequestError, "unknown field 'bogus'"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, top_p="x"),
     openai.BadRequestError, "top_p must be a number"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f",
                                                                                  "parameters": 1}}]),
     openai.BadRequestError, "tools[0].function.parameters must be a JSON schema object"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=MESSAGES, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "nope"}}),
     openai.BadRequestError, "'nope', which is not in tools ['get_weather', 'get_time']"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=MESSAGES, tools=TOOLS, tool_choice="required",
        extra_body={"guided_regex": "a+"}),
     openai.BadRequestError, "tool_choice required guides the output to the tool call: drop "
                             "guided_regex"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}),
     openai.BadRequestError, "drop response_format"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=MESSAGES, functions=[{"name": "f"}]),
     openai.BadRequestError, "functions (deprecated by OpenAI) is not supported: send tools"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=[*MESSAGES, {"role": "assistant", "tool_calls": [{"id": "c"}]}]),
     openai.BadRequestError, "messages[2].tool_calls[0] must be"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=[*MESSAGES, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]),
     openai.BadRequestError, "messages[2].tool_calls[0].arguments is not JSON"),
    (lambda api: api.chat.completions.create(model="alpha", messages=MESSAGES,
                                             response_format={"type": "json_objects"}),
     openai.BadRequestError, "use text, json_object or json_schema"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]),
     openai.BadRequestError, "only parts of type 'text'"),
    (lambda api: api.chat.completions.create(model="alpha", messages=[]),
     openai.BadRequestError, "messages"),
    (lambda api: api.chat.completions.create(
        model="alpha", messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": "x"}),
     openai.BadRequestError, "json_schema.schema must be a JSON schema object"),
    (lambda api: api.completions.create(model="alpha", prompt=[[-1]]),
     openai.BadRequestError, "whole numbers >= 0"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, logprobs=21),
     openai.BadRequestError, "logprobs must be 0 to 20"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, stop=[1]),
     openai.BadRequestError, "stop must be an array of strings"),
    (lambda api: api.completions.create(model="alpha", prompt=PROMPT, stream=True,
                                        extra_body={"guided_regex": "("}),
     openai.BadRequestError, "guided regex: a missing ')'"),
])
def test_bad_requests_get_a_status_and_say_what_to_fix(api, call, error, words):
    with pytest.raises(error) as info:
        result = call(api)
        list(result) if isinstance(result, openai.Stream) else result
    assert words in info.value.message, info.value.message
    assert info.value.body["type"] in ("invalid_request_error", "not_found_error")


def _http(url: str, body: bytes | None = None, headers: dict | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP call."""
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _post(url: str, body: dict, token: str = "",
          context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """(status, text of the body) of one JSON POST."""
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_vllm_lora_adapter_endpoints_load_swap_and_unload(served, api, grpc_client):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter over the gRPC admin calls:
    the loaded name serves the folder's weights, load_inplace swaps them, unload ends it."""
    base = f"http://127.0.0.1:{served.server.http_port}/v1"
    load, unload = f"{base}/load_lora_adapter", f"{base}/unload_lora_adapter"

    def text(model: str) -> str:
        return api.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                      temperature=0).choices[0].text

    assert _post(load, {"lora_name": "via-http", "lora_path": "alpha"}) == (
        200, "Success: LoRA adapter 'via-http' added successfully.")
    assert text("via-http") == text("alpha") != text("beta")
    assert _post(load, {"lora_name": "via-http", "lora_path": "alpha"})[0] == 200  # (the same)
    status, body = _post(load, {"lora_name": "via-http", "lora_path": "beta"})
    assert status == 400 and "or send load_inplace: true" in json.loads(body)["error"]["message"]
    assert _post(load, {"lora_name": "via-http", "lora_path": "beta", "load_inplace": True})[0] \
        == 200
    assert text("via-http") == text("beta")
    assert [a.name for a in grpc_client.list_adapters() if a.name == "via-http" and a.current]
    assert _post(unload, {"lora_name": "via-http"}) == (
        200, "Success: LoRA adapter 'via-http' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        text("via-http")
    assert _post(unload, {"lora_name": "via-http"})[0] == 404
    assert _post(load, {"lora_name": "x", "lora_path": "../outside"})[0] == 403
    status, body = _post(load, {"lora_name": "x"})
    assert status == 400 and json.loads(body)["error"]["param"] == "lora_path"
    assert _post(load, {"lora_name": "x", "lora_path": "alpha", "lora_int_id": 3})[0] == 400
    status, body = _post(unload, {"lora_name": "alpha", "lora_int_id": 1})
    assert status == 400 and "send lora_name" in json.loads(body)["error"]["message"]


def test_tokenize_and_detokenize(served, grpc_client):
    base = f"http://127.0.0.1:{served.server.http_port}"
    want = grpc_client.tokenize(PROMPT)
    status, out = _http(f"{base}/tokenize", json.dumps({"model": "alpha", "prompt": PROMPT})
                        .encode(), {"Content-Type": "application/json"})
    assert status == 200 and out == {"tokens": list(want.token_ids),
                                     "count": len(want.token_ids),
                                     "max_model_len": want.max_model_len}
    status, chat = _http(f"{base}/tokenize", json.dumps({"messages": MESSAGES}).encode(),
                         {"Content-Type": "application/json"})
    assert chat["tokens"] == list(grpc_client.tokenize(messages=MESSAGES).token_ids)
    status, text = _http(f"{base}/detokenize", json.dumps({"tokens": out["tokens"]}).encode(),
                         {"Content-Type": "application/json"})
    assert status == 200 and text == {"prompt": grpc_client.detokenize(want.token_ids)}
    for path, body in (("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": ["a"]}),
                       ("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": []})):
        status, err = _http(f"{base}{path}", json.dumps(body).encode(),
                            {"Content-Type": "application/json"})
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (path, body)


def test_health_and_unknown_paths(served):
    base = f"http://127.0.0.1:{served.server.http_port}"
    assert _http(f"{base}/health") == (200, {"status": "SERVING"})
    status, body = _http(f"{base}/v1/nothing")
    assert status == 404 and body["error"]["message"] == "Not Found"
    before = served.metric("loraplex_http_requests_total", endpoint="/v1/completions",
                           status="400")
    status, body = _http(f"{base}/v1/completions", b"{not json",
                         {"Content-Type": "application/json"})
    assert status == 400 and "JSON object" in body["error"]["message"]
    # every call counted by endpoint and status
    assert served.metric("loraplex_http_requests_total", endpoint="/v1/completions",
                         status="400") == before + 1
    assert served.metric("loraplex_http_requests_total", endpoint="other", status="404") >= 1
    assert served.metric("loraplex_http_requests_total", endpoint="/health", status="200") >= 1


def test_a_client_that_goes_away_frees_its_place_in_the_batch(served, api):
    gone = served.metric("loraplex_http_requests_total", endpoint="/v1/completions",
                         status="499")
    stream = api.completions.create(model="alpha", prompt=PROMPT, stream=True, **LONG)
    next(iter(stream))
    assert served.wait_metric("loraplex_running_requests", lambda v: v == 1) == 1
    stream.close()  # the HTTP connection closes
    assert served.wait_metric("loraplex_running_requests", lambda v: v == 0) == 0
    conn = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=60)
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 16000, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # waits for its whole answer...
    assert served.wait_metric("loraplex_running_requests", lambda v: v == 1) == 1
    conn.close()  # ...and goes away before it
    assert served.wait_metric("loraplex_running_requests", lambda v: v == 0) == 0
    assert served.wait_metric("loraplex_http_requests_total", lambda v: v == gone + 2,
                              endpoint="/v1/completions", status="499") == gone + 2


def test_the_gateway_process_answers_as_the_server_does(served, api, grpc_client):
    """`loraplex http-gateway` in a process of its own, over the server's gRPC port; its
    --tool-call-parser llama3_json reads the call that the model is steered to write."""
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    in_process = api.completions.create(**body)
    metrics_port = free_port()
    llama_call = '{"name": "get_weather", "parameters": {"city": "(Paris|Rome)"}}'
    tool_body = {"model": "alpha", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 90,
                 "temperature": 0, "guided_regex": llama_call}  # (auto)
    with Gateway(served.target, "tiny-llama", "--metrics-port", str(metrics_port),
                 "--tool-call-parser", "llama3_json") as gateway:
        status, out = _http(f"{gateway.url}/v1/completions", json.dumps(body).encode(),
                            {"Content-Type": "application/json"})
        assert status == 200 and out["choices"][0]["text"] == in_process.choices[0].text
        status, out = _http(f"{gateway.url}/v1/chat/completions", json.dumps(tool_body).encode(),
                            {"Content-Type": "application/json"})
        ref = grpc_client.generate(messages=MESSAGES, tools=TOOLS, adapter="alpha",
                                   max_new_tokens=90, guided_regex=llama_call)
        [choice] = out["choices"]
        [call] = choice["message"]["tool_calls"]
        assert status == 200 and choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None and call["function"] == {
            "name": "get_weather",
            "arguments": json.dumps(json.loads(ref.text)["parameters"])}
        status, models = _http(f"{gateway.url}/v1/models")
        assert status == 200 and models["data"][0]["id"] == "tiny-llama"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            text = resp.read().decode()
        assert 'loraplex_http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
        assert "loraplex_http_stored_responses 0.0" in text  # (its own store: none yet)
        assert "loraplex_running_requests" not in text  # (the gateway's own metrics only)
        assert gateway.stop() == 0  # SIGTERM: a clean exit


# ---------------------------------------------------------------- Responses API

def _streamed_response(events) -> tuple[list, object]:
    """(event types, the final response) of a Responses stream; its deltas must add up to
    each item's done text."""
    types, texts, final = [], {}, None
    for e in events:
        types.append(e.type)
        if e.type in ("response.output_text.delta", "response.function_call_arguments.delta",
                      "response.reasoning_text.delta"):
            texts[e.item_id] = texts.get(e.item_id, "") + e.delta
        elif e.type == "response.output_item.done":
            item = e.item
            done = (item.arguments if item.type == "function_call" else
                    "".join(c.text for c in item.content))
            assert texts.get(item.id, "") == done, (item, texts)
        elif e.type in ("response.completed", "response.incomplete"):
            final = e.response
    return types, final


def test_responses_are_the_chat_answer_as_output_items(api, grpc_client):
    """OpenAI's client.responses: text, streamed events, a function call read by the
    hermes parser, and a conversation with a call and its output, each the chat API's
    answer to the same request."""
    chat = api.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8,
                                       temperature=0)
    kw = dict(model="alpha", instructions="be brief", input=PROMPT, max_output_tokens=8,
              temperature=0)
    out = api.responses.create(**kw)
    assert out.output_text == chat.choices[0].message.content and out.object == "response"
    assert out.status == ("incomplete" if chat.choices[0].finish_reason == "length"
                          else "completed")
    assert (out.usage.input_tokens, out.usage.output_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens)
    types, final = _streamed_response(api.responses.create(**kw, stream=True))
    assert types[:2] == ["response.created", "response.in_progress"]
    assert final.output_text == out.output_text and final.usage == out.usage
    call = api.responses.create(model="alpha", input=PROMPT, temperature=0,
                                max_output_tokens=90, tools=[{
                                    "type": "function", "name": "get_weather",
                                    "parameters": TOOLS[0]["function"]["parameters"]}],
                                extra_body={"guided_regex": "Sure\\. " + CITY_CALL})
    assert [i.type for i in call.output] == ["message", "function_call"]
    assert call.output_text == "Sure." and call.output[1].name == "get_weather"
    assert json.loads(call.output[1].arguments)["city"] in ("Paris", "Rome")
    _, streamed = _streamed_response(api.responses.create(
        model="alpha", input=PROMPT, temperature=0, max_output_tokens=90, stream=True,
        tools=[{"type": "function", "name": "get_weather",
                "parameters": TOOLS[0]["function"]["parameters"]}],
        extra_body={"guided_regex": "Sure\\. " + CITY_CALL}))
    assert [(i.type, getattr(i, "arguments", None)) for i in streamed.output] == [
        (i.type, getattr(i, "arguments", None)) for i in call.output]
    history = [{"role": "user", "content": PROMPT},
               {"type": "function_call", "call_id": "c1", "name": "get_weather",
                "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
    followup = api.responses.create(model="alpha", input=history, max_output_tokens=6,
                                    temperature=0)
    same = api.chat.completions.create(model="alpha", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert followup.output_text == same.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="nosuch"):
        api.responses.create(model="nosuch", input=PROMPT)


def test_stored_responses_continue_a_conversation(api):
    """Responses are stored (store defaults to true, as OpenAI's): GET reads one back,
    previous_response_id continues its conversation (its instructions not carried over)
    exactly as the chat API answers the whole conversation, streamed or not; store false
    keeps none; DELETE removes one; an unknown id is 404."""
    first = api.responses.create(model="alpha", instructions="be brief", input=PROMPT,
                                 max_output_tokens=5, temperature=0)
    assert first.store and api.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = api.responses.create(model="alpha", previous_response_id=first.id, input="more",
                                  max_output_tokens=5, temperature=0)
    whole = [{"role": "user", "content": PROMPT},
             {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "more"}]
    chat = api.chat.completions.create(model="alpha", messages=whole, max_tokens=5,
                                       temperature=0)
    assert second.previous_response_id == first.id
    assert (second.output_text, second.usage.input_tokens) == (
        chat.choices[0].message.content, chat.usage.prompt_tokens)
    _, third = _streamed_response(api.responses.create(
        model="alpha", previous_response_id=second.id, input="again", max_output_tokens=5,
        temperature=0, stream=True))
    chat = api.chat.completions.create(model="alpha", max_tokens=5, temperature=0, messages=[
        *whole, {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "again"}])
    assert third.output_text == chat.choices[0].message.content
    assert api.responses.retrieve(third.id).output_text == third.output_text
    [asked] = api.responses.input_items.list(third.id).data  # (its own input only)
    assert (asked.role, asked.content[0].text) == ("user", "again")
    unkept = api.responses.create(model="alpha", input=PROMPT, max_output_tokens=2, store=False)
    assert not unkept.store
    for gone in (unkept.id, "resp_x"):
        with pytest.raises(openai.NotFoundError, match="no response"):
            api.responses.retrieve(gone)
        with pytest.raises(openai.NotFoundError, match="no response"):
            api.responses.create(model="alpha", input="x", previous_response_id=gone)
    with openai.OpenAI(base_url=api.base_url, api_key="someone else", max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):  # (another token's, on an open server too)
            other.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="alpha", input="x", previous_response_id=first.id)
    api.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(first.id)
    assert api.responses.retrieve(second.id).id == second.id  # (the others stay)


def test_input_items_list_a_stored_responses_input_in_pages(served, api):
    kept = (served.metric("loraplex_http_stored_responses"),
            served.metric("loraplex_http_stored_response_bytes"))
    given = [{"role": "user", "content": PROMPT},
             {"type": "function_call", "call_id": "c1", "name": "get_weather",
              "arguments": '{"city": "Rome"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
    out = api.responses.create(model="alpha", input=given, max_output_tokens=2)
    assert served.metric("loraplex_http_stored_responses") == kept[0] + 1
    assert served.metric("loraplex_http_stored_response_bytes") > kept[1] + len(PROMPT)
    newest = api.responses.input_items.list(out.id)
    assert [i.type for i in newest.data] == ["function_call_output", "function_call",
                                             "message"] and not newest.has_more
    first = api.responses.input_items.list(out.id, order="asc", limit=2)
    assert [i.type for i in first.data] == ["message", "function_call"] and first.has_more
    assert first.data[0].content[0].text == PROMPT and first.data[1].call_id == "c1"
    rest = api.responses.input_items.list(out.id, order="asc", after=first.last_id)
    assert [i.output for i in rest.data] == ["sunny"] and not rest.has_more
    assert [i.id for i in api.responses.input_items.list(out.id, order="asc", limit=1)] == [
        *[i.id for i in first.data], rest.data[0].id]  # (the SDK's pager follows has_more)
    with pytest.raises(openai.BadRequestError, match="limit must be"):
        api.responses.input_items.list(out.id, limit=500)
    with openai.OpenAI(base_url=api.base_url, api_key="someone else", max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.input_items.list(out.id)
    api.responses.delete(out.id)
    assert (served.metric("loraplex_http_stored_responses"),
            served.metric("loraplex_http_stored_response_bytes")) == kept


def test_responses_give_the_reasoning_its_own_item(thinking):
    out = thinking.responses.create(model="alpha", input=PROMPT, temperature=0,
                                    max_output_tokens=40,
                                    extra_body={"guided_regex": THOUGHT + "Hi[a-z]{1,4}"})
    assert [i.type for i in out.output] == ["reasoning", "message"]
    assert len(out.output[0].content[0].text.split()) == 2 and out.output_text.startswith("Hi")
    types, final = _streamed_response(thinking.responses.create(
        model="alpha", input=PROMPT, temperature=0, max_output_tokens=40, stream=True,
        extra_body={"guided_regex": THOUGHT + "Hi[a-z]{1,4}"}))
    assert "response.reasoning_text.delta" in types
    assert final.output[0].content[0].text == out.output[0].content[0].text
    assert final.output_text == out.output_text


# ---------------------------------------------------------------- reasoning

@pytest.fixture(scope="module")
def thinking(assets):
    """A server with --reasoning-parser qwen3 (and hermes for tools)."""
    s = RunningServer(make_config(assets, http_port=free_port(), reasoning_parser="qwen3",
                                  tool_call_parser="hermes",
                                  preload=(("alpha", "alpha"),))).start()
    with openai.OpenAI(base_url=f"http://127.0.0.1:{s.server.http_port}/v1",
                       api_key="unused", max_retries=0, timeout=60) as c:
        yield c
    s.stop()


THOUGHT = "<think>\n[a-z]{2,6} [a-z]{2,6}\n</think>\n\n"


def test_reasoning_parser_splits_the_thinking_off(thinking, grpc_client):
    """The random model, steered by guided_regex to think first: reasoning_content holds
    the thinking, the content the rest, whole and streamed; a call after the thinking is
    read by the tool call parser; enable_thinking false leaves the text whole."""
    body = dict(model="alpha", messages=MESSAGES, max_tokens=40, temperature=0,
                extra_body={"guided_regex": THOUGHT + "Hi[a-z]{1,4}"})
    raw = grpc_client.generate(messages=MESSAGES, adapter="alpha", max_new_tokens=40,
                               guided_regex=THOUGHT + "Hi[a-z]{1,4}").text
    thought, _, answer = raw.removeprefix("<think>").partition("</think>")
    msg = thinking.chat.completions.create(**body).choices[0].message
    assert msg.model_extra["reasoning_content"] == thought and msg.content == answer.lstrip()
    assert msg.content.startswith("Hi") and len(thought.split()) == 2
    reasoning, content = "", ""
    for chunk in thinking.chat.completions.create(**body, stream=True):
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
    assert (reasoning, content) == (thought, msg.content)
    hidden = thinking.chat.completions.create(**{**body, "extra_body": {
        **body["extra_body"], "include_reasoning": False}}).choices[0].message
    assert hidden.content == msg.content and "reasoning_content" not in hidden.model_extra
    off = thinking.chat.completions.create(**{**body, "extra_body": {
        **body["extra_body"], "chat_template_kwargs": {"enable_thinking": False}}})
    assert off.choices[0].message.content.startswith("<think>\n")  # (the whole text)
    assert off.choices[0].message.content == grpc_client.generate(
        messages=MESSAGES, adapter="alpha", max_new_tokens=40,
        guided_regex=THOUGHT + "Hi[a-z]{1,4}", chat_template_kwargs={"enable_thinking": False}
    ).text
    assert "reasoning_content" not in off.choices[0].message.model_extra
    tools = thinking.chat.completions.create(
        model="alpha", messages=MESSAGES, tools=TOOLS, max_tokens=120, temperature=0,
        extra_body={"guided_regex": THOUGHT + CITY_CALL})
    choice = tools.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.model_extra["reasoning_content"].split()) == 2
    assert [c["name"] for c in _calls(choice.message)] == ["get_weather"]


# ---------------------------------------------------------------- tokens and TLS

@pytest.fixture(scope="module")
def guarded(assets, tmp_path_factory):
    cert, key = make_tls_cert(tmp_path_factory.mktemp("tls_http"))
    s = RunningServer(make_config(assets, http_port=free_port(), admin_token=ADMIN_TOKEN,
                                  generate_token=GENERATE_TOKEN, tls_cert=str(cert),
                                  tls_key=str(key), preload=(("alpha", "alpha"),))).start()
    s.cert = cert
    yield s
    s.stop()


def _guarded_api(guarded, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"https://127.0.0.1:{guarded.server.http_port}/v1",
                         api_key=key, max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(
                             verify=ssl.create_default_context(cafile=str(guarded.cert))))


def test_tokens_pass_through_to_the_grpc_check(guarded, assets):
    model = str(assets.model)  # (the default served name: the --model value)
    with _guarded_api(guarded, GENERATE_TOKEN) as api:
        out = api.completions.create(model="alpha", prompt=PROMPT, max_tokens=3)
        assert out.usage.completion_tokens == 3
        assert {m.id for m in api.models.list().data} >= {model, "alpha"}  # (the admin token lists)
        with pytest.raises(openai.BadRequestError, match="needs a server started with "
                                                          "--tool-call-parser"):
            api.chat.completions.create(model="alpha", messages=MESSAGES, tools=TOOLS)  # auto
    tls = ssl.create_default_context(cafile=str(guarded.cert))
    load = f"https://127.0.0.1:{guarded.server.http_port}/v1/load_lora_adapter"
    for token, status in ((GENERATE_TOKEN, 403), ("", 401), (ADMIN_TOKEN, 200)):
        assert _post(load, {"lora_name": "beta", "lora_path": "beta"}, token, tls)[0] == status
    with _guarded_api(guarded, "wrong") as api:
        with pytest.raises(openai.PermissionDeniedError, match="not valid"):
            api.completions.create(model="alpha", prompt=PROMPT, max_tokens=3)
        with pytest.raises(openai.PermissionDeniedError):
            api.models.list()
    with _guarded_api(guarded, GENERATE_TOKEN) as api:  # stored responses: the same check
        kept = api.responses.create(model="alpha", input=PROMPT, max_output_tokens=2)
        assert api.responses.retrieve(kept.id).id == kept.id
    for token in (ADMIN_TOKEN, "wrong"):
        with _guarded_api(guarded, token) as api:
            with pytest.raises(openai.PermissionDeniedError, match="not valid"):
                api.responses.retrieve(kept.id)
    status, body = _http(f"https://127.0.0.1:{guarded.server.http_port}/v1/completions",
                         json.dumps({"model": "alpha", "prompt": PROMPT}).encode(),
                         {"Content-Type": "application/json"},  # and no Authorization
                         ssl.create_default_context(cafile=str(guarded.cert)))
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert "authorization: Bearer" in body["error"]["message"]


# ---------------------------------------------------------------- random bodies

_VALUES = [None, True, 0, -1, 3, 2**40, 0.5, float("inf"), "", "x", "alpha", [], [1, 2], ["a"],
           [[]], [{"role": "user", "content": "hi"}], {}, {"type": "json_schema"},
           {"a": 1}, {"1": "x"}, {"json_schema": "x", "type": "json_schema"},
           [{"role": 1}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
           [[-1]], [-1], [1.5], {"type": "json_object"}, {"type": "nope"}]
_FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stream",
           "stop", "seed", "logprobs", "top_logprobs", "echo", "logit_bias", "response_format",
           "stream_options", "best_of", "user", "guided_choice", "guided_json", "top_k",
           "stop_token_ids", "truncate_prompt_tokens", "priority", "tools", "functions",
           "tool_choice", "parallel_tool_calls", "skip_special_tokens",
           "continue_final_message", "add_generation_prompt", "chat_template_kwargs",
           "max_completion_tokens", "min_tokens", "allowed_token_ids", "suffix",
           "prompt_logprobs", "bad_words", "structured_outputs", "add_special_tokens"]


def _post_fuzzed(base: str, cases) -> dict[int, int]:
    """POST each (path, body): 200 or a 4xx with the API's error body (OpenAI's, or TGI's
    on the LoRAX routes), never a 500; how many of each status."""
    seen: dict[int, int] = {}
    for path, body in cases:
        try:
            data = json.dumps(body, allow_nan=True).encode()
        except ValueError:
            continue
        status, out = _raw(f"{base}{path}", data)
        seen[status] = seen.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (status, body, out)
        if status != 200:
            error = json.loads(out)
            if path.startswith("/v1/"):
                assert set(error["error"]) == {"message", "type", "param", "code"}, out
            else:
                assert set(error) == {"error", "error_type"}, out
    return seen


def test_random_bodies_get_an_answer_or_a_4xx_never_a_500(served):
    """Values of every JSON type in every field: each body gets 200 or a 4xx with OpenAI's
    error body; never a 500 (a bug), and the server keeps serving."""
    import random

    rng = random.Random(7)
    base = f"http://127.0.0.1:{served.server.http_port}"

    def case():
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        body = {"model": "alpha", "max_tokens": 2}
        body["prompt" if path == "/v1/completions" else "messages"] = (
            "hi" if path == "/v1/completions" else [{"role": "user", "content": "hi"}])
        for name in rng.sample(_FIELDS, rng.randint(1, 4)):
            body[name] = rng.choice(_VALUES)
        return path, body
    seen = _post_fuzzed(base, (case() for _ in range(800)))
    assert seen.get(200) and len(seen) > 1, seen
    assert _http(f"{base}/health") == (200, {"status": "SERVING"})


_RESPONSES_FIELDS = ["input", "instructions", "max_output_tokens", "temperature", "top_p",
                     "tools", "tool_choice", "parallel_tool_calls", "text", "stream",
                     "store", "metadata", "previous_response_id", "background", "include",
                     "reasoning", "truncation", "top_k", "messages", "n"]
_RESPONSES_VALUES = [*_VALUES, [{"type": "function_call"}],
                     [{"type": "function_call_output", "call_id": 1, "output": ["x"]}],
                     [{"type": "message", "role": "user", "content": None}],
                     {"format": {"type": "json_schema"}}, {"format": "x"},
                     [{"type": "function", "name": 5}], {"type": "function"}]
_LORAX_PARAMETERS = ["adapter_id", "adapter_source", "merged_adapters", "do_sample",
                     "max_new_tokens", "ignore_eos_token", "repetition_penalty",
                     "return_full_text", "stop", "seed", "temperature", "top_k", "top_p",
                     "truncate", "typical_p", "best_of", "watermark", "details",
                     "decoder_input_details", "return_k_alternatives", "response_format",
                     "grammar", "top_n_tokens", "frequency_penalty", "n"]


def test_random_responses_and_lorax_bodies_never_get_a_500(served):
    """The same for /v1/responses (OpenAI's error body) and LoRAX's /generate and / (TGI's
    {"error", "error_type"})."""
    import random

    rng = random.Random(9)
    base = f"http://127.0.0.1:{served.server.http_port}"

    def case(lorax: bool):
        if lorax:
            body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
            for name in rng.sample(_LORAX_PARAMETERS, rng.randint(1, 4)):
                body["parameters"][name] = rng.choice(_RESPONSES_VALUES)
            return rng.choice(["/generate", "/", "/generate_stream"]), body
        body = {"model": "alpha", "input": "hi", "max_output_tokens": 2}
        for name in rng.sample(_RESPONSES_FIELDS, rng.randint(1, 4)):
            body[name] = rng.choice(_RESPONSES_VALUES)
        return "/v1/responses", body
    seen = _post_fuzzed(base, (case(i % 2 == 1) for i in range(500)))
    assert seen.get(200) and len(seen) > 1, seen
    assert _http(f"{base}/health") == (200, {"status": "SERVING"})


def test_random_adapter_admin_bodies_never_get_a_500(assets):
    """load / unload_lora_adapter with values of every type, on a server of its own: 200
    or a 4xx with OpenAI's error body, and the server still answers."""
    import random

    rng = random.Random(11)
    names = ["alpha", "beta", "x", "alpha@1", "", "../up", "a" * 300, "a b", 3, None, True,
             [], {}, "alpha_v2"]
    s = RunningServer(make_config(assets, http_port=free_port())).start()
    try:
        base = f"http://127.0.0.1:{s.server.http_port}/v1"
        seen: dict[int, int] = {}
        for _ in range(150):
            path = rng.choice(["/load_lora_adapter", "/unload_lora_adapter"])
            body = {"lora_name": rng.choice(names[:4]), "lora_path": rng.choice(names[:4])}
            if path == "/unload_lora_adapter":
                del body["lora_path"]
            for k in rng.sample(["lora_name", "lora_path", "load_inplace", "lora_int_id",
                                 "model"], rng.randint(0, 2)):
                body[k] = rng.choice(names + [1.5, -1, False])
            status, out = _raw(base + path, json.dumps(body).encode())
            seen[status] = seen.get(status, 0) + 1
            assert status == 200 or 400 <= status < 500, (status, body, out)
            if status != 200:
                assert set(json.loads(out)["error"]) == {"message", "type", "param", "code"}
        assert seen.get(200) and len(seen) > 2, seen
        assert _http(f"{base[:-3]}/health") == (200, {"status": "SERVING"})
    finally:
        s.stop()


def _raw(url: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_a_stream_in_flight_at_shutdown_finishes(assets):
    """SIGTERM's graceful stop: the HTTP listener closes, a stream already running gets its
    whole answer within the grace period."""
    s = RunningServer(make_config(assets, http_port=free_port())).start()  # (grace: 5 s)
    try:
        port = s.server.http_port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        lines = [resp.readline()]  # the first event...
        assert s.metric("loraplex_running_requests") == 1  # ...and it is still running
        stopping = s.begin_shutdown()
        lines += list(resp)
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
        assert lines[-2:] == [b"data: [DONE]\n", b"\n"]
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 120  # all of it arrived
        stopping.result(60)
        with pytest.raises(OSError):  # the listener is closed
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
    finally:
        s.stop()
