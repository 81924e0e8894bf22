"""LoRAX's REST API (server/loraplex/lorax_api.py), called with lorax-client itself (and
raw HTTP for what the client cannot send) against a real server; the answers are checked
against the gRPC API's for the same requests."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import lorax
import pytest

from conftest_api import RunningServer, assets, free_port, make_config  # noqa: F401
from loraplex.lorax_api import _Ask, _token_events
from loraplex_client import Client
from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from models import EOS_ID

PROMPT = "Hello, world"


@pytest.fixture(scope="module")
def served(assets):
    s = RunningServer(make_config(assets, http_port=free_port())).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def url(served):
    return f"http://127.0.0.1:{served.server.http_port}"


@pytest.fixture(scope="module")
def grpc_client(served):
    with Client(served.target, timeout=60) as c:
        yield c


def _post(url: str, body: dict) -> tuple[int, object]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_generate_is_the_grpc_answer_with_tgi_details(url, grpc_client):
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=20, logprobs=True,
                               top_logprobs=2, prompt_logprobs=0)
    out = lorax.Client(url).generate(PROMPT, adapter_id="alpha", return_k_alternatives=2,
                                     decoder_input_details=True)  # (max_new_tokens 20)
    assert out.generated_text == ref.text
    d = out.details
    assert d.generated_tokens == ref.completion_tokens == len(d.tokens) and d.seed is None
    assert d.prompt_tokens == ref.prompt_tokens
    assert d.finish_reason == ("length" if ref.finish_reason == "length" else "eos_token")
    assert [t.id for t in d.tokens] == list(ref.token_ids)
    assert [t.logprob for t in d.tokens] == pytest.approx([x.logprob for x in ref.logprobs],
                                                          abs=1e-5)
    assert all([a.id for a in t.alternative_tokens] == [i for i, _ in x.top]
               for t, x in zip(d.tokens, ref.logprobs))
    ids = grpc_client.tokenize(PROMPT).token_ids
    assert [t.id for t in d.prefill] == list(ids) and d.prefill[0].logprob is None
    assert [t.logprob for t in d.prefill[1:]] == pytest.approx(
        [x.logprob for x in ref.prompt_logprobs], abs=1e-5)
    base = lorax.Client(url).generate(PROMPT, max_new_tokens=6)  # (no adapter_id: the base)
    assert base.generated_text == grpc_client.generate(PROMPT, max_new_tokens=6).text
    full = lorax.Client(url).generate(PROMPT, adapter_id="alpha", return_full_text=True)
    assert full.generated_text == PROMPT + ref.text


def test_generate_stream_adds_up_to_the_whole_answer(url, grpc_client):
    whole = lorax.Client(url).generate(PROMPT, adapter_id="beta", max_new_tokens=12)
    events = list(lorax.Client(url).generate_stream(PROMPT, adapter_id="beta",
                                                    max_new_tokens=12))
    assert len(events) == whole.details.generated_tokens
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]
    assert "".join(e.token.text for e in events if not e.token.special) == whole.generated_text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.finish_reason == whole.details.finish_reason
    assert events[-1].details.generated_tokens == len(events)

    async def main():
        answer = await lorax.AsyncClient(url).generate(PROMPT, adapter_id="beta",
                                                       max_new_tokens=12)
        streamed = [e async for e in lorax.AsyncClient(url).generate_stream(
            PROMPT, adapter_id="beta", max_new_tokens=12)]
        return answer, streamed
    answer, streamed = asyncio.run(main())  # (it reads "/"'s answer as a list of one)
    assert answer.generated_text == whole.generated_text
    assert [e.token.id for e in streamed] == [e.token.id for e in events]


def test_sampling_stop_sequences_and_json_follow_tgi(url, grpc_client):
    client = lorax.Client(url)
    sampled = [client.generate(PROMPT, adapter_id="alpha", do_sample=True, seed=7,
                               max_new_tokens=10) for _ in range(2)]
    ref = grpc_client.generate(PROMPT, adapter="alpha", temperature=1.0, seed=7,
                               max_new_tokens=10)
    assert sampled[0].generated_text == sampled[1].generated_text == ref.text
    assert sampled[0].details.seed == 7
    hot = client.generate(PROMPT, adapter_id="alpha", temperature=0.7, seed=7,
                          max_new_tokens=10)  # (a temperature alone turns sampling on)
    assert hot.generated_text == grpc_client.generate(
        PROMPT, adapter="alpha", temperature=0.7, seed=7, max_new_tokens=10).text
    greedy = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=20).text
    stop = greedy[3:5]
    cut = client.generate(PROMPT, adapter_id="alpha", stop_sequences=[stop])
    assert cut.generated_text == greedy[:greedy.index(stop) + len(stop)]  # (kept, as TGI)
    assert cut.details.finish_reason == "stop_sequence"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = client.generate(PROMPT, adapter_id="alpha", max_new_tokens=40,
                          response_format={"type": "json_object", "schema": schema})
    assert json.loads(out.generated_text) in ({"ok": True}, {"ok": False})


def test_what_cannot_be_honoured_is_a_422_in_tgi_words(url):
    client = lorax.Client(url)
    with pytest.raises(lorax.errors.ValidationError, match="adapter_source 'hub'"):
        client.generate(PROMPT, adapter_id="alpha", adapter_source="hub")
    with pytest.raises(lorax.errors.ValidationError, match="merged_adapters"):
        client.generate(PROMPT, merged_adapters={"ids": ["alpha", "beta"],
                                                 "weights": [0.5, 0.5], "density": 1.0})
    with pytest.raises(lorax.errors.ValidationError, match="typical_p"):
        client.generate(PROMPT, typical_p=0.5)
    with pytest.raises(lorax.errors.NotFoundError, match="nope"):
        client.generate(PROMPT, adapter_id="nope")
    status, out = _post(url + "/generate_stream", {"inputs": PROMPT, "parameters": {
        "decoder_input_details": True}})
    assert status == 422 and "decoder_input_details" in out["error"]
    for body, words in (({"inputs": ""}, "inputs is required"),
                        ({"inputs": PROMPT, "parameters": {"best_of": 2}}, "best_of"),
                        ({"inputs": PROMPT, "parameters": {"watermark": True}}, "watermark"),
                        ({"inputs": PROMPT, "parameters": {"n": 2}}, "unknown field"),
                        ({"inputs": PROMPT, "parameters": {"top_k": "x"}}, "an integer"),
                        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}},
                         "max_new_tokens"),
                        ({"inputs": PROMPT, "parameters": {"response_format": {
                            "type": "regex"}}}, "json_object")):
        status, out = _post(url + "/generate", body)
        assert status == 422 and out["error_type"] == "validation", (body, out)
        assert words in out["error"], (body, out)
    status, out = _post(url + "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 3}})
    assert status == 200 and isinstance(out, dict) and "details" not in out
    status, out = _post(url + "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert status == 200 and isinstance(out, list) and out[0]["generated_text"]


def test_logprobs_mark_special_tokens_and_a_stream_event_keeps_text_off_them(grpc_client):
    """TokenLogprob.special (gRPC) says which tokens are the tokenizer's specials; a stream
    message's text goes with its last non-special token."""
    out = grpc_client.generate(PROMPT, max_new_tokens=3, logprobs=True,
                               logit_bias={EOS_ID: 100}, ignore_eos=True)
    assert list(out.token_ids) == [EOS_ID] * 3 and all(x.special for x in out.logprobs)
    plain = grpc_client.generate(PROMPT, max_new_tokens=3, logprobs=True, ignore_eos=True,
                                 logit_bias={EOS_ID: -100})
    assert not any(x.special for x in plain.logprobs)
    ask = _Ask({"inputs": PROMPT})
    msg = pb.GenerateResponse(text="ab", token_ids=[5, 6, EOS_ID], logprobs=[
        pb.TokenLogprob(token_id=5, token=b"a"), pb.TokenLogprob(token_id=6, token=b"b"),
        pb.TokenLogprob(token_id=EOS_ID, token=b"</s>", special=True)])
    assert [e["token"]["text"] for e in _token_events(ask, msg)] == ["", "ab", "</s>"]


