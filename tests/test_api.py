"""End-to-end tests of the gRPC API against real servers (tiny random Llama, real
engine, real Prometheus endpoint). Fixtures: conftest_api.py."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import threading
import time

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

from conftest_api import (ADMIN_TOKEN, GENERATE_TOKEN, MAX_LEN, RunningServer,  # noqa: F401
                          assets, guarded_server, make_config, server)
from loraplex import errors
from loraplex.api.errors import status_of
from loraplex.api.servicers import _deadline
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex_client import (AsyncClient, Client, DeadlineExceeded, FailedPrecondition,
                             Internal, InvalidArgument, NotFound, PermissionDenied,
                             ResourceExhausted, Unauthenticated, Unavailable)
from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc
from models import BOS_ID, EOS_ID, VOCAB_SIZE

PROMPT = "Hello, world"
LONG = dict(max_new_tokens=16000, ignore_eos=True)  # ~40 s on the tiny model: tests cancel it long before
# labels of loraplex_requests_total for a request naming an adapter, not a route
UNROUTED = dict(version="", route="")


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def refs(client) -> dict[str, str]:
    """name -> name@version of the current versions."""
    return {a.name: a.ref for a in client.list_adapters() if a.current}


def split(ref: str) -> dict[str, str]:
    """name@version -> the engine metrics' labels {adapter: name, version: version}."""
    name, _, version = ref.partition("@")
    return {"adapter": name, "version": version}


def in_use(client, name: str) -> int:
    return sum(a.in_use for a in client.list_adapters(name))


def wait_in_use(client, name: str, expected: int, timeout: float = 10) -> int:
    """Poll until `expected` requests hold `name` (the engine releases an adapter at
    its next step, after the call has already ended for the client)."""
    deadline = time.monotonic() + timeout
    while (n := in_use(client, name)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


# ---------------------------------------------------------------- reference outputs

@pytest.fixture(scope="module")
def reference(assets):
    """Greedy continuation by HF transformers (+ PEFT for adapters), no KV cache."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model)
    cache = {}

    def model_for(adapter: str):
        if adapter not in cache:
            m = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32)
            if adapter:
                m = PeftModel.from_pretrained(m, assets.adapter_root / adapter)
            cache[adapter] = m.eval()
        return cache[adapter]

    @torch.no_grad()
    def greedy(prompt: str, adapter: str, n: int) -> list[int]:
        ids = tok.encode(prompt)
        model = model_for(adapter)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-n:]

    return greedy


# ---------------------------------------------------------------- health, reflection

def test_health_serving_for_server_and_each_service(client):
    assert client.health() == "SERVING"
    assert client.health("loraplex.v1.Generation") == "SERVING"
    assert client.health("loraplex.v1.Adapters") == "SERVING"


def test_reflection_lists_and_describes_the_services(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        gen = pool.FindServiceByName("loraplex.v1.Generation")
        assert [m.name for m in gen.methods] == ["Generate", "GenerateStream", "Tokenize",
                                                 "Detokenize"]
        assert gen.methods_by_name["GenerateStream"].server_streaming
        adm = pool.FindServiceByName("loraplex.v1.Adapters")
        assert {m.name for m in adm.methods} == {"ListAdapters", "LoadAdapter", "UnloadAdapter",
                                                 "SwapAdapter", "MergeAdapters"}


# ---------------------------------------------------------------- generation

def test_generate_greedy_matches_transformers_and_peft(client, reference):
    current = refs(client)
    for adapter in ("", "alpha", "beta"):
        result = client.generate(PROMPT, adapter=adapter, max_new_tokens=12, ignore_eos=True)
        assert list(result.token_ids) == reference(PROMPT, adapter, 12), adapter
        assert result.finish_reason == "length"
        assert result.completion_tokens == 12 and result.prompt_tokens == len(PROMPT)
        assert result.adapter == (current[adapter] if adapter else "")
    # the adapters really change the output
    outs = {a: client.generate(PROMPT, adapter=a, max_new_tokens=12, ignore_eos=True).token_ids
            for a in ("", "alpha", "beta")}
    assert len(set(outs.values())) == 3


def test_stream_chunks_add_up_to_the_unary_answer(client):
    whole = client.generate(PROMPT, adapter="alpha", max_new_tokens=20, ignore_eos=True)
    chunks = list(client.stream(PROMPT, adapter="alpha", max_new_tokens=20, ignore_eos=True))
    assert len(chunks) == 20  # one message per step
    assert all(len(c.token_ids) == 1 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None] * 19 + ["length"]
    assert [c.completion_tokens for c in chunks] == list(range(1, 21))
    assert tuple(t for c in chunks for t in c.token_ids) == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].adapter == whole.adapter == refs(client)["alpha"]


def _mixed_batches(server) -> float:
    """Forward passes so far that held more than one adapter."""
    return (server.metric("loraplex_batch_adapters_count")
            - server.metric("loraplex_batch_adapters_bucket", le="1.0"))


def test_concurrent_mixed_adapters_equal_the_same_requests_alone(server, client):
    alpha_exact = refs(client)["alpha"]
    jobs = [(p, a, n) for p, n in (("abc", 9), ("Hello, world", 14), ("zz top", 6))
            for a in ("", "alpha", "beta", alpha_exact)]

    async def run():
        async with AsyncClient(server.target, timeout=60) as c:
            alone = [await c.generate(p, adapter=a, max_new_tokens=n, ignore_eos=True)
                     for p, a, n in jobs]
            together = await asyncio.gather(*[
                c.generate(p, adapter=a, max_new_tokens=n, ignore_eos=True) for p, a, n in jobs])
            return alone, together

    mixed = _mixed_batches(server)
    alone, together = asyncio.run(run())
    for job, x, y in zip(jobs, alone, together):
        assert x.token_ids == y.token_ids, job
        assert x.adapter == y.adapter and len(x.token_ids) == job[2]
    # the concurrent requests really shared forward passes across adapters
    assert _mixed_batches(server) > mixed


def test_input_ids_and_chat_messages(client, assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model)
    by_text = client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    by_ids = client.generate(input_ids=tok.encode(PROMPT), max_new_tokens=8, ignore_eos=True)
    assert by_ids.token_ids == by_text.token_ids

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<system>be brief\n<user>hi\n<assistant>"
    chat = client.generate(messages=messages, adapter="beta", max_new_tokens=8, ignore_eos=True)
    plain = client.generate(input_ids=tok.encode(rendered, add_special_tokens=False),
                            adapter="beta", max_new_tokens=8, ignore_eos=True)
    assert chat.prompt_tokens == len(rendered)
    assert chat.token_ids == plain.token_ids


def test_continue_final_message_and_template_kwargs_reach_the_template(client, assets):
    """vLLM's continue_final_message (the assistant's last message left open) and
    chat_template_kwargs (template variables), rendered as apply_chat_template does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model)
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    rendered = tok.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    assert rendered.endswith("<assistant>Sure, ")
    tokens = client.tokenize(messages=prefill, continue_final_message=True)
    assert list(tokens.token_ids) == tok.encode(rendered, add_special_tokens=False)
    out = client.generate(messages=prefill, continue_final_message=True, max_new_tokens=3,
                          ignore_eos=True)
    assert out.prompt_tokens == len(tokens.token_ids)
    turn = prefill[:1]
    quiet = client.tokenize(messages=turn, chat_template_kwargs={"enable_thinking": False})
    want = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert want.endswith("<nothink><assistant>")
    assert list(quiet.token_ids) == tok.encode(want, add_special_tokens=False)
    assert client.tokenize(messages=turn, chat_template_kwargs={"enable_thinking": True}) \
        == client.tokenize(messages=turn)
    for kw, says in ((dict(continue_final_message=True), "the last message's role is 'user'"),
                     (dict(chat_template_kwargs={"tools": []}), "cannot set ['tools']"),
                     (dict(chat_template_kwargs=[1]), "must be a JSON object"),
                     (dict(chat_template_kwargs="{x"), "chat_template_kwargs is not JSON")):
        with pytest.raises(InvalidArgument, match=re.escape(says)):
            client.tokenize(messages=turn, **kw)
    with pytest.raises(TypeError, match="go with messages"):
        client.tokenize("hi", continue_final_message=True)


