"""An OpenAI-compatible HTTP API in front of the gRPC services (`serve --http-port 8000`).

    POST /v1/completions          prompt(s) -> text (OpenAI's legacy completions)
    POST /v1/chat/completions     messages -> the assistant's message
    POST /v1/responses            OpenAI's Responses API, served as chat
    GET, DELETE /v1/responses/ID  a stored response (openai_store.py)
    GET  /v1/responses/ID/input_items
                                  the input items of a stored response
    POST /generate, /generate_stream, /
                                  LoRAX's (TGI's) REST API, with adapter_id
    POST /tokenize, /detokenize   vLLM's: a prompt or messages <-> token ids
    GET  /v1/models               the base model, every adapter and every route
    POST /v1/load_lora_adapter    vLLM's: load (or, load_inplace, swap in) an adapter
    POST /v1/unload_lora_adapter  vLLM's: unload one, once its requests have finished
    GET  /health                  200 while the server is SERVING, else 503
    GET  /version                 vLLM's: loraplex's version

`model` picks what serves the request, as the gRPC `adapter` field does: the base
model's served name (or ""), an adapter name, "name@version" or a route alias. The
response headers `x-loraplex-adapter` and `x-loraplex-route` name the version that served
it and the route that chose it.

Every HTTP request becomes Generation calls on the server's own gRPC services (over a
Unix socket of the process), one per prompt, so every check, route, queue limit, metric
and token of the gRPC API applies unchanged: the caller's `Authorization` header is passed
on as it is. A gRPC status becomes an HTTP status and an OpenAI error body
{"error": {"message", "type", "param", "code"}}: INVALID_ARGUMENT and FAILED_PRECONDITION
400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504, a server bug 500. A stream sends its headers only
once the first tokens are there, so a refused request still gets its status; an error
after that is one `data: {"error": ...}` event before `data: [DONE]`. A client that
disconnects cancels its gRPC calls, which frees their place in the batch at the next step.

Request fields, and how a body becomes GenerateRequests: openai_requests.py. /v1/responses
is served as chat (openai_responses.py); LoRAX's /generate routes are lorax_api.py's.
"""

from __future__ import annotations

import asyncio
import json
from importlib import metadata
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable

import grpc
from aiohttp import web
from prometheus_client import Counter
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc
from loraplex_client.client import ADAPTER_HEADER
from loraplex_client.types import build_tokenize_request
from loraplex import openai_responses, openai_tools
from loraplex.openai_store import ResponseStore, owner_of
from loraplex.lorax_api import LoraxApi
from loraplex.openai_requests import (
    CHAT_FIELDS, CHAT_OPTIONS, COMPLETION_FIELDS, DETOKENIZE_FIELDS, LOAD_FIELDS, MAX_LOGPROBS,
    RESPONSES_FIELDS, TOKENIZE_FIELDS, UNLOAD_FIELDS, ApiError, Job, bad, build_request,
    chat_job, chat_options, check_types, parse_messages, prompt_inputs, request_kwargs,
    sampling_fields, tool_plan, usage_options)
from loraplex.openai_tools import Parser, Reasoning

log = logging.getLogger(__name__)

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}

# ---- responses -------------------------------------------------------------------------

def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _rows(entries) -> list[tuple[str, float | None, dict | None]]:
    """(token text, logprob, {alternative: logprob}) of logprob entries."""
    return [(_text(lp.token), lp.logprob, {_text(t.token): t.logprob for t in lp.top})
            for lp in entries]


def _prompt_rows(first_token: str, prompt_logprobs, top: int) -> list:
    """The scored prompt's rows: its first token (no logprob, as in vLLM), then the rest,
    with `top` alternatives each."""
    return [(first_token, None, None)] + [(t, lp, dict(list(alts.items())[:top]))
                                          for t, lp, alts in _rows(prompt_logprobs)]


