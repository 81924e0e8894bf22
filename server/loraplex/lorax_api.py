"""LoRAX's REST API (TGI's, with a per-request adapter_id) over the gRPC services, served
beside the OpenAI one (openai_api.py) on the same port, so lorax-client and TGI clients
work unchanged:

    POST /generate          {"inputs", "parameters": {...}} -> {"generated_text", "details"}
    POST /generate_stream   the same -> server-sent events, one per generated token
    POST /                  either, by the body's "stream"; not streamed, a list of the
                            one answer (TGI's compat route, which lorax-client posts to)

parameters: adapter_id (an adapter or route name, "" / null = the base model; the proxy
routes on it), adapter_source (null or "local": adapters are folders under the server's
adapter root), do_sample, temperature, top_k, top_p, repetition_penalty, seed,
max_new_tokens (default 20, TGI's), stop (strings, kept at the end of the text, as TGI),
ignore_eos_token, return_full_text, truncate, details, decoder_input_details (the prompt's
logprobs in details.prefill), return_k_alternatives, response_format ({"type":
"json_object", "schema": ...}: guided JSON), and TGI's grammar ({"type": "json" or "regex",
"value"}), top_n_tokens (details.top_tokens) and frequency_penalty, which
huggingface_hub's InferenceClient sends. Sampling is on with do_sample or any of
temperature (other than 1), top_k, top_p (other than 1), as in TGI; else greedy. What
cannot be honoured is refused with 422, never ignored: merged_adapters (merge ahead with
MergeAdapters and name the result), api_token and another adapter_source (nothing is
downloaded), best_of above 1, typical_p other than 1, watermark, unknown fields.

Errors are TGI's body, {"error": message, "error_type": ...}: 422 for a request that
cannot be served as sent, else the status of the gRPC code as in the OpenAI API; in a
stream that has begun, one such event. No engine code here.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import grpc
from aiohttp import web

from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client.types import build_generate_request
from loraplex import json_fields

DEFAULT_MAX_NEW_TOKENS = 20  # (TGI's)
MAX_ALTERNATIVES = 20  # (the gRPC API's top_logprobs limit)

_REQUEST = {"inputs": str, "parameters": dict, "stream": bool}
_PARAMETERS = {"adapter_id": str, "adapter_source": str, "merged_adapters": dict,
               "api_token": str, "do_sample": bool, "max_new_tokens": int,
               "ignore_eos_token": bool, "repetition_penalty": float,
               "return_full_text": bool, "stop": list, "seed": int, "temperature": float,
               "top_k": int, "top_p": float, "truncate": int, "typical_p": float,
               "best_of": int, "watermark": bool, "details": bool,
               "decoder_input_details": bool, "return_k_alternatives": int,
               "response_format": dict,
               # TGI's own (huggingface_hub's InferenceClient sends them)
               "frequency_penalty": float, "grammar": dict, "top_n_tokens": int}
_STATUS = {  # gRPC code -> (HTTP status, TGI's error_type)
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation"),
    grpc.StatusCode.FAILED_PRECONDITION: (422, "validation"),
    grpc.StatusCode.OUT_OF_RANGE: (422, "validation"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "overloaded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class _Refused(Exception):
    def __init__(self, message: str, status: int = 422, error_type: str = "validation"):
        super().__init__(message)
        self.status, self.error_type = status, error_type

    @classmethod
    def of_rpc(cls, err: grpc.RpcError) -> _Refused:
        status, error_type = _STATUS.get(err.code(), (500, "generation"))
        return cls(err.details() or err.code().name, status, error_type)

    def body(self) -> dict:
        return {"error": str(self), "error_type": self.error_type}


class _Ask:
    """One checked request: the gRPC request and what its answer needs."""

    def __init__(self, body: dict):
        _check(body, _REQUEST, "")
        p = body.get("parameters") or {}
        _check(p, _PARAMETERS, "parameters.")
        if not body.get("inputs"):
            raise _Refused("inputs is required: the prompt text")
        for name, why in (("merged_adapters", "merge them ahead with MergeAdapters "
                                              "(`loraplex merge`) and name the result in "
                                              "adapter_id"),
                          ("api_token", "adapters are folders under the server's adapter "
                                        "root; nothing is downloaded")):
            if p.get(name) is not None:
                raise _Refused(f"parameters.{name} is not supported: {why}")
        if p.get("adapter_source") not in (None, "local"):
            raise _Refused(f"parameters.adapter_source {p['adapter_source']!r} is not "
                           "supported: adapters are folders under the server's adapter root "
                           "(local); name one, or a route, in adapter_id")
        if (p.get("best_of") or 1) != 1:
            raise _Refused("parameters.best_of above 1 is not supported: send the requests "
                           "one by one (or use the OpenAI API's n)")
        if p.get("typical_p") not in (None, 1.0):
            raise _Refused("parameters.typical_p is not supported: use top_p or top_k")
        if p.get("watermark"):
            raise _Refused("parameters.watermark is not supported")
        stop = p.get("stop") or []
        if not all(isinstance(s, str) for s in stop):
            raise _Refused("parameters.stop must be an array of strings")
        alternatives, top_n = p.get("return_k_alternatives"), p.get("top_n_tokens")
        for name, k, least in (("return_k_alternatives", alternatives, 1),
                               ("top_n_tokens", top_n, 0)):
            if k is not None and not least <= k <= MAX_ALTERNATIVES:
                raise _Refused(f"parameters.{name} must be {least} to {MAX_ALTERNATIVES}, "
                               f"got {k}")
        if p.get("grammar") is not None and p.get("response_format") is not None:
            raise _Refused("give parameters.grammar or parameters.response_format, not both")
        temperature, top_p = p.get("temperature"), p.get("top_p")
        self.sampled = bool(p.get("do_sample") or temperature not in (None, 1.0)
                            or p.get("top_k") or top_p not in (None, 1.0))
        sampling = {"max_new_tokens": (DEFAULT_MAX_NEW_TOKENS if p.get("max_new_tokens") is None
                                       else p["max_new_tokens"]),
                    "temperature": (1.0 if temperature is None else temperature)
                    if self.sampled else 0.0,
                    "stop": stop, "include_stop_str_in_output": True,
                    "ignore_eos": p.get("ignore_eos_token"), "logprobs": True,
                    "top_logprobs": max(alternatives or 0, top_n or 0) or None,
                    "prompt_logprobs": 0 if p.get("decoder_input_details") else None,
                    "guided_json": _schema(p.get("response_format")),
                    **_grammar(p.get("grammar"))}
        for name in ("top_k", "top_p", "seed", "repetition_penalty", "frequency_penalty"):
            sampling[name] = p.get(name)
        try:
            self.request = build_generate_request(
                prompt=body["inputs"], adapter=p.get("adapter_id") or "",
                truncate_prompt_tokens=p.get("truncate"),
                **{k: v for k, v in sampling.items() if v is not None})
        except (TypeError, ValueError) as exc:
            raise _Refused(str(exc)) from None
        self.adapter = p.get("adapter_id") or ""
        self.inputs, self.stop = body["inputs"], stop
        self.full_text = bool(p.get("return_full_text"))
        self.details, self.prefill = bool(p.get("details")), bool(p.get("decoder_input_details"))
        self.alternatives = alternatives
        self.top_n = top_n or 0  # TGI's top_tokens: this many per position
        self.seed = p.get("seed") if self.sampled else None

    def generated_text(self, text: str) -> str:
        return self.inputs + text if self.full_text else text

    def finish_reason(self, resp: pb.GenerateResponse, text: str) -> str:
        if resp.finish_reason == pb.FINISH_REASON_LENGTH:
            return "length"
        return "stop_sequence" if any(text.endswith(s) for s in self.stop) else "eos_token"

    def token(self, lp: pb.TokenLogprob, text: str | None = None) -> dict:
        """A generated token; `text`: what it adds to the text (default: its own bytes)."""
        return {"id": lp.token_id, "text": _text(lp.token) if text is None else text,
                "logprob": lp.logprob, "special": lp.special,
                "alternative_tokens": [{"id": t.token_id, "text": _text(t.token),
                                        "logprob": t.logprob}
                                       for t in lp.top[:self.alternatives]]
                if self.alternatives else None,
                "skipped": False}

    def top_tokens(self, lp: pb.TokenLogprob) -> list[dict]:
        """TGI's top_tokens of one position (top_n_tokens of them)."""
        return [{"id": t.token_id, "text": _text(t.token), "logprob": t.logprob,
                 "special": False} for t in lp.top[:self.top_n]]