def test_chat_tools_and_tool_calls_reach_the_template(client, assets):
    """The template gets tools (OpenAI's shape) and an assistant's tool_calls with their
    arguments as objects (HF's shape), as apply_chat_template takes them from Python."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model)
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "call_1", "function": {
                     "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1",
                 "name": "get_weather"}]
    hf = [messages[0], {**messages[1], "tool_calls": [{"id": "call_1", "type": "function",
                                                       "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Paris"}}}]},
          messages[2]]
    rendered = tok.apply_chat_template(hf, tools=[tool], tokenize=False,
                                       add_generation_prompt=True)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered
    assert rendered.startswith('<tools>[{"type": "function"')
    tokens = client.tokenize(messages=messages, tools=[tool])
    assert list(tokens.token_ids) == tok.encode(rendered, add_special_tokens=False)
    out = client.generate(messages=messages, tools=[tool], max_new_tokens=4, ignore_eos=True)
    assert out.prompt_tokens == len(tokens.token_ids)
    bad_args = [messages[0], {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "{city"}}]}]
    with pytest.raises(InvalidArgument, match=r"messages\[1\].tool_calls\[0\].arguments is not "
                                              "JSON"):
        client.generate(messages=bad_args, max_new_tokens=2)
    with pytest.raises(InvalidArgument, match=r"tools\[0\].parameters must be a JSON schema "
                                              "object"):
        client.generate(messages=messages[:1], tools=[{"name": "f", "parameters": "[1]"}],
                        max_new_tokens=2)
    with pytest.raises(InvalidArgument, match=r"tools\[0\].name is empty"):
        client.generate(messages=messages[:1], tools=[{"name": ""}], max_new_tokens=2)


def test_tokenize_and_detokenize_are_what_generate_sees_and_writes(server, client, assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model)
    tokens = client.tokenize(PROMPT)
    assert tokens.token_ids == tuple(tok.encode(PROMPT)) and tokens.max_model_len == MAX_LEN
    out = client.generate(PROMPT, adapter="alpha", max_new_tokens=12, ignore_eos=True)
    assert out.prompt_tokens == len(tokens.token_ids)
    assert client.detokenize(out.token_ids) == out.text
    messages = [("system", "be brief"), ("user", "hi")]
    chat = client.tokenize(messages=messages).token_ids
    assert len(chat) == client.generate(messages=messages, max_new_tokens=1).prompt_tokens
    assert chat == tuple(tok.encode("<system>be brief\n<user>hi\n<assistant>",
                                    add_special_tokens=False))
    assert client.detokenize([]) == ""
    with pytest.raises(InvalidArgument, match=r"outside the vocabulary \[0, "):
        client.detokenize([5, VOCAB_SIZE])
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        client.tokenize("")
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GenerationStub(channel).Tokenize(pb.TokenizeRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "set one of prompt, messages"


def test_logprobs_and_top_alternatives(client):
    r = client.generate(PROMPT, adapter="alpha", max_new_tokens=6, ignore_eos=True,
                        logprobs=True, top_logprobs=3)
    assert len(r.logprobs) == 6
    for tok, lp in zip(r.token_ids, r.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0] == (tok, pytest.approx(lp.logprob, abs=1e-5))  # greedy = most likely
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
    # each token's bytes, which may split a character (the text shows U+FFFD for one never
    # completed)
    assert b"".join(lp.token for lp in r.logprobs).decode(errors="replace") == r.text
    assert client.generate(PROMPT, max_new_tokens=2).logprobs == ()


def test_prompt_logprobs_unary_and_streamed(client):
    """One score per prompt token after the first, in the answer and in a stream's first
    message only; the same values both ways; the prompt is still answered as without."""
    ids = [7, 30, 41, 52, 63, 74, 85]
    plain = client.generate(input_ids=ids, adapter="alpha", max_new_tokens=4, ignore_eos=True)
    r = client.generate(input_ids=ids, adapter="alpha", max_new_tokens=4, ignore_eos=True,
                        prompt_logprobs=2)
    assert r.token_ids == plain.token_ids and plain.prompt_logprobs == ()
    assert [lp.token_id for lp in r.prompt_logprobs] == ids[1:]
    for lp in r.prompt_logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
        assert lp.top[0][1] >= lp.logprob  # the likeliest is at least as likely
    chunks = list(client.stream(input_ids=ids, adapter="alpha", max_new_tokens=4,
                                ignore_eos=True, prompt_logprobs=2))
    assert chunks[0].prompt_logprobs == r.prompt_logprobs  # (fp32: the same arithmetic)
    assert all(c.prompt_logprobs == () for c in chunks[1:]) and len(chunks) > 1
    alone = client.generate(input_ids=ids, adapter="alpha", max_new_tokens=1,
                            prompt_logprobs=0)  # 0 is on: the prompt tokens' alone
    assert [(lp.token_id, lp.top) for lp in alone.prompt_logprobs] == [(t, ()) for t in ids[1:]]
    assert [lp.logprob for lp in alone.prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in r.prompt_logprobs], abs=1e-5)


def test_logit_bias_and_allowed_token_ids_steer_the_output(client):
    """A +100 bias makes greedy repeat one token; allowed ids bound a sampled output; the
    logprobs stay the model's own (the forced token is not the likeliest)."""
    plain = client.generate(PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=True,
                            top_logprobs=1)
    forced = next(t for t in range(40, 80) if t not in plain.token_ids)
    r = client.generate(PROMPT, max_new_tokens=6, ignore_eos=True, logit_bias={forced: 100},
                        logprobs=True, top_logprobs=1)
    assert r.token_ids == (forced,) * 6
    assert r.logprobs[0].top == plain.logprobs[0].top  # raw: the same distribution
    assert r.logprobs[0].logprob < r.logprobs[0].top[0][1]
    # accepted: min_tokens bans nothing allowed here (EOS ignored; no min_tokens; 60 left)
    for allowed, extra in (((EOS_ID,), dict(min_tokens=1)), ((59,), dict(stop_token_ids=[59])),
                           ((59, 60), dict(stop_token_ids=[59], min_tokens=1))):
        got = client.generate(PROMPT, max_new_tokens=3, ignore_eos=True,
                              allowed_token_ids=allowed, **extra)
        assert got.token_ids[0] == allowed[-1], allowed
    labels = (41, 57, 63)
    sampled = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True, temperature=1.5,
                              seed=3, allowed_token_ids=labels)
    assert set(sampled.token_ids) <= set(labels) and len(sampled.token_ids) == 12