def _vllm_prompt_logprobs(entries, top: int) -> list:
    """vLLM's prompt_logprobs: None for the first prompt token, then for each other one
    {token id: {"logprob", "rank", "decoded_token"}}, its own entry and `top` alternatives."""
    def one(token: bytes, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": _text(token)}

    out: list = [None]
    for lp in entries:
        row = {str(lp.token_id): one(lp.token, lp.logprob, lp.rank)}
        for rank, t in enumerate(lp.top[:top], 1):
            row.setdefault(str(t.token_id), one(t.token, t.logprob, rank))
        out.append(row)
    return out


def _completion_logprobs(rows: list, offset: int) -> dict:
    offsets, at = [], offset
    for token, _, _ in rows:
        offsets.append(at)
        at += len(token)
    return {"tokens": [r[0] for r in rows], "token_logprobs": [r[1] for r in rows],
            "top_logprobs": [r[2] for r in rows], "text_offset": offsets}


def _chat_logprobs(entries) -> dict:
    def one(tok: bytes, logprob: float) -> dict:
        return {"token": _text(tok), "logprob": logprob, "bytes": list(tok)}

    return {"content": [{**one(lp.token, lp.logprob),
                         "top_logprobs": [one(t.token, t.logprob) for t in lp.top]}
                        for lp in entries], "refusal": None}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _owner(request: web.Request) -> str:
    """Whose the stored responses a request makes or reads are (openai_store.owner_of)."""
    return owner_of(request.headers.get("Authorization", ""))


def _not_stored(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no response {response_id!r} is stored here (responses are kept in "
                         "this server's memory, the least recently used dropped past "
                         "--response-store-mb, each for the token that made it)", param=param)


class OpenAIApi:
    """The aiohttp application; `channel` reaches the gRPC services. `model_name`: what
    /v1/models calls the base model (requests may name it or ""). `list_token`: the
    admin token, with which /v1/models lists adapters and routes once the caller's own
    token has passed the Generation service's check. `response_store`: where the Responses
    API keeps its responses (None: none kept)."""

    def __init__(self, channel: grpc.aio.Channel, model_name: str, list_token: str = "",
                 requests: Counter | None = None, tool_call_parser: str = "",
                 reasoning_parser: str = "", response_store: ResponseStore | None = None):
        self._gen = pb_grpc.GenerationStub(channel)
        self._adm = pb_grpc.AdaptersStub(channel)
        self._routes = pb_grpc.RoutesStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.model_name = model_name
        self._list_token = list_token
        self._tool_call_parser = tool_call_parser  # "" or one of TOOL_CALL_PARSERS
        self._reasoning_parser = reasoning_parser  # "" or one of REASONING_PARSERS
        self._created = int(time.time())
        self._requests = requests  # loraplex_http_requests_total{endpoint, status}
        self._store = response_store
        self.app = web.Application(middlewares=[self._count, self._errors],
                                   client_max_size=64 * 2**20)
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat),
                             web.post("/v1/responses", self.responses),
                             web.get("/v1/responses/{response_id}", self.get_response),
                             web.delete("/v1/responses/{response_id}", self.delete_response),
                             web.get("/v1/responses/{response_id}/input_items",
                                     self.input_items),
                             web.get("/v1/models", self.models),
                             web.post("/tokenize", self.tokenize),
                             web.post("/detokenize", self.detokenize),
                             web.post("/v1/load_lora_adapter", self.load_lora_adapter),
                             web.post("/v1/unload_lora_adapter", self.unload_lora_adapter),
                             web.get("/health", self.health),
                             web.get("/version", self.version),
                             *LoraxApi(self._gen, self._metadata).routes()])

    @web.middleware
    async def _count(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "other"
        status = 499  # (until an answer: the client went away)
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            if self._requests is not None:
                self._requests.labels(endpoint, str(status)).inc()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except grpc.RpcError as err:
            exc = ApiError.of_rpc(err)
            return web.json_response(exc.body(), status=exc.status)
        except web.HTTPException as exc:  # aiohttp's own 404 / 405
            body = ApiError(exc.status, exc.reason, "invalid_request_error").body()
            return web.json_response(body, status=exc.status)
        except Exception as exc:  # noqa: BLE001  (a bug here: logged, answered 500)
            log.exception("bug in the HTTP API on %s", request.path)
            body = ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body()
            return web.json_response(body, status=500)

    # ---- endpoints ----------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, COMPLETION_FIELDS)
        if body.get("suffix"):
            raise bad("suffix (insertion) is not supported", "suffix")
        if "prompt" not in body or body["prompt"] is None:
            raise bad("prompt is required", "prompt")
        logprobs = body.get("logprobs")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise bad(f"logprobs must be 0 to {MAX_LOGPROBS} (alternatives per token), got "
                      f"{logprobs}", "logprobs")
        max_tokens = 16 if body.get("max_tokens") is None else body["max_tokens"]
        sampling = sampling_fields(body, max_tokens)
        scored = bool(body.get("echo")) and logprobs is not None  # (vLLM's and lm-eval's)
        if logprobs is not None:
            sampling.update(logprobs=True, top_logprobs=logprobs)
        if scored:
            sampling["prompt_logprobs"] = max(logprobs, body.get("prompt_logprobs") or 0)
        kwargs = request_kwargs(body)
        inputs = prompt_inputs(body["prompt"])
        requests = [build_request(inp, sampling, kwargs) for inp in inputs]
        echo, first_tokens = [""] * len(inputs), ()
        if body.get("echo"):
            served = await asyncio.gather(*(self._served_prompt(
                inp, request, body.get("add_special_tokens"),
                body.get("truncate_prompt_tokens"), scored) for inp in inputs))
            echo = [text for text, _ in served]
            first_tokens = tuple(first for _, first in served) if scored else ()
        return await self._answer(request, Job("completion", body["model"], requests,
                                               body.get("n") or 1, bool(body.get("stream")),
                                               *usage_options(body), logprobs, echo,
                                               first_tokens, body.get("prompt_logprobs")))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, CHAT_FIELDS)
        job = chat_job(body, self._tool_call_parser, self._reasoning_parser)
        return await self._answer(request, job)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API, served as the chat request it asks for
        (openai_responses.py): one completion, its pieces as output items."""
        body = await self._body(request, RESPONSES_FIELDS)
        owner = _owner(request)
        try:
            chat = openai_responses.chat_body(body, self._history(body, owner))
        except openai_responses.ResponsesError as exc:
            raise bad(str(exc), exc.param) from None
        keep = self._store is not None and body.get("store") is not False
        check_types(chat, CHAT_FIELDS)
        job = chat_job(chat, self._tool_call_parser, self._reasoning_parser)
        [req] = self._requests_of(job)
        md = self._metadata(request, req.adapter)
        parser = job.parser()
        response_id = openai_responses.new_id("resp")

        def pieces_of(text: str, end: bool) -> list:
            pieces = ([text] if parser is None
                      else parser.feed(text) + (parser.finish() if end else []))
            if not job.include_reasoning:
                pieces = [p for p in pieces if not isinstance(p, Reasoning)]
            return [p for p in pieces if p != ""]

        if not job.stream:
            resp = await self._gen.Generate(req, metadata=md)
            answer = openai_responses.response(
                body, chat, response_id, openai_responses.output_items(pieces_of(resp.text, True)),
                openai_responses.status(_FINISH.get(resp.finish_reason)),
                openai_responses.usage(resp.prompt_tokens, resp.completion_tokens), keep)
            if keep:
                self._keep(owner, body, chat, answer)
            return web.json_response(answer, headers=self._served(resp))
        call = self._gen.GenerateStream(req, metadata=md)
        try:
            events = aiter(call)
            first = await anext(events)  # (errors before any token get a status)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache",
                                                   **self._served(first)})
            await response.prepare(request)
            stream = openai_responses.Events(openai_responses.response(
                body, chat, response_id, [], "in_progress", None, keep))

            async def send(items: list[dict]) -> None:
                for e in items:
                    await response.write(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
                                         .encode())

            await send(stream.start())
            msg = first
            try:
                while True:
                    end = bool(msg.finish_reason)
                    await send(stream.feed(pieces_of(msg.text, end)))
                    if end:
                        await send(stream.finish(
                            openai_responses.status(_FINISH.get(msg.finish_reason)),
                            openai_responses.usage(msg.prompt_tokens, msg.completion_tokens)))
                        if keep:
                            self._keep(owner, body, chat, stream.response)
                        break
                    msg = await anext(events)
            except grpc.RpcError as err:
                failed = ApiError.of_rpc(err)
                await send([stream.error(str(failed.status), failed.message)])
            await response.write_eof()
            return response
        finally:
            call.cancel()  # (a no-op once it has ended)

    def _history(self, body: dict, owner: str) -> tuple[dict, ...]:
        """The chat messages of the stored response that `body` continues (none without
        previous_response_id)."""
        previous = body.get("previous_response_id")
        if not previous:
            return ()
        if self._store is None:
            raise bad("previous_response_id: responses are not stored here (--response-store-mb "
                      "0): send the whole conversation in input", "previous_response_id")
        return self._stored(owner, previous, "previous_response_id").conversation

    def _stored(self, owner: str, response_id: str, param: str | None = None):
        stored = self._store.get(owner, response_id) if self._store is not None else None
        if stored is None:
            raise _not_stored(response_id, param)
        return stored

    def _keep(self, owner: str, body: dict, chat: dict, answer: dict) -> None:
        self._store.put(owner, answer, openai_responses.conversation(body, chat,
                                                                     answer["output"]),
                        openai_responses.input_items(body["input"]))

    async def get_response(self, request: web.Request) -> web.Response:
        """A stored response, for the token that made it."""
        await self._check_caller(request)
        return web.json_response(self._stored(_owner(request),
                                              request.match_info["response_id"]).response)

    async def input_items(self, request: web.Request) -> web.Response:
        """One page of a stored response's input items (limit, order, after, before)."""
        await self._check_caller(request)
        stored = self._stored(_owner(request), request.match_info["response_id"])
        try:
            return web.json_response(openai_responses.page(list(stored.input_items),
                                                           request.query))
        except openai_responses.ResponsesError as exc:
            raise bad(str(exc), exc.param) from None

    async def delete_response(self, request: web.Request) -> web.Response:
        await self._check_caller(request)
        response_id = request.match_info["response_id"]
        if self._store is None or not self._store.delete(_owner(request), response_id):
            raise _not_stored(response_id)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def _check_caller(self, request: web.Request) -> None:
        """The Generation service's check of the caller's token (UNAUTHENTICATED or
        PERMISSION_DENIED otherwise)."""
        await self._gen.Tokenize(pb.TokenizeRequest(prompt=" "),
                                 metadata=self._metadata(request, ""))

    async def models(self, request: web.Request) -> web.Response:
        md = self._metadata(request, "")
        probe = await self._gen.Tokenize(pb.TokenizeRequest(prompt=" "),
                                         metadata=md)  # (the caller's check)
        admin = (("authorization", f"Bearer {self._list_token}"),) if self._list_token else md
        adapters = (await self._adm.ListAdapters(pb.ListAdaptersRequest(), metadata=admin)).adapters
        routes = (await self._routes.ListRoutes(pb.ListRoutesRequest(), metadata=admin)).routes

        def entry(id_: str, root: str, parent: str | None) -> dict:
            return {"id": id_, "object": "model", "created": self._created,
                    "owned_by": "loraplex", "root": root, "parent": parent,
                    "max_model_len": probe.max_model_len}  # (vLLM's field)

        data = [entry(self.model_name, self.model_name, None)]
        seen = set()
        for a in adapters:
            if a.name in seen or not (a.current or not a.version):
                continue
            seen.add(a.name)
            data.append(entry(a.name, f"{a.name}@{a.version}" if a.version else a.name,
                              self.model_name))
        data += [entry(r.alias, r.primary, self.model_name) for r in routes]
        return web.json_response({"object": "list", "data": data})

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's: {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}."""
        body = await self._body(request, TOKENIZE_FIELDS, need_model=False)
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise bad("give prompt (a string) or messages, not both")
        if body.get("tools") is not None and body.get("messages") is None:
            raise bad("tools go with messages", "tools")
        if body.get("prompt") is not None:
            if set(body) & set(CHAT_OPTIONS):
                raise bad("continue_final_message, add_generation_prompt and "
                          "chat_template_kwargs go with messages")
            req = build_tokenize_request(body["prompt"],
                                         add_special_tokens=body.get("add_special_tokens"))
        else:
            tools = tool_plan({"tools": body.get("tools"), "tool_choice": "none"}, "")
            req = build_tokenize_request(messages=parse_messages(body["messages"]),
                                         tools=list(tools.tools) if tools else None,
                                         add_special_tokens=body.get("add_special_tokens"),
                                         **chat_options(body))
        resp = await self._gen.Tokenize(req, metadata=self._metadata(request, ""))
        return web.json_response({"tokens": list(resp.token_ids), "count": len(resp.token_ids),
                                  "max_model_len": resp.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's: {"tokens"} -> {"prompt"}."""
        body = await self._body(request, DETOKENIZE_FIELDS, need_model=False)
        tokens = body.get("tokens")
        if tokens is None or not all(0 <= t < 2**32 for t in tokens):
            raise bad("tokens is required: an array of token ids (whole numbers >= 0)",
                      "tokens")
        resp = await self._gen.Detokenize(pb.TokenIds(ids=tokens),
                                          metadata=self._metadata(request, ""))
        return web.json_response({"prompt": resp.text})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's: {"lora_name", "lora_path" (relative to the adapter root), "load_inplace"}
        -> LoadAdapter, or SwapAdapter with load_inplace (which loads a new name too); the
        gRPC admin check applies (the caller's token must be the admin one). Answers in
        vLLM's words, as text."""
        body = await self._body(request, LOAD_FIELDS, need_model=False)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise bad("lora_name and lora_path are required (lora_path: the adapter's "
                      "folder, relative to the server's adapter root)",
                      "lora_path" if name else "lora_name")
        md = self._metadata(request, name)  # (behind the proxy: the adapter's own replica)
        try:
            if body.get("load_inplace"):
                await self._adm.SwapAdapter(pb.SwapAdapterRequest(name=name, path=path),
                                            metadata=md)
            else:
                await self._adm.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path),
                                            metadata=md)
        except grpc.RpcError as err:
            if err.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise
            raise bad(f"{err.details()}; or send load_inplace: true", "lora_name") from None
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's: {"lora_name"} (every version, or "name@version") -> UnloadAdapter,
        waiting for the requests that use it (up to 30 s)."""
        body = await self._body(request, UNLOAD_FIELDS, need_model=False)
        name = body.get("lora_name")
        if body.get("lora_int_id") is not None:
            raise bad("lora_int_id is not supported: adapters have names here; send "
                      "lora_name", "lora_int_id")
        if not name:
            raise bad("lora_name is required", "lora_name")
        await self._adm.UnloadAdapter(pb.UnloadAdapterRequest(name=name, drain=True),
                                      metadata=self._metadata(request, name))
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def version(self, request: web.Request) -> web.Response:
        """vLLM's: {"version"}, loraplex's own (tools read it to tell the server)."""
        try:
            version = metadata.version("loraplex")
        except metadata.PackageNotFoundError:  # (run from a source tree, not installed)
            version = "unknown"
        return web.json_response({"version": version})

    async def health(self, request: web.Request) -> web.Response:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=5)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as err:
            status = err.code().name
        return web.json_response({"status": status}, status=200 if status == "SERVING" else 503)

    # ---- helpers --------------------------------------------------------------------

    async def _body(self, request: web.Request, fields: dict, need_model: bool = True) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        check_types(body, fields)
        if need_model and not isinstance(body.get("model"), str):
            raise bad("model is required: the base model's name, an adapter or a route",
                      "model")
        return body

    def _adapter(self, model: str) -> str:
        return "" if model == self.model_name else model

    def _metadata(self, request: web.Request, adapter: str) -> tuple[tuple[str, str], ...]:
        md = [(ADAPTER_HEADER, adapter)]
        if "Authorization" in request.headers:
            md.append(("authorization", request.headers["Authorization"]))
        return tuple(md)

    async def _served_prompt(self, inp: dict, request: web.Request, special: bool | None,
                             keep: int | None, first: bool) -> tuple[str, str]:
        """An input as the model sees it, for echo: its text, after truncate_prompt_tokens
        (`keep`) and add_special_tokens (`special`), and with `first` its first token's
        text ("" for a special token such as BOS)."""
        md = self._metadata(request, "")
        ids = inp.get("input_ids")
        if ids is None and (keep or first):
            req = build_tokenize_request(inp["prompt"], add_special_tokens=special)
            ids = (await self._gen.Tokenize(req, metadata=md)).token_ids
        if keep:
            ids = ids[-keep:]

        async def text(of: list[int]) -> str:
            return (await self._gen.Detokenize(pb.TokenIds(ids=of), metadata=md)).text

        whole = inp["prompt"] if "prompt" in inp and not keep else await text(list(ids))
        return whole, await text(list(ids[:1])) if first and ids else ""

    def _requests_of(self, job: Job) -> list[pb.GenerateRequest]:
        """The job's gRPC requests, naming the adapter of its `model`."""
        for r in job.requests:
            r.adapter = self._adapter(job.model)
        return job.requests

    def _calls(self, request: web.Request, job: Job) -> list:
        adapter = self._adapter(job.model)
        md = self._metadata(request, adapter)
        self._requests_of(job)
        if job.stream:
            return [self._gen.GenerateStream(r, metadata=md) for r in job.requests]
        return [self._gen.Generate(r, metadata=md) for r in job.requests]

    async def _answer(self, request: web.Request, job: Job) -> web.StreamResponse:
        calls = self._calls(request, job)
        try:
            if job.stream:
                return await self._stream(request, job, calls)
            return await self._whole(job, calls)
        finally:
            for call in calls:
                call.cancel()  # (a no-op for a call that has ended)

    async def _whole(self, job: Job, calls: list) -> web.Response:
        answers = await asyncio.gather(*calls)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, resp in enumerate(answers):
            prompt_tokens += resp.prompt_tokens
            completions = resp.completions or [resp]
            prompt_rows = (_prompt_rows(job.first_tokens[p], resp.prompt_logprobs, job.logprobs)
                           if job.first_tokens else [])
            for c in completions:
                completion_tokens += c.completion_tokens
                choices.append(self._choice(job, p * job.n + c.index, job.echo[p] + c.text,
                                            c.logprobs, _FINISH.get(c.finish_reason),
                                            0 if prompt_rows else len(job.echo[p]),
                                            prompt_rows=prompt_rows, parser=job.parser(),
                                            scored=self._scored(job, resp)))
        first = answers[0]
        body = {"id": self._id(job, first.request_id), "object": self._object(job, False),
                "created": int(time.time()), "model": job.model, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}
        if job.kind == "chat" and job.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._scored(job, first)
        return web.json_response(body, headers=self._served(first))

    async def _stream(self, request: web.Request, job: Job, calls: list) -> web.StreamResponse:
        events = _merge(calls)
        try:
            first_p, first = await anext(events)  # errors before any token get a status
        except StopAsyncIteration:
            raise ApiError(500, "the server ended the stream without an answer",
                           "server_error") from None
        except BaseException:
            await events.aclose()
            raise
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache",
                                               **self._served(first)})
        await response.prepare(request)
        id_, created = self._id(job, first.request_id), int(time.time())
        offsets: dict[int, int] = {}  # choice -> characters of text sent so far
        prompt_rows: dict[int, list] = {}  # prompt -> its scored rows (echo with logprobs)
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        parsers: dict[int, Parser | None] = {}  # choice -> its tool call parser

        async def send(obj: dict) -> None:
            await response.write(f"data: {json.dumps(obj)}\n\n".encode())

        async def chunk(p: int, msg: pb.GenerateResponse) -> None:
            index = p * job.n + msg.index
            first_chunk = index not in offsets
            text = (job.echo[p] if first_chunk else "") + msg.text
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(text)
            prompt_tokens[p] = msg.prompt_tokens
            completion_tokens[index] = msg.completion_tokens
            if job.first_tokens and msg.prompt_logprobs:  # (the stream's first message)
                prompt_rows[p] = _prompt_rows(job.first_tokens[p], msg.prompt_logprobs,
                                              job.logprobs)
            rows = prompt_rows.get(p, []) if first_chunk else []
            if first_chunk:
                parsers[index] = job.parser()
            scored = self._scored(job, msg) if msg.prompt_logprobs else None
            choice = self._choice(job, index, text, msg.logprobs, _FINISH.get(msg.finish_reason),
                                  offset if rows else offset + len(text) - len(msg.text),
                                  delta=True, first=first_chunk, prompt_rows=rows,
                                  parser=parsers[index], scored=scored)
            top = {"prompt_logprobs": scored} if job.kind == "chat" and scored else {}
            if choice.get("delta") == {} and choice["finish_reason"] is None \
                    and choice["logprobs"] is None and not scored:
                return  # (a tool call parser holds the text back)
            if job.continuous_usage:
                top["usage"] = _usage(prompt_tokens[p], completion_tokens[index])
            await send({"id": id_, "object": self._object(job, True), "created": created,
                        "model": job.model, "choices": [choice], **top})

        try:
            await chunk(first_p, first)
            async for p, msg in events:
                await chunk(p, msg)
            if job.include_usage:
                await send({"id": id_, "object": self._object(job, True), "created": created,
                            "model": job.model, "choices": [],
                            "usage": _usage(sum(prompt_tokens.values()),
                                            sum(completion_tokens.values()))})
        except grpc.RpcError as err:
            await send(ApiError.of_rpc(err).body())
        finally:
            await events.aclose()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _choice(self, job: Job, index: int, text: str, logprobs, finish: str | None,
                offset: int, delta: bool = False, first: bool = False,
                prompt_rows: list = (), parser: Parser | None = None,
                scored: list | None = None) -> dict:
        """One choice; `offset`: where the text of the first of the logprob rows (the
        scored prompt's, then the generated tokens') starts; `parser` (chat with tools)
        turns the text into content and tool calls; `scored`: vLLM's prompt_logprobs (a
        completion choice's own field; chat's is the response's)."""
        if job.kind == "completion":
            lp = (_completion_logprobs([*prompt_rows, *_rows(logprobs)], offset)
                  if job.logprobs is not None else None)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish,
                    **({"prompt_logprobs": scored} if scored is not None else {})}
        lp = _chat_logprobs(logprobs) if job.logprobs is not None else None
        said = {"content": text}
        if parser is not None:
            pieces = parser.feed(text) + (parser.finish() if finish else [])
            finish = parser.finish_reason(finish)
            if not job.include_reasoning:
                pieces = [p for p in pieces if not isinstance(p, Reasoning)]
            said = (openai_tools.delta(pieces) if delta else openai_tools.message(
                pieces, reasoning=job.reasoning and job.include_reasoning))
        if delta:
            said = {"role": "assistant", **said} if first else said
            return {"index": index, "delta": said, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", **said}, "logprobs": lp,
                "finish_reason": finish}

    @staticmethod
    def _scored(job: Job, resp: pb.GenerateResponse) -> list | None:
        """vLLM's prompt_logprobs of an answer, when the request asked for them."""
        if job.prompt_logprobs is None:
            return None
        return _vllm_prompt_logprobs(resp.prompt_logprobs, job.prompt_logprobs)

    @staticmethod
    def _id(job: Job, request_id: str) -> str:
        return ("cmpl-" if job.kind == "completion" else "chatcmpl-") + request_id

    @staticmethod
    def _object(job: Job, chunk: bool) -> str:
        if job.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    @staticmethod
    def _served(resp: pb.GenerateResponse) -> dict:
        headers = {"x-loraplex-adapter": resp.adapter}
        if resp.route:
            headers["x-loraplex-route"] = resp.route
        return headers


