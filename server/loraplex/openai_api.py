"""An OpenAI-compatible HTTP API in front of the gRPC services (`serve --http-port 8000`).

    POST /v1/completions          prompt(s) -> text (OpenAI's legacy completions)
    POST /v1/chat/completions     messages -> the assistant's message
    POST /v1/responses            OpenAI's Responses API, served as chat
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

Request fields: OpenAI's (max_tokens, or max_completion_tokens in chat; temperature,
default 1; top_p, n, stream, stream_options (include_usage, and vLLM's
continuous_usage_stats), stop, seed, presence_penalty, frequency_penalty, logit_bias,
logprobs, top_logprobs in chat, echo (with logprobs: the prompt scored too, its tokens
leading the choice's logprobs), user -> the route's routing_key; response_format
json_schema -> guided_json, json_object -> guided_json {"type": "object"}) and vLLM's
extra ones (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, guided_regex, guided_choice, guided_json,
structured_outputs (the same guides), priority, truncate_prompt_tokens,
add_special_tokens, allowed_token_ids, bad_words, prompt_logprobs: answered in vLLM's form, a completion
choice's field or chat's top-level one, in a stream's first chunk), plus routing_key;
chat's tools, tool_choice and parallel_tool_calls, with messages that carry tool_calls
and tool results (openai_tools.py says what each tool_choice does); with
--reasoning-parser, chat's reasoning_content (openai_reasoning.py). /v1/responses is
served as chat (openai_responses.py); LoRAX's /generate routes are lorax_api.py's. What
cannot be honoured is refused with 400, never ignored: suffix, best_of other than n, a
message part that is not text, functions / function_call (send tools / tool_choice),
tool_choice auto on a server without --tool-call-parser, unload_lora_adapter's
lora_int_id (adapters have names here), and any unknown field.
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
from dataclasses import dataclass

import grpc
from aiohttp import web
from prometheus_client import Counter
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc
from loraplex_client.client import ADAPTER_HEADER
from loraplex_client.types import build_generate_request, build_tokenize_request
from loraplex import json_fields, openai_responses, openai_tools
from loraplex.lorax_api import LoraxApi
from loraplex.openai_reasoning import ReasoningParser
from loraplex.openai_tools import Parser, Reasoning, ToolPlan

log = logging.getLogger(__name__)

_STATUS = {  # gRPC code -> (HTTP status, OpenAI error type)
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}

# vLLM's extra sampling fields (and ours), passed to GenerateRequest under the same name
_EXTRAS = {"top_k": int, "min_p": float, "repetition_penalty": float, "min_tokens": int,
           "ignore_eos": bool, "stop_token_ids": list, "include_stop_str_in_output": bool,
           "guided_regex": str, "guided_choice": list, "guided_json": (str, dict),
           "priority": int, "truncate_prompt_tokens": int, "allowed_token_ids": list,
           "routing_key": str, "skip_special_tokens": bool, "prompt_logprobs": int,
           "bad_words": list, "structured_outputs": dict, "add_special_tokens": bool}
# OpenAI fields with nothing to do here, accepted as they are
_IGNORED = frozenset({"store", "metadata", "service_tier"})
_STREAM_OPTIONS = {"include_usage": bool, "continuous_usage_stats": bool}  # (vLLM's too)
# vLLM's options of the chat template (chat and /tokenize)
_CHAT_OPTIONS = {"continue_final_message": bool, "add_generation_prompt": bool,
                 "chat_template_kwargs": dict}
_COMMON = {"model": str, "max_tokens": int, "temperature": float, "top_p": float, "n": int,
           "stream": bool, "stop": (str, list), "seed": int, "presence_penalty": float,
           "frequency_penalty": float, "logit_bias": dict, "best_of": int, "user": str,
           "stream_options": dict}
_COMPLETION_FIELDS = {**_COMMON, "prompt": (str, list), "logprobs": int, "echo": bool,
                      "suffix": str, "response_format": dict, **_EXTRAS}
_CHAT_FIELDS = {**_COMMON, "messages": list, "max_completion_tokens": int, "logprobs": bool,
                "top_logprobs": int, "response_format": dict, "tools": list,
                "tool_choice": (str, dict), "parallel_tool_calls": bool, "functions": list,
                "function_call": (str, dict), "include_reasoning": bool, **_CHAT_OPTIONS,
                **_EXTRAS}
_RESPONSES_FIELDS = {  # (openai_responses.py; store, metadata, service_tier: _IGNORED)
    "model": str, "input": (str, list), "instructions": str, "max_output_tokens": int,
    "temperature": float, "top_p": float, "tools": list, "tool_choice": (str, dict),
    "parallel_tool_calls": bool, "text": dict, "stream": bool, "user": str,
    "previous_response_id": str, "background": bool, "include": list, "reasoning": dict,
    "truncation": str, "seed": int, "stop": (str, list), "presence_penalty": float,
    "frequency_penalty": float, "logit_bias": dict, "include_reasoning": bool,
    **_CHAT_OPTIONS, **_EXTRAS}
_TOKENIZE_FIELDS = {"model": str, "prompt": str, "messages": list, "tools": list,
                    "add_special_tokens": bool, **_CHAT_OPTIONS}
_GUIDES = ("guided_json", "guided_regex", "guided_choice")
_DETOKENIZE_FIELDS = {"model": str, "tokens": list}
_LOAD_FIELDS = {"lora_name": str, "lora_path": str, "load_inplace": bool}
_UNLOAD_FIELDS = {"lora_name": str, "lora_int_id": int}
_ITEMS = {"tokens": int, "stop": str, "stop_token_ids": int, "guided_choice": str,
          "allowed_token_ids": int, "bad_words": str}
MAX_LOGPROBS = 20  # (the gRPC API's top_logprobs limit)


class ApiError(Exception):
    """An HTTP error with OpenAI's body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    @classmethod
    def of_rpc(cls, err: grpc.RpcError) -> ApiError:
        status, type_ = _STATUS.get(err.code(), (500, "server_error"))
        return cls(status, err.details() or err.code().name, type_)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---- requests --------------------------------------------------------------------------