def test_guided_choice_and_regex_shape_the_output(client):
    """The text is one of the choices / a full match of the regex, in a unary answer and in
    a stream; it ends (STOP) once nothing can extend the match."""
    choices = ["red", "green", "blue sky"]
    r = client.generate(PROMPT, max_new_tokens=20, guided_choice=choices)
    assert r.text in choices and r.finish_reason == "stop"
    pattern = r"\d{3}-[a-z]{2,4}!"
    chunks = list(client.stream(PROMPT, max_new_tokens=20, guided_regex=pattern,
                                temperature=1.0, seed=5))
    text = "".join(c.text for c in chunks)
    assert re.fullmatch(pattern, text) and chunks[-1].finish_reason == "stop", text
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}}, "required": ["ok"]}
    r = client.generate(PROMPT, max_new_tokens=30, guided_json=schema)  # (a dict is sent as JSON)
    doc = json.loads(r.text)
    assert isinstance(doc["ok"], bool) and doc.get("n", 1) in (1, 2, 3)


def test_guides_compile_off_the_event_loop(server, client, monkeypatch):
    """A guide is compiled on a worker thread before the request reaches the engine (a big
    schema takes hundreds of ms of Python, which would stall every stream on the loop)."""
    guides = server.server.engine.guides
    compiled_on = []
    real_get = guides.get

    def get(key):
        compiled_on.append(threading.current_thread())
        return real_get(key)

    monkeypatch.setattr(guides, "get", get)
    out = client.generate(PROMPT, max_new_tokens=8, guided_regex="[a-z]{3}z")
    assert len(out.text) == 4 and out.text.endswith("z")
    loop_thread = server._thread
    assert compiled_on[0] is not loop_thread  # prepared on a worker
    assert all(t is loop_thread for t in compiled_on[1:])  # then found by validate & enqueue
    assert len(compiled_on) == 3
    with pytest.raises(InvalidArgument, match="missing '\\)'"):  # the worker's error
        client.generate(PROMPT, guided_regex="(ab")


def test_stop_token_ids_and_seeded_sampling(client):
    greedy = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    stop = greedy[4]
    r = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop])
    assert r.finish_reason == "stop"
    assert r.token_ids == greedy[:greedy.index(stop) + 1]
    sampled = [client.generate(PROMPT, max_new_tokens=10, ignore_eos=True, temperature=1.0,
                               top_p=0.9, seed=1234).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_n_completions_unary_and_streamed(client):
    """n = 3 seeded: completion i is the single request with seed + i, in the unary
    answer's completions (completion 0's also on top) and in a stream whose messages
    interleave by index, each completion ending once; prompt logprobs come once."""
    args = dict(adapter="alpha", max_new_tokens=8, ignore_eos=True, temperature=1.0,
                logprobs=True)
    alone = [client.generate(PROMPT, seed=77 + i, **args) for i in range(3)]
    r = client.generate(PROMPT, seed=77, n=3, prompt_logprobs=1, **args)
    assert [c.index for c in r.completions] == [0, 1, 2]
    assert [c.token_ids for c in r.completions] == [a.token_ids for a in alone]
    assert [c.text for c in r.completions] == [a.text for a in alone]
    assert [c.finish_reason for c in r.completions] == ["length"] * 3
    assert [c.completion_tokens for c in r.completions] == [8] * 3
    assert [[lp.token_id for lp in c.logprobs] for c in r.completions] == [
        list(a.token_ids) for a in alone]
    assert (r.text, r.token_ids, r.logprobs) == (alone[0].text, alone[0].token_ids,
                                                 r.completions[0].logprobs)
    assert r.prompt_tokens == alone[0].prompt_tokens and len(r.prompt_logprobs) == \
        r.prompt_tokens - 1
    assert r.adapter == refs(client)["alpha"]
    chunks = list(client.stream(PROMPT, seed=77, n=3, prompt_logprobs=1, **args))
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id
    assert sorted(c.index for c in chunks[:3]) == [0, 1, 2]  # interleaved, step by step
    for i, a in enumerate(alone):
        mine = [c for c in chunks if c.index == i]
        assert tuple(t for c in mine for t in c.token_ids) == a.token_ids
        assert [c.finish_reason for c in mine] == [None] * 7 + ["length"]
    assert [len(c.prompt_logprobs) for c in chunks if c.prompt_logprobs] == [
        r.prompt_tokens - 1]
    one = client.generate(PROMPT, seed=77, **args)  # n = 1: one completion, the top fields
    assert [(c.index, c.token_ids) for c in one.completions] == [(0, alone[0].token_ids)]


def test_n_completions_error_ends_the_call(client):
    """The completions' error (a guide the vocabulary cannot spell ends them INVALID) ends
    the call, INVALID_ARGUMENT, and every completion lets go of its adapter."""
    with pytest.raises(InvalidArgument, match="no token of the vocabulary continues"):
        # the test tokenizer has no token for the bytes 0x1c-0x1f
        client.generate(PROMPT, adapter="beta", n=2, guided_regex="\x1c+", max_new_tokens=4)
    assert wait_in_use(client, "beta", 0) == 0


def test_min_tokens_holds_back_stop_tokens_and_strings(client):
    greedy = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
    stop = greedy.token_ids[1]
    r = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop],
                        min_tokens=6)
    assert len(r.token_ids) >= 6 and stop not in r.token_ids[:6]  # banned for the first 6
    assert r.finish_reason == "length" or r.token_ids[-1] == stop
    # a stop string is not looked for before min_tokens (it bans no token: same tokens)
    word = greedy.text[1:3]
    cut = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True, stop=[word])
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 10
    whole = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True, stop=[word],
                            min_tokens=10)
    assert (whole.token_ids, whole.text, whole.finish_reason) == (greedy.token_ids, greedy.text,
                                                                  "length")