async def _merge(calls: list) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    """The messages of several streaming calls as they come, as (call index, message);
    the first error ends it. Closing it stops reading (the caller cancels the calls)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(p: int, call) -> None:
        try:
            async for msg in call:
                await queue.put((p, msg))
            await queue.put(done)
        except grpc.RpcError as err:
            await queue.put(err)

    tasks = [asyncio.ensure_future(pump(p, c)) for p, c in enumerate(calls)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, grpc.RpcError):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


class HttpServer:
    """The API on host:port (HTTPS with `tls` = (cert, key)). `grpc_target`: where the
    gRPC services answer: in `serve`, the server's own Unix socket; in `loraplex
    http-gateway`, a server or the adapter-aware proxy in front of several (over TLS
    with `grpc_tls_ca`, a PEM root certificate). `grace`: seconds the requests in flight
    get at `close`. `response_store_mb`: the Responses API's budget for stored responses
    (0: none stored; `store` the ResponseStore, else None)."""

    def __init__(self, grpc_target: str, host: str, port: int, model_name: str,
                 list_token: str = "", tls: tuple[str, str] | None = None,
                 grpc_tls_ca: str | None = None, grace: float = 5.0,
                 requests: Counter | None = None, tool_call_parser: str = "",
                 reasoning_parser: str = "", response_store_mb: float = 0):
        self.grpc_target, self._grpc_tls_ca = grpc_target, grpc_tls_ca
        self.store = ResponseStore(int(response_store_mb * 2**20)) if response_store_mb else None
        self._host, self._port = host, port
        self._model_name, self._list_token, self._tls = model_name, list_token, tls
        self.grace = grace
        self._requests = requests
        self._tool_call_parser = tool_call_parser
        self._reasoning_parser = reasoning_parser
        self._channel: grpc.aio.Channel | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port: int | None = None

    async def start(self) -> None:
        if self._grpc_tls_ca:
            with open(self._grpc_tls_ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.aio.secure_channel(self.grpc_target, creds)
        else:
            self._channel = grpc.aio.insecure_channel(self.grpc_target)
        api = OpenAIApi(self._channel, self._model_name, self._list_token, self._requests,
                        self._tool_call_parser, self._reasoning_parser, self.store)
        # handler_cancellation: a client that goes away cancels its handler, and with it
        # the gRPC calls (which leave the batch)
        self._runner = web.AppRunner(api.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.grace)
        await self._runner.setup()
        context = None
        if self._tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self._tls)
        self._site = web.TCPSite(self._runner, self._host, self._port, ssl_context=context)
        await self._site.start()
        self.port = self._runner.addresses[0][1]

    async def stop_listening(self) -> None:
        """No new connections; the requests in flight go on."""
        if self._site is not None:
            await self._site.stop()

    async def close(self) -> None:
        """Stop listening, give the requests in flight `grace` seconds, close."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close()


async def run_gateway(server: HttpServer) -> None:
    """`loraplex http-gateway`: serve until SIGTERM or SIGINT, then close."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("OpenAI-compatible API on port %d, over the gRPC services at %s", server.port,
             server.grpc_target)
    await stop.wait()
    log.info("stopping: requests in flight get %.0f s", server.grace)
    await server.close()