def _check_types(body: dict, fields: dict) -> None:
    """400 for an unknown field or a value of the wrong JSON type (null = unset)."""
    problem = json_fields.first_problem(body, fields, _ITEMS, ignored=_IGNORED)
    if problem is not None:
        raise _bad(problem[1], problem[0])


def _sampling(body: dict, max_tokens: int | None) -> dict:
    """GenerateRequest fields shared by both endpoints."""
    if body.get("best_of") not in (None, body.get("n") or 1):
        raise _bad("best_of other than n is not supported: each of the n completions is "
                   "returned", "best_of")
    out = {"max_new_tokens": max_tokens,
           "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
           "n": body.get("n")}
    for name in ("top_p", "seed", "presence_penalty", "frequency_penalty", "stop"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("logit_bias"):
        try:
            out["logit_bias"] = {int(k): float(v) for k, v in body["logit_bias"].items()}
        except (TypeError, ValueError):
            raise _bad("logit_bias maps token ids (as strings) to numbers, e.g. "
                       '{"50256": -100}', "logit_bias") from None
    if body.get("prompt_logprobs") is not None \
            and not 0 <= body["prompt_logprobs"] <= MAX_LOGPROBS:
        raise _bad(f"prompt_logprobs must be 0 to {MAX_LOGPROBS} (alternatives per prompt "
                   f"token), got {body['prompt_logprobs']}", "prompt_logprobs")
    for name in _EXTRAS:
        if body.get(name) is not None and name not in ("priority", "truncate_prompt_tokens",
                                                      "routing_key", "skip_special_tokens",
                                                      "structured_outputs",
                                                      "add_special_tokens"):
            out[name] = body[name]
    guides = [_structured_outputs(body.get("structured_outputs")),
              {"guided_json": _guided_json(body.get("response_format"))}]
    for given, name in zip(guides, ("structured_outputs", "response_format")):
        given = {k: v for k, v in given.items() if v is not None}
        if given and any(out.get(g) is not None for g in _GUIDES):
            raise _bad(f"give {name} or guided_json / guided_regex / guided_choice, not both",
                       name)
        out.update(given)
    if body.get("skip_special_tokens") is False:
        out["keep_special_tokens"] = True
    return out


def _request_kwargs(body: dict) -> dict:
    """build_generate_request's keyword arguments other than the input and sampling."""
    return {"adapter": "", "routing_key": body.get("routing_key") or body.get("user") or "",
            "priority": body.get("priority") or 0,
            "truncate_prompt_tokens": body.get("truncate_prompt_tokens"),
            "add_special_tokens": body.get("add_special_tokens")}


def _prompts(value) -> list[dict]:
    """OpenAI's prompt (a string, strings, token ids, lists of token ids) -> one input each."""
    if isinstance(value, str):
        return [{"prompt": value}]
    def ids(v) -> bool:
        return isinstance(v, list) and bool(v) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in v)

    if ids(value):
        return [{"input_ids": value}]
    if value and all(isinstance(v, str) for v in value):
        return [{"prompt": v} for v in value]
    if value and all(ids(v) for v in value):
        return [{"input_ids": v} for v in value]
    raise _bad("prompt must be a string, an array of strings, an array of token ids (whole "
               "numbers >= 0) or an array of such arrays, and not empty", "prompt")