def test_truncate_prompt_tokens_keeps_the_inputs_end(client, assets):
    """The answer is that of the input's last N tokens sent as input_ids; a chat keeps its
    end (the assistant's turn); 0 is INVALID_ARGUMENT; N above the length changes nothing."""
    ids = client.tokenize(PROMPT).token_ids
    args = dict(adapter="alpha", max_new_tokens=6, ignore_eos=True)
    cut = client.generate(PROMPT, truncate_prompt_tokens=4, **args)
    assert cut.prompt_tokens == 4
    assert cut.token_ids == client.generate(input_ids=ids[-4:], **args).token_ids
    assert client.generate(PROMPT, truncate_prompt_tokens=999, **args).token_ids == \
        client.generate(PROMPT, **args).token_ids
    messages = [("system", "be brief"), ("user", "hi")]
    chat = client.tokenize(messages=messages).token_ids
    r = client.generate(messages=messages, truncate_prompt_tokens=5, **args)
    assert r.token_ids == client.generate(input_ids=chat[-5:], **args).token_ids
    with pytest.raises(InvalidArgument, match="truncate_prompt_tokens must be >= 1"):
        client.generate(PROMPT, truncate_prompt_tokens=0, **args)


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    greedy = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    word = greedy.text[3:5]
    start = greedy.text.index(word)
    args = dict(max_new_tokens=12, ignore_eos=True, stop=[word])
    left_out = client.generate(PROMPT, **args)
    kept = client.generate(PROMPT, include_stop_str_in_output=True, **args)
    assert left_out.text == greedy.text[:start]
    assert kept.text == greedy.text[:start + len(word)] and kept.finish_reason == "stop"
    assert kept.token_ids == left_out.token_ids
    streamed = list(client.stream(PROMPT, include_stop_str_in_output=True, **args))
    assert "".join(c.text for c in streamed) == kept.text


def test_presence_and_frequency_penalties_change_greedy_choices(client):
    """Greedy output of a small random model repeats itself; a strong frequency penalty
    makes every token differ from those before it (a count of 1 costs 2 logits) or not."""
    plain = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids
    assert len(set(plain)) < len(plain)  # the premise: it repeats
    for penalty in ("frequency_penalty", "presence_penalty"):
        pushed = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True,
                                 **{penalty: 2.0}).token_ids
        assert pushed != plain and len(set(pushed)) > len(set(plain)), penalty


def test_async_client_stream_and_early_close(server):
    async def run():
        async with AsyncClient(server.target, timeout=60) as c:
            chunks = [ch async for ch in c.stream(PROMPT, adapter="beta", max_new_tokens=5,
                                                  ignore_eos=True)]
            whole = await c.generate(PROMPT, adapter="beta", max_new_tokens=5, ignore_eos=True)
            stream = c.stream(PROMPT, adapter="beta", **LONG)
            first = await stream.__anext__()
            await stream.aclose()  # cancels the call
            return chunks, whole, first

    chunks, whole, first = asyncio.run(run())
    assert tuple(t for ch in chunks for t in ch.token_ids) == whole.token_ids
    assert first.completion_tokens == 1
    with Client(server.target) as c:
        assert wait_in_use(c, "beta", 0) == 0


def test_client_sends_adapter_and_authorization_metadata():
    with Client("127.0.0.1:1", token="t0k") as c:
        assert c._metadata("alpha@v1") == (("x-loraplex-adapter", "alpha@v1"),
                                           ("authorization", "Bearer t0k"))
    with Client("127.0.0.1:1") as c:
        assert c._metadata("") == (("x-loraplex-adapter", ""),)


# ---------------------------------------------------------------- status codes

@pytest.mark.parametrize("cls", [c for c in vars(errors).values() if isinstance(c, type)
                                 and issubclass(c, errors.LoraplexError)
                                 and c is not errors.LoraplexError])
def test_every_domain_error_has_its_status_code(cls):
    code = status_of(cls("x"))
    assert code.name == re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()
    assert status_of(ValueError("bug")) == grpc.StatusCode.INTERNAL


class _ExpiredContext:
    def time_remaining(self):
        return -0.001


def test_an_expired_deadline_never_reaches_the_engine():
    with pytest.raises(errors.DeadlineExceeded):
        _deadline(_ExpiredContext())


def _raw_generate(target: str, request: pb.GenerateRequest, stream: bool):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        if stream:
            return list(stub.GenerateStream(request, timeout=30))
        return stub.Generate(request, timeout=30)


