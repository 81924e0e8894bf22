"""The OpenAI-compatible HTTP API's requests (openai_api.py serves them): the fields each
endpoint takes, their checks, and how a body becomes GenerateRequests. ApiError is what a
request that cannot be served gets: an HTTP status and OpenAI's error body.

Request fields: OpenAI's (max_tokens, or max_completion_tokens in chat; temperature,
default 1; top_p, n, stream, stream_options (include_usage, and vLLM's
continuous_usage_stats), stop, seed, presence_penalty, frequency_penalty, logit_bias,
logprobs, top_logprobs in chat, echo (with logprobs: the prompt scored too, its tokens
leading the choice's logprobs), user -> the route's routing_key; response_format
json_schema -> guided_json, json_object -> guided_json {"type": "object"}) and vLLM's
extra ones (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, guided_regex, guided_choice, guided_json,
structured_outputs (the same guides), priority, truncate_prompt_tokens,
add_special_tokens, allowed_token_ids, bad_words, prompt_logprobs: answered in vLLM's
form, a completion choice's field or chat's top-level one, in a stream's first chunk),
plus routing_key; chat's tools, tool_choice and parallel_tool_calls, with messages that
carry tool_calls and tool results (openai_tools.py says what each tool_choice does); with
--reasoning-parser, chat's reasoning_content (openai_reasoning.py). What cannot be
honoured is refused with 400, never ignored: suffix, best_of other than n, a message part
that is not text, functions / function_call (send tools / tool_choice), tool_choice auto
on a server without --tool-call-parser, unload_lora_adapter's lora_int_id (adapters have
names here), and any unknown field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc

from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client.types import build_generate_request
from loraplex import json_fields, openai_tools
from loraplex.openai_reasoning import ReasoningParser
from loraplex.openai_tools import Parser, ToolPlan

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
CHAT_OPTIONS = {"continue_final_message": bool, "add_generation_prompt": bool,
                "chat_template_kwargs": dict}
_COMMON = {"model": str, "max_tokens": int, "temperature": float, "top_p": float, "n": int,
           "stream": bool, "stop": (str, list), "seed": int, "presence_penalty": float,
           "frequency_penalty": float, "logit_bias": dict, "best_of": int, "user": str,
           "stream_options": dict}
COMPLETION_FIELDS = {**_COMMON, "prompt": (str, list), "logprobs": int, "echo": bool,
                     "suffix": str, "response_format": dict, **_EXTRAS}
CHAT_FIELDS = {**_COMMON, "messages": list, "max_completion_tokens": int, "logprobs": bool,
               "top_logprobs": int, "response_format": dict, "tools": list,
               "tool_choice": (str, dict), "parallel_tool_calls": bool, "functions": list,
               "function_call": (str, dict), "include_reasoning": bool, **CHAT_OPTIONS,
               **_EXTRAS}
RESPONSES_FIELDS = {  # (openai_responses.py; store, metadata, service_tier: _IGNORED)
    "model": str, "input": (str, list), "instructions": str, "max_output_tokens": int,
    "temperature": float, "top_p": float, "tools": list, "tool_choice": (str, dict),
    "parallel_tool_calls": bool, "text": dict, "stream": bool, "user": str,
    "previous_response_id": str, "background": bool, "include": list, "reasoning": dict,
    "truncation": str, "seed": int, "stop": (str, list), "presence_penalty": float,
    "frequency_penalty": float, "logit_bias": dict, "include_reasoning": bool,
    **CHAT_OPTIONS, **_EXTRAS}
TOKENIZE_FIELDS = {"model": str, "prompt": str, "messages": list, "tools": list,
                   "add_special_tokens": bool, **CHAT_OPTIONS}
_GUIDES = ("guided_json", "guided_regex", "guided_choice")
DETOKENIZE_FIELDS = {"model": str, "tokens": list}
LOAD_FIELDS = {"lora_name": str, "lora_path": str, "load_inplace": bool}
UNLOAD_FIELDS = {"lora_name": str, "lora_int_id": int}
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


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---- requests --------------------------------------------------------------------------

def check_types(body: dict, fields: dict) -> None:
    """400 for an unknown field or a value of the wrong JSON type (null = unset)."""
    problem = json_fields.first_problem(body, fields, _ITEMS, ignored=_IGNORED)
    if problem is not None:
        raise bad(problem[1], problem[0])


def sampling_fields(body: dict, max_tokens: int | None) -> dict:
    """GenerateRequest fields shared by both endpoints."""
    if body.get("best_of") not in (None, body.get("n") or 1):
        raise bad("best_of other than n is not supported: each of the n completions is "
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
            raise bad("logit_bias maps token ids (as strings) to numbers, e.g. "
                      '{"50256": -100}', "logit_bias") from None
    if body.get("prompt_logprobs") is not None \
            and not 0 <= body["prompt_logprobs"] <= MAX_LOGPROBS:
        raise bad(f"prompt_logprobs must be 0 to {MAX_LOGPROBS} (alternatives per prompt "
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
            raise bad(f"give {name} or guided_json / guided_regex / guided_choice, not both",
                      name)
        out.update(given)
    if body.get("skip_special_tokens") is False:
        out["keep_special_tokens"] = True
    return out


def request_kwargs(body: dict) -> dict:
    """build_generate_request's keyword arguments other than the input and sampling."""
    return {"adapter": "", "routing_key": body.get("routing_key") or body.get("user") or "",
            "priority": body.get("priority") or 0,
            "truncate_prompt_tokens": body.get("truncate_prompt_tokens"),
            "add_special_tokens": body.get("add_special_tokens")}