def _messages(value: list) -> list[dict]:
    """OpenAI's messages -> loraplex_client.types.chat_messages' dicts."""
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"{where} must be an object with a role and a content", "messages")
        turn = {"role": m["role"], "content": _content(where, m.get("content"))}
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls must be an array", "messages")
            turn["tool_calls"] = [_history_call(f"{where}.tool_calls[{j}]", c)
                                  for j, c in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise _bad(f"{where}.{key} must be a string", "messages")
                turn[key] = m[key]
        out.append(turn)
    if not out:
        raise _bad("messages is empty: send at least one message", "messages")
    return out


def _content(where: str, content) -> str:
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise _bad(f"{where}.content: only parts of type 'text' are supported", "messages")
        if any(not isinstance(p.get("text"), str) for p in content):
            raise _bad(f"{where}.content: each text part needs a string 'text'", "messages")
        content = "".join(p["text"] for p in content)
    if content is None:
        return ""
    if not isinstance(content, str):
        raise _bad(f"{where}.content must be a string or an array of text parts", "messages")
    return content


def _history_call(where: str, call) -> dict:
    """An assistant message's earlier tool call: {"id", "type", "function": {"name",
    "arguments" (JSON text)}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or not isinstance(fn.get("arguments", ""), str) \
            or not isinstance(call.get("id", ""), str):
        raise _bad(f'{where} must be {{"id": ..., "type": "function", "function": {{"name": '
                   f'..., "arguments": "<JSON text>"}}}}', "messages")
    return {"id": call.get("id") or "", "function": {"name": fn["name"],
                                                     "arguments": fn.get("arguments") or "{}"}}


def _tool_plan(body: dict, parser: str) -> ToolPlan | None:
    for name, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(name) is not None:
            raise _bad(f"{name} (deprecated by OpenAI) is not supported: send {instead}", name)
    try:
        return openai_tools.plan(body.get("tools"), body.get("tool_choice"),
                                 body.get("parallel_tool_calls"), parser)
    except openai_tools.ToolError as exc:
        raise _bad(str(exc), exc.param) from None


def _chat_options(body: dict) -> dict:
    """vLLM's continue_final_message, add_generation_prompt and chat_template_kwargs as
    chat_messages' arguments."""
    go_on = bool(body.get("continue_final_message"))
    prompt = body.get("add_generation_prompt")
    if go_on and prompt:
        raise _bad("continue_final_message continues the last message: it cannot take "
                   "add_generation_prompt true too", "add_generation_prompt")
    if prompt is False and not go_on:
        raise _bad("add_generation_prompt false is supported only with "
                   "continue_final_message true (a new turn always gets the prompt)",
                   "add_generation_prompt")
    return {"continue_final_message": go_on,
            "chat_template_kwargs": body.get("chat_template_kwargs")}


JSON_OBJECT = {"type": "object"}  # (json_object: free-form, nested FREE_DEPTH deep)


def _structured_outputs(spec: dict | None) -> dict:
    """vLLM's structured_outputs -> the guided_* fields."""
    if spec is None:
        return {}
    refused = [k for k, v in spec.items() if v not in (None, False) and k not in (
        "json", "regex", "choice", "json_object")]
    if refused:
        raise _bad(f"structured_outputs.{refused[0]} is not supported: give one of json, "
                   "regex, choice, json_object", "structured_outputs")
    out = {"guided_json": JSON_OBJECT if spec.get("json_object") else spec.get("json"),
           "guided_regex": spec.get("regex"), "guided_choice": spec.get("choice")}
    for name, kind in (("guided_json", (str, dict)), ("guided_regex", str),
                       ("guided_choice", list)):
        if out[name] is not None and not isinstance(out[name], kind):
            raise _bad(f"structured_outputs: {name.removeprefix('guided_')} has the wrong "
                       f"type, got {json.dumps(out[name])[:80]}", "structured_outputs")
    if sum(v is not None for v in out.values()) > 1 or spec.get("json_object") and \
            spec.get("json") is not None:
        raise _bad("structured_outputs takes one of json, regex, choice, json_object",
                   "structured_outputs")
    return out


def _guided_json(response_format: dict | None) -> str | dict | None:
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema must be a JSON schema object",
                       "response_format")
        return schema
    if kind == "json_object":
        return JSON_OBJECT
    raise _bad(f"response_format type {kind!r} is unknown; use text, json_object or "
               "json_schema", "response_format")