BAD_REQUESTS = {
    "no input": (pb.GenerateRequest(), "set one of prompt, input_ids, messages"),
    "empty prompt": (pb.GenerateRequest(prompt=""), "prompt is empty"),
    "empty input_ids": (pb.GenerateRequest(input_ids=pb.TokenIds()), "empty"),
    "empty messages": (pb.GenerateRequest(messages=pb.ChatMessages()), "messages is empty"),
    "message without role": (pb.GenerateRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(content="x")])), "role"),
    "id outside vocab": (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, VOCAB_SIZE])), "["),
    "negative temperature": (pb.GenerateRequest(prompt="a", temperature=-1), "temperature"),
    "temperature too high": (pb.GenerateRequest(prompt="a", temperature=1e4), "temperature"),
    "top_p 0": (pb.GenerateRequest(prompt="a", top_p=0), "top_p"),
    "repetition_penalty 0": (pb.GenerateRequest(prompt="a", repetition_penalty=0), "repetition"),
    "max_new_tokens 0": (pb.GenerateRequest(prompt="a", max_new_tokens=0), "max_new_tokens"),
    "prompt too long": (pb.GenerateRequest(prompt="a" * MAX_LEN), "context"),
    "completion too long": (pb.GenerateRequest(prompt="a", max_new_tokens=MAX_LEN), "context"),
    "too many top_logprobs": (pb.GenerateRequest(prompt="a", top_logprobs=21), "top_logprobs"),
    "too many prompt_logprobs": (pb.GenerateRequest(prompt="a", prompt_logprobs=21),
                                 "prompt_logprobs"),
    "presence_penalty 3": (pb.GenerateRequest(prompt="a", presence_penalty=3), "presence_penalty"),
    "frequency_penalty -3": (pb.GenerateRequest(prompt="a", frequency_penalty=-3),
                             "frequency_penalty"),
    "min_p above 1": (pb.GenerateRequest(prompt="a", min_p=1.5), "min_p"),
    "min_tokens over max_new_tokens": (pb.GenerateRequest(prompt="a", max_new_tokens=4,
                                                          min_tokens=5), "min_tokens"),
    "stop token outside vocab": (pb.GenerateRequest(prompt="a", stop_token_ids=[VOCAB_SIZE]),
                                 "stop_token_ids"),
    "logit bias above 100": (pb.GenerateRequest(prompt="a", logit_bias={5: 101.0}),
                             "logit_bias"),
    "logit bias outside vocab": (pb.GenerateRequest(prompt="a", logit_bias={VOCAB_SIZE: 1.0}),
                                 "logit_bias"),
    "too many logit biases": (pb.GenerateRequest(prompt="a",
                                                 logit_bias={i: 1.0 for i in range(1025)}),
                              "at most 1024"),
    "allowed id outside vocab": (pb.GenerateRequest(prompt="a", allowed_token_ids=[VOCAB_SIZE]),
                                 "allowed_token_ids"),
    "only banned ids allowed": (pb.GenerateRequest(prompt="a", allowed_token_ids=[9],
                                                   stop_token_ids=[9], min_tokens=1),
                                "allowed_token_ids"),
    "bad adapter ref": (pb.GenerateRequest(prompt="a", adapter="a@b@c"), "adapter"),
    "regex with a lookahead": (pb.GenerateRequest(prompt="a", guided_regex="a(?=b)"),
                               "lookaround"),
    "regex unbalanced": (pb.GenerateRequest(prompt="a", guided_regex="(ab"), "missing ')'"),
    "regex and choice": (pb.GenerateRequest(prompt="a", guided_regex="a", guided_choice=["b"]),
                         "at most one of guided_regex, guided_choice"),
    "choice and allowed ids": (pb.GenerateRequest(prompt="a", guided_choice=["b"],
                                                  allowed_token_ids=[5]), "allowed_token_ids"),
    "empty choice": (pb.GenerateRequest(prompt="a", guided_choice=["b", ""]), "non-empty"),
    "schema with a multipleOf": (pb.GenerateRequest(
        prompt="a", guided_json='{"type": "integer", "multipleOf": 2}'), "unsupported keywords"),
    "schema not JSON": (pb.GenerateRequest(prompt="a", guided_json="{type"), "not valid JSON"),
    "schema and regex": (pb.GenerateRequest(prompt="a", guided_json='{"type": "null"}',
                                            guided_regex="a"), "at most one of"),
    "n above 32": (pb.GenerateRequest(prompt="a", n=33), "n must be in [1, 32]"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument(server, case, stream):
    request, words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        _raw_generate(server.target, request, stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()


@pytest.mark.parametrize("adapter", ["nope", "alpha@000000000000"])
def test_unknown_adapter_is_not_found(client, adapter):
    with pytest.raises(NotFound):
        client.generate("a", adapter=adapter, max_new_tokens=2)
    with pytest.raises(NotFound):
        list(client.stream("a", adapter=adapter, max_new_tokens=2))


def test_request_input_never_answers_internal(server):
    """Odd but well-typed inputs: each gets a client-error code, none INTERNAL/UNKNOWN."""
    odd = [pb.GenerateRequest(prompt="a", adapter="../alpha"),
           pb.GenerateRequest(prompt="a", adapter="/etc/passwd"),
           pb.GenerateRequest(prompt="a", adapter="alpha@"),
           pb.GenerateRequest(prompt="a", adapter="@x"),
           pb.GenerateRequest(prompt="a", stop=[""]),
           pb.GenerateRequest(prompt="a", stop=["x" * 300]),
           pb.GenerateRequest(prompt="\x00\ud7ff\uffff", max_new_tokens=1),
           pb.GenerateRequest(input_ids=pb.TokenIds(ids=[2**32 - 1]))]
    for request in odd:
        try:
            _raw_generate(server.target, request, stream=False)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), \
                (request, err.details())


# ---------------------------------------------------------------- adapters service

def test_list_adapters_reports_loaded_and_disk_adapters(client):
    infos = {a.name: a for a in client.list_adapters()}
    alpha = infos["alpha"]
    assert alpha.current and alpha.rank == 8 and alpha.alpha == 16
    assert set(alpha.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert alpha.tier in ("gpu", "cpu") and alpha.size_bytes > 0 and len(alpha.version) >= 8
    assert infos["beta"].rank == 4 and set(infos["beta"].target_modules) == {
        "gate_proj", "up_proj", "down_proj"}
    assert infos["gamma"].tier == "disk"  # on disk under the root, never loaded
    assert [a.name for a in client.list_adapters("beta")] == ["beta"]
    with pytest.raises(NotFound):
        client.list_adapters("nope")


def test_load_swap_unload_lifecycle(client):
    info = client.load_adapter("delta", "gamma")
    assert (info.name, info.rank, info.current) == ("delta", 8, True)
    assert client.load_adapter("delta", "gamma").version == info.version  # idempotent
    with pytest.raises(Exception) as exc:
        client.load_adapter("delta", "alpha_v2")
    assert exc.value.code == grpc.StatusCode.ALREADY_EXISTS
    before = client.generate(PROMPT, adapter="delta", max_new_tokens=8, ignore_eos=True)
    assert before.adapter == info.ref

    swapped = client.swap_adapter("delta", "alpha_v2")
    assert swapped.version != info.version and swapped.current
    after = client.generate(PROMPT, adapter="delta", max_new_tokens=8, ignore_eos=True)
    assert after.adapter == swapped.ref and after.token_ids != before.token_ids
    assert [a.version for a in client.list_adapters("delta") if a.current] == [swapped.version]

    gone = client.unload_adapter("delta", drain=True)  # the last call may not have released it yet
    assert swapped.version in {a.version for a in gone}
    with pytest.raises(NotFound):
        client.generate(PROMPT, adapter="delta", max_new_tokens=2)
    with pytest.raises(NotFound):
        client.unload_adapter("delta")


@pytest.mark.parametrize("path", ["../outside", "/etc", "alpha/../../outside"])
def test_adapter_path_escaping_the_root_is_permission_denied(client, path):
    with pytest.raises(PermissionDenied):
        client.load_adapter("evil", path)


def test_adapter_calls_validate_their_fields(client):
    with pytest.raises(InvalidArgument):
        client.load_adapter("")
    with pytest.raises(InvalidArgument):
        client.swap_adapter("alpha", "")
    with pytest.raises(NotFound):
        client.load_adapter("ghost", "no_such_folder")
    with pytest.raises(InvalidArgument):
        client.merge_adapters("m", [])
    with pytest.raises(InvalidArgument):
        client.merge_adapters("m", ["alpha", "beta"], weights=[1.0])
    with pytest.raises(InvalidArgument):
        client.merge_adapters("m", ["alpha", "beta"], combination_type="no-such-type")


def test_unload_in_use_needs_drain(client):
    client.load_adapter("epsilon", "gamma")
    stream = client.stream(PROMPT, adapter="epsilon", **LONG)
    chunks = iter(stream)
    next(chunks)  # running now
    assert in_use(client, "epsilon") == 1
    with pytest.raises(FailedPrecondition):
        client.unload_adapter("epsilon")
    result = {}
    drainer = threading.Thread(
        target=lambda: result.setdefault("gone", client.unload_adapter("epsilon", drain=True)))
    drainer.start()
    stream.cancel()
    drainer.join(30)
    assert [a.name for a in result["gone"]] == ["epsilon"]
    with pytest.raises(NotFound):
        client.list_adapters("epsilon")


# ---------------------------------------------------------------- cancellation, deadlines

def test_cancelled_stream_leaves_the_batch(server, client):
    label, engine_label = "beta", split(refs(client)["beta"])
    cancelled = server.metric("loraplex_requests_total", adapter=label, **UNROUTED, status="CANCELLED")
    stream = client.stream(PROMPT, adapter="beta", **LONG)
    chunks = iter(stream)
    next(chunks)
    assert in_use(client, "beta") == 1
    assert server.metric("loraplex_running_requests") >= 1
    stream.cancel()
    assert server.wait_metric("loraplex_requests_total", lambda v: v == cancelled + 1,
                              adapter=label, **UNROUTED, status="CANCELLED") == cancelled + 1
    assert wait_in_use(client, "beta", 0) == 0
    generated = server.metric("loraplex_generated_tokens_total", **engine_label)
    assert client.generate("x", max_new_tokens=3).completion_tokens == 3
    # nothing more was generated for the cancelled request
    assert server.metric("loraplex_generated_tokens_total", **engine_label) == generated


def test_deadline_exceeded_frees_the_request(server, client):
    label = "alpha"  # the requests counter uses the reference as requested
    expired = server.metric("loraplex_requests_total", adapter=label, **UNROUTED, status="DEADLINE_EXCEEDED")
    with pytest.raises(DeadlineExceeded):
        client.generate(PROMPT, adapter="alpha", timeout=0.5, **LONG)
    with pytest.raises(DeadlineExceeded):
        list(client.stream(PROMPT, adapter="alpha", timeout=0.5, **LONG))
    assert server.wait_metric("loraplex_requests_total", lambda v: v == expired + 2,
                              adapter=label, **UNROUTED, status="DEADLINE_EXCEEDED") == expired + 2
    assert wait_in_use(client, "alpha", 0) == 0


def test_running_gauge_returns_to_zero_after_cancel(server, client):
    stream = client.stream(PROMPT, **LONG)
    chunks = iter(stream)  # held: a dropped iterator cancels the call when it is collected
    next(chunks)
    assert server.wait_metric("loraplex_running_requests", lambda v: v == 1) == 1
    stream.cancel()
    assert server.wait_metric("loraplex_running_requests", lambda v: v == 0) == 0


# ---------------------------------------------------------------- metrics

def test_metrics_count_served_requests_and_tokens(server, client):
    label = split(refs(client)["beta"])  # the engine's metrics: adapter=name, version=version
    ok = server.metric("loraplex_requests_total", adapter="beta", **UNROUTED, status="OK")
    tokens = server.metric("loraplex_generated_tokens_total", **label)
    prompt = server.metric("loraplex_prompt_tokens_total", **label)
    e2e = server.metric("loraplex_e2e_latency_seconds_count", **label)
    bad = server.metric("loraplex_requests_total", adapter="", **UNROUTED, status="INVALID_ARGUMENT")
    unknown = server.metric("loraplex_requests_total", adapter="_invalid", **UNROUTED, status="NOT_FOUND")
    client.generate(PROMPT, adapter="beta", max_new_tokens=7, ignore_eos=True)
    list(client.stream(PROMPT, adapter="beta", max_new_tokens=5, ignore_eos=True))
    with pytest.raises(InvalidArgument):
        client.generate("", max_new_tokens=2)
    with pytest.raises(NotFound):
        client.generate("a", adapter="no-such-adapter", max_new_tokens=2)
    m = server.scrape()
    key = lambda name, **kw: m.get((name, tuple(sorted(kw.items()))), 0.0)  # noqa: E731
    assert key("loraplex_requests_total", adapter="beta", **UNROUTED, status="OK") == ok + 2
    assert key("loraplex_generated_tokens_total", **label) == tokens + 12
    assert key("loraplex_prompt_tokens_total", **label) == prompt + 2 * len(PROMPT)
    assert key("loraplex_e2e_latency_seconds_count", **label) == e2e + 2
    assert key("loraplex_requests_total", adapter="", **UNROUTED, status="INVALID_ARGUMENT") == bad + 1
    assert key("loraplex_requests_total", adapter="_invalid", **UNROUTED, status="NOT_FOUND") == unknown + 1
    # the gauges as the last request left them, not as the step before it ended
    assert key("loraplex_running_requests") == 0 and key("loraplex_kv_cache_usage_ratio") == 0


# ---------------------------------------------------------------- TLS, auth, overload

def _guarded(server, token=None):
    return Client(server.target, token=token, tls=str(server.cert), timeout=60)


def test_tls_and_bearer_tokens(guarded_server):
    with _guarded(guarded_server) as anon:
        assert anon.health() == "SERVING"  # health stays open
        with pytest.raises(Unauthenticated):
            anon.generate("a", max_new_tokens=2)
        with pytest.raises(Unauthenticated):
            list(anon.stream("a", max_new_tokens=2))
        with pytest.raises(Unauthenticated):
            anon.list_adapters()
        with pytest.raises(Unauthenticated):
            anon.tokenize("a")
    with _guarded(guarded_server, token="wrong") as wrong:
        with pytest.raises(PermissionDenied):
            wrong.generate("a", max_new_tokens=2)
    with _guarded(guarded_server, token=GENERATE_TOKEN) as gen:
        assert gen.generate("a", adapter="alpha", max_new_tokens=3).completion_tokens == 3
        assert gen.detokenize(gen.tokenize("ab").token_ids) == "ab"
        with pytest.raises(PermissionDenied):  # the generate token is not an admin token
            gen.list_adapters()
    with _guarded(guarded_server, token=ADMIN_TOKEN) as admin:
        assert "alpha" in {a.name for a in admin.list_adapters()}
        with pytest.raises(PermissionDenied):
            admin.generate("a", max_new_tokens=2)
    # plaintext against the TLS port fails to connect
    with Client(guarded_server.target, token=GENERATE_TOKEN, timeout=5) as plain:
        with pytest.raises(Unavailable):
            plain.generate("a", max_new_tokens=2)


def test_messages_without_chat_template_is_invalid_argument(guarded_server):
    with _guarded(guarded_server, token=GENERATE_TOKEN) as c:
        with pytest.raises(InvalidArgument, match="chat template"):
            c.generate(messages=[("user", "hi")], max_new_tokens=2)


def test_full_queue_is_resource_exhausted_and_cancel_frees_the_slot(guarded_server):
    """max_num_seqs=1, max_queue=1: one runs, one waits, the third is refused."""
    s = guarded_server
    with _guarded(s, token=GENERATE_TOKEN) as c:
        first = c.stream("a", adapter="alpha", **LONG)
        first_chunks = iter(first)
        next(first_chunks)  # running
        second = c.stream("b", max_new_tokens=3, ignore_eos=True)
        assert s.wait_metric("loraplex_waiting_requests", lambda v: v == 1) == 1
        with pytest.raises(ResourceExhausted):
            c.generate("c", max_new_tokens=2)
        with pytest.raises(ResourceExhausted):
            list(c.stream("c", max_new_tokens=2))
        first.cancel()
        # the only slot is free again: the waiting request runs to its end
        chunks = list(second)
        assert sum(len(ch.token_ids) for ch in chunks) == 3
        assert chunks[-1].finish_reason == "length"
    assert s.metric("loraplex_requests_total", adapter="", **UNROUTED, status="RESOURCE_EXHAUSTED") >= 2


# ---------------------------------------------------------------- shutdown

def _wait_refused(port: int, timeout: float = 10) -> bool:
    """True once 127.0.0.1:port refuses connections."""
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.01)
    return False


def test_shutdown_refuses_new_calls_and_drains_streams(assets):
    s = RunningServer(make_config(assets, preload=())).start()
    try:
        with Client(s.target, timeout=60) as c:
            stream = c.stream(PROMPT, max_new_tokens=200, ignore_eos=True)
            chunks = iter(stream)
            first = next(chunks)
            shutdown = s.begin_shutdown(grace=60)
            s.run(s.server.shutting_down.wait())
            # The port closes at once (new connections refused: a proxy fails them
            # over) and open connections get GOAWAY. A call sent at the very instant
            # of the stop can still be dropped by grpc itself (see
            # test_calls_around_shutdown_end_ok_or_unavailable); one sent after it is
            # refused with UNAVAILABLE.
            assert _wait_refused(s.server.port)
            time.sleep(0.1)  # the GOAWAY reaches the client
            with pytest.raises(Unavailable):
                c.generate("a", max_new_tokens=2)
            rest = list(chunks)  # the call in flight finishes within the grace period
            assert 1 + len(rest) == 200 and rest[-1].finish_reason == "length"
            assert first.completion_tokens == 1 and rest[-1].completion_tokens == 200
            shutdown.result(60)
            assert s.server.engine._thread is None  # the engine was stopped afterwards
    finally:
        s.stop()


def test_calls_around_shutdown_end_ok_or_unavailable(assets):
    """Calls fired from 4 threads while the server shuts down, with a stream in
    flight, 8 rounds: none ends INTERNAL (a reset stream), and every call the server
    accepted ends OK (none cancelled by the stop: the drain waits for every call grpc
    accepted, not only those whose handler had started). The others are refused
    with UNAVAILABLE (never ran: safe to retry elsewhere), except, rarely, one that
    reaches grpc at the very instant of its stop, before any handler: grpc core drops
    it (CANCELLED, or no answer until the client's deadline) without the server seeing
    it: counted and printed."""
    import collections

    def call(stub, results, stop):
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                stub.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]),
                                                 max_new_tokens=3, ignore_eos=True), timeout=30)
                results.append((t0, "OK", ""))
            except grpc.RpcError as exc:
                results.append((t0, exc.code().name, exc.details()))
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.005)

    totals = collections.Counter()
    for round_ in range(8):
        s = RunningServer(make_config(assets, preload=())).start()
        stop, results, channels = threading.Event(), [], []
        try:
            with Client(s.target, timeout=60) as c:
                stream = iter(c.stream(PROMPT, max_new_tokens=60, ignore_eos=True))
                next(stream)
                threads = []
                for k in range(4):
                    channels.append(grpc.insecure_channel(s.target))
                    stub = pb_grpc.GenerationStub(channels[-1])
                    threads.append(threading.Thread(target=call, args=(stub, results, stop),
                                                    daemon=True))
                    threads[-1].start()
                time.sleep(0.2 + 0.05 * round_)  # SIGTERM at varying points of the calls
                t_stop = time.monotonic()
                s.begin_shutdown(grace=30).result(60)
                rest = list(stream)  # the stream in flight was drained, not cut
                assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 60
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            for ch in channels:
                ch.close()
            s.stop()
        near = [r for r in results if abs(r[0] - t_stop) < 0.1]
        assert near, "no call was sent near the shutdown"
        bad = [(round(r[0] - t_stop, 3), r[1], r[2]) for r in results
               if r[1] not in ("OK", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED")]
        assert not bad, bad
        # a call grpc core drops in the instant of the stop, before any handler: CANCELLED,
        # or, once in a CI run (sent 2 ms after the stop began), no answer until the
        # client's deadline. Either only near the stop, and never one the server's handlers
        # accepted (the counts below: a call they lost would not be counted OK)
        dropped = [r for r in results if r[1] in ("CANCELLED", "DEADLINE_EXCEEDED")]
        assert all(abs(r[0] - t_stop) < 0.1 for r in dropped), dropped
        totals.update(r[1] for r in results)
        # What the server counted: every call its handlers accepted ended OK (none
        # cancelled by the stop), one per OK answer (+1: the stream).
        served = collections.Counter()
        for fam in s.server.metrics.registry.collect():
            if fam.name == "loraplex_requests":
                served.update({x.labels["status"]: int(x.value) for x in fam.samples
                               if x.name.endswith("_total")})
        assert set(served) == {"OK"} and served["OK"] == sum(
            r[1] == "OK" for r in results) + 1, (served, round_)
    print(f"\ncalls around shutdown, 8 rounds: {dict(totals)}")
    assert totals["OK"] > 50 and totals["UNAVAILABLE"] > 0, totals


def _break_steps(engine, entered: threading.Event | None = None, error=RuntimeError):
    """Make every engine step raise `error`, as a bug would (with `entered`: set it, then
    raise only once another request has been accepted); returns the undo."""
    real = engine.runner.run

    def broken(batch):
        if entered is not None:
            entered.set()
            deadline = time.monotonic() + 30
            while engine._inbox.qsize() == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
        raise error("injected")
    engine.runner.run = broken
    return lambda: setattr(engine.runner, "run", real)


def test_failed_steps_answer_internal_and_enough_in_a_row_stop_the_server(assets):
    """A step that raises ends its requests with INTERNAL and the server keeps serving; a
    step that succeeds resets the count; max_step_failures in a row and the server stops
    itself (`serve` would exit 1 for its supervisor to restart it)."""
    s = RunningServer(make_config(assets, preload=(), max_step_failures=2)).start()
    try:
        engine = s.server.engine
        with Client(s.target, timeout=60) as c:
            repair = _break_steps(engine)
            with pytest.raises(Internal, match="internal engine error .*retrying"):
                c.generate(PROMPT, max_new_tokens=3)
            repair()
            assert c.generate(PROMPT, max_new_tokens=3).completion_tokens == 3
            _break_steps(engine)
            with pytest.raises(Internal, match="internal engine error"):
                c.generate(PROMPT, max_new_tokens=3)
            assert c.health() == "SERVING"  # one failure in a row: still serving
            assert s.metric("loraplex_engine_step_failures_total") == 2
            assert s.metric("loraplex_requests_total", adapter="", status="INTERNAL",
                            **UNROUTED) == 2
            with pytest.raises(Internal, match="internal engine error"):
                c.generate(PROMPT, max_new_tokens=3)  # the second in a row
        s._thread.join(60)  # the server shut itself down
        assert not s._thread.is_alive() and s.server.engine_failed
        assert "2 in a row, the last RuntimeError" in engine.failure
        assert _wait_refused(s.server.port)
    finally:
        s.stop()


def test_requests_waiting_when_the_engine_fails_end_unavailable(assets):
    """The first request's step fails the engine while a second request is accepted but
    not yet in the batch: the first ends INTERNAL, the second, which never ran, ends
    UNAVAILABLE with the engine's failure (not lost, not hung; safe to retry elsewhere,
    and not held against a canary); a request submitted afterwards is refused."""
    s = RunningServer(make_config(assets, preload=(), max_step_failures=1)).start()
    try:
        engine, entered = s.server.engine, threading.Event()
        _break_steps(engine, entered)

        async def both():
            async with AsyncClient(s.target, timeout=60) as c:
                first = asyncio.ensure_future(c.generate(PROMPT, max_new_tokens=3))
                await asyncio.to_thread(entered.wait, 30)  # its step has begun
                second = asyncio.ensure_future(c.generate(PROMPT, max_new_tokens=3))
                return await asyncio.gather(first, second, return_exceptions=True)
        in_batch, waiting = asyncio.run(both())
        assert isinstance(in_batch, Internal) and "internal engine error" in str(in_batch)
        assert isinstance(waiting, Unavailable), waiting
        assert "the engine has failed" in str(waiting) and "retry on another" in str(waiting)
        with pytest.raises(errors.Unavailable, match="the engine has failed.*retry on another"):
            engine.submit(GenerationRequest(prompt_ids=[5, 6], sampling=SamplingParams()))
    finally:
        s.stop()


def test_serve_returns_exit_status_1_when_the_engine_fails(assets):
    """`loraplex serve`'s path: run_until_signal (on this, the main thread, as signal
    handlers need) returns 1 once the engine has failed, with no signal sent."""
    from loraplex.server import LoraplexServer

    server = LoraplexServer(make_config(assets, preload=(), max_step_failures=1))
    answers = []

    def break_and_call():
        deadline = time.monotonic() + 120
        while server.engine is None and time.monotonic() < deadline:
            time.sleep(0.05)
        _break_steps(server.engine)
        with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
            try:
                c.generate(PROMPT, max_new_tokens=2)
            except Exception as exc:  # noqa: BLE001  (checked below, on the test's thread)
                answers.append(exc)

    caller = threading.Thread(target=break_and_call, daemon=True)
    caller.start()
    assert gc.get_freeze_count() == 0
    try:
        assert asyncio.run(asyncio.wait_for(server.run_until_signal(), 180)) == 1
        # the start-up heap is out of the collector's reach (see server._freeze_startup_heap)
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()  # (this process is pytest's, not a server's)
    caller.join(10)
    assert len(answers) == 1 and isinstance(answers[0], Internal), answers


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch < 2.8")
def test_a_cuda_error_fails_the_engine_at_once(assets):
    """torch.AcceleratorError (a CUDA error: illegal access, device-side assert) poisons
    the process: the first one stops the server, whatever max_step_failures says."""
    s = RunningServer(make_config(assets, preload=(), max_step_failures=100)).start()
    try:
        _break_steps(s.server.engine, error=torch.AcceleratorError)
        with Client(s.target, timeout=60) as c, pytest.raises(Internal):
            c.generate(PROMPT, max_new_tokens=3)
        s._thread.join(60)
        assert not s._thread.is_alive() and s.server.engine_failed
        assert "1 in a row, the last AcceleratorError" in s.server.engine.failure
    finally:
        s.stop()


def test_an_error_outside_a_step_fails_the_engine_and_answers_every_request(assets):
    """The loop's own bookkeeping raising (here the deadline check, once a request is in)
    cannot leave a request unanswered: the engine fails, the request ends UNAVAILABLE."""
    s = RunningServer(make_config(assets, preload=())).start()
    try:
        engine = s.server.engine

        def broken():
            if engine._seqs:
                raise RuntimeError("injected")
        engine._expire_deadlines = broken
        with Client(s.target, timeout=60) as c, pytest.raises(Unavailable, match="loop raised"):
            c.generate(PROMPT, max_new_tokens=3)
        s._thread.join(60)
        assert not s._thread.is_alive() and s.server.engine_failed
    finally:
        s.stop()


def test_a_hung_step_stops_the_server(assets):
    """A step that never returns (a hung GPU) cannot be interrupted: after step_timeout
    the server stops serving and shuts down (serve would exit 1), leaving the thread."""
    s = RunningServer(make_config(assets, preload=(), step_timeout=1.0)).start()
    release = threading.Event()
    try:
        engine = s.server.engine
        with Client(s.target, timeout=60) as c:  # idle for longer than the timeout: fine
            assert c.generate(PROMPT, max_new_tokens=3).completion_tokens == 3
            time.sleep(1.6)
            assert c.health() == "SERVING"

        def hung(batch):
            release.wait(60)
            raise RuntimeError("released by the test")
        engine.runner.run = hung
        with Client(s.target, timeout=60) as c, pytest.raises(Unavailable):
            c.generate(PROMPT, max_new_tokens=3)  # cancelled at the end of the grace period
        s._thread.join(60)
        assert not s._thread.is_alive() and s.server.engine_failed
        assert engine.busy_for() > 1.0  # the step is still running
    finally:
        release.set()
        s.stop()


def test_detokenize_skips_special_tokens(client):
    assert client.detokenize([EOS_ID]) == ""


def test_keep_special_tokens_writes_them_but_not_the_one_that_ends(client):
    """<s> (special) forced by logit_bias: left out of the text unless kept; EOS, which
    ends the output, stays out either way. Streamed pieces add up to the same text."""
    bos = dict(logit_bias={BOS_ID: 100}, max_new_tokens=3)
    assert client.generate(PROMPT, **bos).text == ""
    kept = client.generate(PROMPT, keep_special_tokens=True, **bos)
    assert (kept.text, kept.token_ids, kept.finish_reason) == ("<s>" * 3, (BOS_ID,) * 3,
                                                               "length")
    assert "".join(c.text for c in client.stream(PROMPT, keep_special_tokens=True, **bos)) \
        == kept.text
    ended = client.generate(PROMPT, keep_special_tokens=True, logit_bias={EOS_ID: 100},
                            min_tokens=2, max_new_tokens=8, allowed_token_ids=[BOS_ID, EOS_ID])
    assert (ended.text, ended.token_ids, ended.finish_reason) == (
        "<s><s>", (BOS_ID, BOS_ID, EOS_ID), "stop")
    stopped = client.generate(PROMPT, keep_special_tokens=True, stop_token_ids=[BOS_ID], **bos)
    assert (stopped.text, stopped.finish_reason) == ("", "stop")  # (a stop id ends it too)


def test_tokenize_takes_one_input(client):
    from loraplex_client.types import build_tokenize_request
    with pytest.raises(TypeError):
        build_tokenize_request("hi", messages=[("user", "hi")])


def test_text_held_by_the_stop_filter_comes_before_a_cut_character(client):
    r = client.generate(PROMPT, guided_regex="E€", stop=["E€x"], max_new_tokens=2)
    assert r.finish_reason == "length" and r.text == "E\ufffd"
    assert client.detokenize(r.token_ids) == r.text