def test_huggingface_hubs_tgi_client_works_too(url, grpc_client):
    """huggingface_hub's InferenceClient, TGI's own client: details with top_tokens and
    prefill, a stream, and grammar (TGI's guided decoding)."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=url)
    ref = grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=5, logprobs=True,
                               top_logprobs=2)
    out = client.text_generation(PROMPT, max_new_tokens=5, details=True, top_n_tokens=2,
                                 adapter_id="alpha", decoder_input_details=True)
    assert out.generated_text == ref.text
    assert [t.id for t in out.details.tokens] == list(ref.token_ids)
    assert [[t["id"] for t in top] for top in out.details.top_tokens] == [  # (left dicts)
        [i for i, _ in x.top] for x in ref.logprobs]
    assert len(out.details.prefill) == ref.prompt_tokens
    events = list(client.text_generation(PROMPT, max_new_tokens=5, stream=True, details=True,
                                         adapter_id="alpha"))
    assert [e.token.id for e in events] == list(ref.token_ids)
    assert events[-1].generated_text == ref.text
    guided = client.text_generation(PROMPT, max_new_tokens=30, adapter_id="alpha",
                                    grammar={"type": "regex", "value": "[ab]{4}"})
    assert guided == grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=30,
                                          guided_regex="[ab]{4}").text
    assert len(guided) == 4 and set(guided) <= {"a", "b"}
    penalized = client.text_generation(PROMPT, max_new_tokens=8, adapter_id="alpha",
                                       frequency_penalty=2.0)
    assert penalized == grpc_client.generate(PROMPT, adapter="alpha", max_new_tokens=8,
                                             frequency_penalty=2.0).text