def _build(inp: dict, sampling: dict, kwargs: dict) -> pb.GenerateRequest:
    try:
        return build_generate_request(**inp, **kwargs, **sampling)
    except (TypeError, ValueError) as exc:
        raise _bad(str(exc)) from None


@dataclass(frozen=True)
class _Job:
    """One HTTP request as gRPC calls (one per prompt) and what its answer needs."""

    kind: str  # "completion" | "chat"
    model: str
    requests: list[pb.GenerateRequest]
    n: int
    stream: bool
    include_usage: bool  # stream_options: a last chunk with the usage
    continuous_usage: bool  # and the usage so far of its choice in every chunk
    logprobs: int | None  # completions: top alternatives; chat: with top_logprobs
    echo: list[str]  # completions with echo: the prompt texts ("" when not echoing)
    # echo with logprobs: each prompt's first token (its text), which has no logprob; the
    # others' come from prompt_logprobs and lead each choice's logprobs
    first_tokens: tuple[str, ...] = ()
    prompt_logprobs: int | None = None  # vLLM's: alternatives per scored prompt token
    tools: ToolPlan | None = None  # chat with tools: how the text becomes tool calls
    reasoning: bool = False  # chat: the text's reasoning is split off (reasoning_content)
    include_reasoning: bool = True  # and sent (vLLM's include_reasoning false: dropped)

    def parser(self) -> Parser | None:
        tools = self.tools.new_parser() if self.tools is not None else None
        return ReasoningParser(tools) if self.reasoning else tools


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