class LoraxApi:
    """The routes; `gen`: the Generation stub, `metadata(request, adapter)`: the gRPC
    metadata of an HTTP request (its Authorization, the adapter header)."""

    def __init__(self, gen, metadata: Callable[[web.Request, str], tuple]):
        self._gen, self._metadata = gen, metadata

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/generate", self.generate),
                web.post("/generate_stream", self.generate_stream),
                web.post("/", self.compat)]

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=True)

    async def compat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=None)

    async def _serve(self, request: web.Request, stream: bool | None) -> web.StreamResponse:
        """stream None: as the body says, a list when not streamed (TGI's compat route)."""
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise _Refused("the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise _Refused("the body must be a JSON object")
            ask = _Ask(body)
            md = self._metadata(request, ask.adapter)
            if stream or stream is None and body.get("stream"):
                if ask.prefill:
                    raise _Refused("decoder_input_details is not sent in a stream: drop it "
                                   "or call /generate")
                return await self._stream(request, ask, md)
            answer = await self._whole(ask, md)
            return web.json_response([answer] if stream is None else answer)
        except _Refused as exc:
            return web.json_response(exc.body(), status=exc.status)
        except grpc.RpcError as err:
            exc = _Refused.of_rpc(err)
            return web.json_response(exc.body(), status=exc.status)

    async def _whole(self, ask: _Ask, md: tuple) -> dict:
        if not ask.details:
            ask.request.logprobs, ask.request.top_logprobs = False, 0  # (nothing shows them)
        resp = await self._gen.Generate(ask.request, metadata=md)
        answer: dict = {"generated_text": ask.generated_text(resp.text)}
        if ask.details:
            answer["details"] = {
                "finish_reason": ask.finish_reason(resp, resp.text),
                "prompt_tokens": resp.prompt_tokens, "generated_tokens": resp.completion_tokens,
                "skipped_tokens": 0, "seed": ask.seed,
                "prefill": await self._prefill(ask, resp, md) if ask.prefill else [],
                "tokens": [ask.token(lp) for lp in resp.logprobs], "best_of_sequences": None,
                **({"top_tokens": [ask.top_tokens(lp) for lp in resp.logprobs]}
                   if ask.top_n else {})}
        return answer

    async def _prefill(self, ask: _Ask, resp: pb.GenerateResponse, md: tuple) -> list[dict]:
        """The prompt's tokens as the model saw them (after truncate), each with its
        logprob (the first: null, as TGI's)."""
        ids = (await self._gen.Tokenize(pb.TokenizeRequest(prompt=ask.inputs), metadata=md)
               ).token_ids
        first = ids[len(ids) - resp.prompt_tokens]
        text = (await self._gen.Detokenize(pb.TokenIds(ids=[first]), metadata=md)).text
        return [{"id": first, "text": text, "logprob": None}] + [
            {"id": lp.token_id, "text": _text(lp.token), "logprob": lp.logprob}
            for lp in resp.prompt_logprobs]

    async def _stream(self, request: web.Request, ask: _Ask, md: tuple) -> web.StreamResponse:
        """One event per generated token; each message's text goes with its last
        non-special token (others: "", a special one its own text), so the non-special
        tokens' texts add up to generated_text. The last event is held back until the
        end, which it carries: generated_text and details."""
        call = self._gen.GenerateStream(ask.request, metadata=md)
        response: web.StreamResponse | None = None
        pending: dict | None = None  # the latest token's event, not sent yet
        text = ""
        try:
            async for msg in call:
                if response is None:  # (errors before the first tokens get a status)
                    response = web.StreamResponse(headers={
                        "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                    await response.prepare(request)
                text += msg.text
                events = _token_events(ask, msg)
                if not events and pending is not None:
                    pending["token"]["text"] += msg.text
                    continue
                if events and pending is not None:
                    await _send(response, pending)
                for event in events[:-1]:
                    await _send(response, event)
                pending = events[-1] if events else pending
                if msg.finish_reason:
                    pending["generated_text"] = ask.generated_text(text)
                    pending["details"] = {"finish_reason": ask.finish_reason(msg, text),
                                          "prompt_tokens": msg.prompt_tokens,
                                          "generated_tokens": msg.completion_tokens,
                                          "seed": ask.seed}
        except grpc.RpcError as err:
            if response is None:
                raise
            if pending is not None:
                await _send(response, pending)
            pending = _Refused.of_rpc(err).body()
        finally:
            call.cancel()  # (a no-op once it has ended)
        if response is None:
            raise _Refused("the server ended the stream without an answer", 500, "generation")
        if pending is not None:
            await _send(response, pending)
        await response.write_eof()
        return response


def _token_events(ask: _Ask, msg: pb.GenerateResponse) -> list[dict]:
    carrier = next((i for i in range(len(msg.logprobs) - 1, -1, -1)
                    if not msg.logprobs[i].special), len(msg.logprobs) - 1)
    return [{"token": ask.token(lp, msg.text if i == carrier else
                                (None if lp.special else "")),
             **({"top_tokens": ask.top_tokens(lp)} if ask.top_n else {}),
             "generated_text": None, "details": None}
            for i, lp in enumerate(msg.logprobs)]


async def _send(response: web.StreamResponse, event: dict) -> None:
    await response.write(f"data:{json.dumps(event)}\n\n".encode())


def _schema(response_format) -> dict | None:
    """LoRAX's response_format -> guided_json."""
    if response_format is None:
        return None
    if response_format.get("type") != "json_object" or set(response_format) - {"type",
                                                                                "schema"}:
        raise _Refused('parameters.response_format must be {"type": "json_object", "schema": '
                       '{...}} (the schema optional)')
    schema = response_format.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise _Refused("parameters.response_format.schema must be a JSON schema object")
    return schema or {"type": "object"}


def _grammar(grammar) -> dict:
    """TGI's grammar -> guided_json or guided_regex."""
    if grammar is None:
        return {}
    kind, value = grammar.get("type"), grammar.get("value")
    if kind in ("json", "json_schema") and isinstance(value, (dict, str)):
        return {"guided_json": value}
    if kind == "regex" and isinstance(value, str):
        return {"guided_regex": value}
    raise _Refused('parameters.grammar must be {"type": "json", "value": <a JSON schema>} or '
                   '{"type": "regex", "value": <a pattern>}')


def _check(body: dict, fields: dict, where: str) -> None:
    """422 for an unknown field or a value of the wrong JSON type (null = unset)."""
    problem = json_fields.first_problem(body, fields, where=where)
    if problem is not None:
        raise _Refused(problem[1])


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