def prompt_inputs(value) -> list[dict]:
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
    raise bad("prompt must be a string, an array of strings, an array of token ids (whole "
              "numbers >= 0) or an array of such arrays, and not empty", "prompt")


def parse_messages(value: list) -> list[dict]:
    """OpenAI's messages -> loraplex_client.types.chat_messages' dicts."""
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"{where} must be an object with a role and a content", "messages")
        turn = {"role": m["role"], "content": _content(where, m.get("content"))}
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls must be an array", "messages")
            turn["tool_calls"] = [_history_call(f"{where}.tool_calls[{j}]", c)
                                  for j, c in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise bad(f"{where}.{key} must be a string", "messages")
                turn[key] = m[key]
        out.append(turn)
    if not out:
        raise bad("messages is empty: send at least one message", "messages")
    return out


def _content(where: str, content) -> str:
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise bad(f"{where}.content: only parts of type 'text' are supported", "messages")
        if any(not isinstance(p.get("text"), str) for p in content):
            raise bad(f"{where}.content: each text part needs a string 'text'", "messages")
        content = "".join(p["text"] for p in content)
    if content is None:
        return ""
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or an array of text parts", "messages")
    return content


def _history_call(where: str, call) -> dict:
    """An assistant message's earlier tool call: {"id", "type", "function": {"name",
    "arguments" (JSON text)}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or not isinstance(fn.get("arguments", ""), str) \
            or not isinstance(call.get("id", ""), str):
        raise bad(f'{where} must be {{"id": ..., "type": "function", "function": {{"name": '
                  f'..., "arguments": "<JSON text>"}}}}', "messages")
    return {"id": call.get("id") or "", "function": {"name": fn["name"],
                                                     "arguments": fn.get("arguments") or "{}"}}


def tool_plan(body: dict, parser: str) -> ToolPlan | None:
    for name, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(name) is not None:
            raise bad(f"{name} (deprecated by OpenAI) is not supported: send {instead}", name)
    try:
        return openai_tools.plan(body.get("tools"), body.get("tool_choice"),
                                 body.get("parallel_tool_calls"), parser)
    except openai_tools.ToolError as exc:
        raise bad(str(exc), exc.param) from None


def chat_options(body: dict) -> dict:
    """vLLM's continue_final_message, add_generation_prompt and chat_template_kwargs as
    chat_messages' arguments."""
    go_on = bool(body.get("continue_final_message"))
    prompt = body.get("add_generation_prompt")
    if go_on and prompt:
        raise bad("continue_final_message continues the last message: it cannot take "
                  "add_generation_prompt true too", "add_generation_prompt")
    if prompt is False and not go_on:
        raise bad("add_generation_prompt false is supported only with "
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
        raise bad(f"structured_outputs.{refused[0]} is not supported: give one of json, "
                  "regex, choice, json_object", "structured_outputs")
    out = {"guided_json": JSON_OBJECT if spec.get("json_object") else spec.get("json"),
           "guided_regex": spec.get("regex"), "guided_choice": spec.get("choice")}
    for name, kind in (("guided_json", (str, dict)), ("guided_regex", str),
                       ("guided_choice", list)):
        if out[name] is not None and not isinstance(out[name], kind):
            raise bad(f"structured_outputs: {name.removeprefix('guided_')} has the wrong "
                      f"type, got {json.dumps(out[name])[:80]}", "structured_outputs")
    if sum(v is not None for v in out.values()) > 1 or spec.get("json_object") and \
            spec.get("json") is not None:
        raise bad("structured_outputs takes one of json, regex, choice, json_object",
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
            raise bad("response_format.json_schema.schema must be a JSON schema object",
                      "response_format")
        return schema
    if kind == "json_object":
        return JSON_OBJECT
    raise bad(f"response_format type {kind!r} is unknown; use text, json_object or "
              "json_schema", "response_format")


def build_request(inp: dict, sampling: dict, kwargs: dict) -> pb.GenerateRequest:
    try:
        return build_generate_request(**inp, **kwargs, **sampling)
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None


@dataclass(frozen=True)
class Job:
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


def usage_options(body: dict) -> tuple[bool, bool]:
    """stream_options: (a last chunk with the usage, the usage so far in every chunk:
    vLLM's continuous_usage_stats, with include_usage)."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not body.get("stream"):
        raise bad("stream_options is only for a stream: send stream: true, or drop it",
                  "stream_options")
    for name, value in options.items():
        if name not in _STREAM_OPTIONS or not json_fields.is_type(value, _STREAM_OPTIONS[name]):
            raise bad(f"stream_options takes include_usage and continuous_usage_stats "
                      f"(true or false), got {json.dumps({name: value})[:80]}",
                      "stream_options")
    usage = bool(options.get("include_usage"))
    return usage, usage and bool(options.get("continuous_usage_stats"))


def chat_job(body: dict, tool_call_parser: str, reasoning_parser: str) -> Job:
    """A chat request's gRPC call and what its answer needs (400 for what is wrong)."""
    if not body.get("messages"):
        raise bad("messages is required and must not be empty", "messages")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    sampling = sampling_fields(body, max_tokens)
    top = body.get("top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad(f"top_logprobs must be 0 to {MAX_LOGPROBS}, got {top}", "top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    if body.get("logprobs"):
        sampling.update(logprobs=True, top_logprobs=top or 0)
    tools = tool_plan(body, tool_call_parser)
    forced = tools.guided_json() if tools is not None else None
    if forced is not None:
        given = [g for g in _GUIDES if sampling.get(g) is not None]
        if given:
            which = ("response_format" if _guided_json(body.get("response_format"))
                     is not None else "structured_outputs" if body.get("structured_outputs")
                     else given[0])
            raise bad(f"tool_choice {tools.mode} guides the output to the tool call: "
                      f"drop {which}", "tool_choice")
        sampling["guided_json"] = forced
    if tools is not None and tools.keeps_special_tokens() \
            and body.get("skip_special_tokens") is None:
        sampling["keep_special_tokens"] = True  # (<tool_call>, [TOOL_CALLS]...)
    inp = {"messages": parse_messages(body["messages"]),
           "tools": list(tools.tools) if tools is not None else None,
           **chat_options(body)}
    req = build_request(inp, sampling, request_kwargs(body))
    return Job(
        "chat", body["model"], [req], body.get("n") or 1, bool(body.get("stream")),
        *usage_options(body), (top or 0) if body.get("logprobs") else None, [""],
        prompt_logprobs=body.get("prompt_logprobs"), tools=tools,
        reasoning=bool(reasoning_parser) and (
            body.get("chat_template_kwargs") or {}).get("enable_thinking") is not False,
        include_reasoning=body.get("include_reasoning") is not False)