class OpenAIApi:
    """The aiohttp application; `channel` reaches the gRPC services. `model_name`: what
    /v1/models calls the base model (requests may name it or ""). `list_token`: the
    admin token, with which /v1/models lists adapters and routes once the caller's own
    token has passed the Generation service's check."""

    def __init__(self, channel: grpc.aio.Channel, model_name: str, list_token: str = "",
                 requests: Counter | None = None, tool_call_parser: str = "",
                 reasoning_parser: str = ""):
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
        self.app = web.Application(middlewares=[self._count, self._errors],
                                   client_max_size=64 * 2**20)
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat),
                             web.post("/v1/responses", self.responses),
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
        body = await self._body(request, _COMPLETION_FIELDS)
        if body.get("suffix"):
            raise _bad("suffix (insertion) is not supported", "suffix")
        if "prompt" not in body or body["prompt"] is None:
            raise _bad("prompt is required", "prompt")
        logprobs = body.get("logprobs")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise _bad(f"logprobs must be 0 to {MAX_LOGPROBS} (alternatives per token), got "
                       f"{logprobs}", "logprobs")
        sampling = _sampling(body, 16 if body.get("max_tokens") is None else body["max_tokens"])
        scored = bool(body.get("echo")) and logprobs is not None  # (vLLM's and lm-eval's)
        if logprobs is not None:
            sampling.update(logprobs=True, top_logprobs=logprobs)
        if scored:
            sampling["prompt_logprobs"] = max(logprobs, body.get("prompt_logprobs") or 0)
        kwargs = _request_kwargs(body)
        inputs = _prompts(body["prompt"])
        requests = [_build(inp, sampling, kwargs) for inp in inputs]
        echo, first_tokens = [""] * len(inputs), ()
        if body.get("echo"):
            served = await asyncio.gather(*(self._served_prompt(
                inp, request, body.get("add_special_tokens"),
                body.get("truncate_prompt_tokens"), scored) for inp in inputs))
            echo = [text for text, _ in served]
            first_tokens = tuple(first for _, first in served) if scored else ()
        return await self._answer(request, _Job("completion", body["model"], requests,
                                                body.get("n") or 1, bool(body.get("stream")),
                                                *self._include_usage(body), logprobs, echo,
                                                first_tokens, body.get("prompt_logprobs")))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, _CHAT_FIELDS)
        return await self._answer(request, self._chat_job(body))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API, served as the chat request it asks for
        (openai_responses.py): one completion, its pieces as output items."""
        body = await self._body(request, _RESPONSES_FIELDS)
        try:
            chat = openai_responses.chat_body(body)
        except openai_responses.ResponsesError as exc:
            raise _bad(str(exc), exc.param) from None
        _check_types(chat, _CHAT_FIELDS)
        job = self._chat_job(chat)
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
                openai_responses.usage(resp.prompt_tokens, resp.completion_tokens))
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
                body, chat, response_id, [], "in_progress", None))

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
                        break
                    msg = await anext(events)
            except grpc.RpcError as err:
                failed = ApiError.of_rpc(err)
                await send([stream.error(str(failed.status), failed.message)])
            await response.write_eof()
            return response
        finally:
            call.cancel()  # (a no-op once it has ended)

    def _chat_job(self, body: dict) -> _Job:
        """A chat request's gRPC call and what its answer needs (400 for what is wrong)."""
        if not body.get("messages"):
            raise _bad("messages is required and must not be empty", "messages")
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        sampling = _sampling(body, max_tokens)
        top = body.get("top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise _bad(f"top_logprobs must be 0 to {MAX_LOGPROBS}, got {top}", "top_logprobs")
        if top is not None and not body.get("logprobs"):
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        if body.get("logprobs"):
            sampling.update(logprobs=True, top_logprobs=top or 0)
        tools = _tool_plan(body, self._tool_call_parser)
        forced = tools.guided_json() if tools is not None else None
        if forced is not None:
            given = [g for g in _GUIDES if sampling.get(g) is not None]
            if given:
                which = ("response_format" if _guided_json(body.get("response_format"))
                         is not None else "structured_outputs" if body.get("structured_outputs")
                         else given[0])
                raise _bad(f"tool_choice {tools.mode} guides the output to the tool call: "
                           f"drop {which}", "tool_choice")
            sampling["guided_json"] = forced
        if tools is not None and tools.keeps_special_tokens() \
                and body.get("skip_special_tokens") is None:
            sampling["keep_special_tokens"] = True  # (<tool_call>, [TOOL_CALLS]...)
        inp = {"messages": _messages(body["messages"]),
               "tools": list(tools.tools) if tools is not None else None,
               **_chat_options(body)}
        req = _build(inp, sampling, _request_kwargs(body))
        return _Job(
            "chat", body["model"], [req], body.get("n") or 1, bool(body.get("stream")),
            *self._include_usage(body), (top or 0) if body.get("logprobs") else None, [""],
            prompt_logprobs=body.get("prompt_logprobs"), tools=tools,
            reasoning=bool(self._reasoning_parser) and (
                body.get("chat_template_kwargs") or {}).get("enable_thinking") is not False,
            include_reasoning=body.get("include_reasoning") is not False)

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
        body = await self._body(request, _TOKENIZE_FIELDS, need_model=False)
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise _bad("give prompt (a string) or messages, not both")
        if body.get("tools") is not None and body.get("messages") is None:
            raise _bad("tools go with messages", "tools")
        if body.get("prompt") is not None:
            if set(body) & set(_CHAT_OPTIONS):
                raise _bad("continue_final_message, add_generation_prompt and "
                           "chat_template_kwargs go with messages")
            req = build_tokenize_request(body["prompt"],
                                         add_special_tokens=body.get("add_special_tokens"))
        else:
            tools = _tool_plan({"tools": body.get("tools"), "tool_choice": "none"}, "")
            req = build_tokenize_request(messages=_messages(body["messages"]),
                                         tools=list(tools.tools) if tools else None,
                                         add_special_tokens=body.get("add_special_tokens"),
                                         **_chat_options(body))
        resp = await self._gen.Tokenize(req, metadata=self._metadata(request, ""))
        return web.json_response({"tokens": list(resp.token_ids), "count": len(resp.token_ids),
                                  "max_model_len": resp.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's: {"tokens"} -> {"prompt"}."""
        body = await self._body(request, _DETOKENIZE_FIELDS, need_model=False)
        tokens = body.get("tokens")
        if tokens is None or not all(0 <= t < 2**32 for t in tokens):
            raise _bad("tokens is required: an array of token ids (whole numbers >= 0)",
                       "tokens")
        resp = await self._gen.Detokenize(pb.TokenIds(ids=tokens),
                                          metadata=self._metadata(request, ""))
        return web.json_response({"prompt": resp.text})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's: {"lora_name", "lora_path" (relative to the adapter root), "load_inplace"}
        -> LoadAdapter, or SwapAdapter with load_inplace (which loads a new name too); the
        gRPC admin check applies (the caller's token must be the admin one). Answers in
        vLLM's words, as text."""
        body = await self._body(request, _LOAD_FIELDS, need_model=False)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise _bad("lora_name and lora_path are required (lora_path: the adapter's "
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
            raise _bad(f"{err.details()}; or send load_inplace: true", "lora_name") from None
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's: {"lora_name"} (every version, or "name@version") -> UnloadAdapter,
        waiting for the requests that use it (up to 30 s)."""
        body = await self._body(request, _UNLOAD_FIELDS, need_model=False)
        name = body.get("lora_name")
        if body.get("lora_int_id") is not None:
            raise _bad("lora_int_id is not supported: adapters have names here; send "
                       "lora_name", "lora_int_id")
        if not name:
            raise _bad("lora_name is required", "lora_name")
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
            raise _bad("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        _check_types(body, fields)
        if need_model and not isinstance(body.get("model"), str):
            raise _bad("model is required: the base model's name, an adapter or a route",
                       "model")
        return body

    @staticmethod
    def _include_usage(body: dict) -> tuple[bool, bool]:
        """stream_options: (a last chunk with the usage, the usage so far in every chunk:
        vLLM's continuous_usage_stats, with include_usage)."""
        options = body.get("stream_options")
        if options is None:
            return False, False
        if not body.get("stream"):
            raise _bad("stream_options is only for a stream: send stream: true, or drop it",
                       "stream_options")
        for name, value in options.items():
            if name not in _STREAM_OPTIONS or not json_fields.is_type(value, _STREAM_OPTIONS[name]):
                raise _bad(f"stream_options takes include_usage and continuous_usage_stats "
                           f"(true or false), got {json.dumps({name: value})[:80]}",
                           "stream_options")
        usage = bool(options.get("include_usage"))
        return usage, usage and bool(options.get("continuous_usage_stats"))

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

    def _requests_of(self, job: _Job) -> list[pb.GenerateRequest]:
        """The job's gRPC requests, naming the adapter of its `model`."""
        for r in job.requests:
            r.adapter = self._adapter(job.model)
        return job.requests

    def _calls(self, request: web.Request, job: _Job) -> list:
        adapter = self._adapter(job.model)
        md = self._metadata(request, adapter)
        self._requests_of(job)
        if job.stream:
            return [self._gen.GenerateStream(r, metadata=md) for r in job.requests]
        return [self._gen.Generate(r, metadata=md) for r in job.requests]

    async def _answer(self, request: web.Request, job: _Job) -> web.StreamResponse:
        calls = self._calls(request, job)
        try:
            if job.stream:
                return await self._stream(request, job, calls)
            return await self._whole(job, calls)
        finally:
            for call in calls:
                call.cancel()  # (a no-op for a call that has ended)

    async def _whole(self, job: _Job, calls: list) -> web.Response:
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

    async def _stream(self, request: web.Request, job: _Job, calls: list) -> web.StreamResponse:
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

    def _choice(self, job: _Job, index: int, text: str, logprobs, finish: str | None,
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
    def _scored(job: _Job, resp: pb.GenerateResponse) -> list | None:
        """vLLM's prompt_logprobs of an answer, when the request asked for them."""
        if job.prompt_logprobs is None:
            return None
        return _vllm_prompt_logprobs(resp.prompt_logprobs, job.prompt_logprobs)

    @staticmethod
    def _id(job: _Job, request_id: str) -> str:
        return ("cmpl-" if job.kind == "completion" else "chatcmpl-") + request_id

    @staticmethod
    def _object(job: _Job, chunk: bool) -> str:
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
    get at `close`."""

    def __init__(self, grpc_target: str, host: str, port: int, model_name: str,
                 list_token: str = "", tls: tuple[str, str] | None = None,
                 grpc_tls_ca: str | None = None, grace: float = 5.0,
                 requests: Counter | None = None, tool_call_parser: str = "",
                 reasoning_parser: str = ""):
        self.grpc_target, self._grpc_tls_ca = grpc_target, grpc_tls_ca
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
                        self._tool_call_parser, self._reasoning_parser)
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
