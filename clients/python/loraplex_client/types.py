"""Plain result types of the client (no protobuf in user code)."""

from __future__ import annotations

import json

from dataclasses import dataclass

from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb

_FINISH = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_DEADLINE: "deadline",
    pb.FINISH_REASON_ERROR: "error",
}
_TIER = {pb.TIER_UNSPECIFIED: "", pb.TIER_GPU: "gpu", pb.TIER_CPU: "cpu", pb.TIER_DISK: "disk"}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first
    token: bytes = b""  # what the token adds to the text (may be part of a UTF-8 character)
    rank: int = 1  # 1 + how many tokens were more likely (1: the most likely)
    special: bool = False  # a special token of the tokenizer (EOS, BOS, ...)


@dataclass(frozen=True)
class Chunk:
    """One message of a stream: the tokens and text new since the previous one."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "length" | "stop" on the last chunk, else None
    prompt_tokens: int
    completion_tokens: int  # so far
    adapter: str  # "name@version", "" for the base model
    logprobs: tuple[TokenLogprob, ...] = ()
    request_id: str = ""
    route: str = ""  # the route (alias) that chose `adapter`; "" when none
    # with prompt_logprobs: one per prompt token after the first (in a stream: the first chunk)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # which of the request's n completions this chunk is about


@dataclass(frozen=True)
class Completion:
    """One of the n completions of a request (Result.completions)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Result:
    """A whole completion."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    logprobs: tuple[TokenLogprob, ...] = ()
    request_id: str = ""
    route: str = ""  # the route (alias) that chose `adapter`; "" when none
    # with prompt_logprobs: one per prompt token after the first (in a stream: the first chunk)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    # every completion, in index order (one with n = 1); the fields above are completion 0's
    completions: tuple[Completion, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: str
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    tier: str  # "gpu" | "cpu" | "disk"
    current: bool
    in_use: int
    requests_served: int
    last_used: float | None = None  # unix time
    load_time_s: float | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _logprobs(entries) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(lp.token_id, lp.logprob,
                              tuple((t.token_id, t.logprob) for t in lp.top), lp.token,
                              lp.rank, lp.special)
                 for lp in entries)


def chunk_from_pb(msg: pb.GenerateResponse) -> Chunk:
    return Chunk(text=msg.text, token_ids=tuple(msg.token_ids),
                 finish_reason=_FINISH.get(msg.finish_reason), prompt_tokens=msg.prompt_tokens,
                 completion_tokens=msg.completion_tokens, adapter=msg.adapter,
                 logprobs=_logprobs(msg.logprobs), request_id=msg.request_id, route=msg.route,
                 prompt_logprobs=_logprobs(msg.prompt_logprobs), index=msg.index)


def result_from_pb(msg: pb.GenerateResponse) -> Result:
    c = chunk_from_pb(msg)
    completions = tuple(
        Completion(index=m.index, text=m.text, token_ids=tuple(m.token_ids),
                   finish_reason=_FINISH.get(m.finish_reason),
                   completion_tokens=m.completion_tokens, logprobs=_logprobs(m.logprobs))
        for m in msg.completions) or (
        Completion(index=0, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
                   completion_tokens=c.completion_tokens, logprobs=c.logprobs),)
    return Result(text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
                  prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                  adapter=c.adapter, logprobs=c.logprobs, request_id=c.request_id,
                  route=c.route, prompt_logprobs=c.prompt_logprobs, completions=completions)


def adapter_from_pb(msg: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=msg.name, version=msg.version, path=msg.path, rank=msg.rank, alpha=msg.alpha,
        target_modules=tuple(msg.target_modules), size_bytes=msg.size_bytes,
        tier=_TIER.get(msg.tier, ""), current=msg.current, in_use=msg.in_use,
        requests_served=msg.requests_served,
        last_used=(msg.last_used.ToNanoseconds() / 1e9) if msg.HasField("last_used") else None,
        load_time_s=(msg.load_time.ToNanoseconds() / 1e9) if msg.HasField("load_time") else None)


SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens",
                   "stop", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs",
                   "prompt_logprobs", "logit_bias", "allowed_token_ids", "guided_regex",
                   "guided_choice", "guided_json", "n", "include_stop_str_in_output",
                   "keep_special_tokens", "bad_words")


def build_generate_request(prompt=None, *, input_ids=None, messages=None, tools=None,
                           continue_final_message: bool = False,
                           chat_template_kwargs: dict | None = None,
                           adapter: str = "", routing_key: str = "", priority: int = 0,
                           truncate_prompt_tokens: int | None = None,
                           add_special_tokens: bool | None = None,
                           **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from Python values. Give exactly one of prompt, input_ids, messages
    (messages: a list of {"role", "content"} dicts or (role, content) pairs; with tools,
    continue_final_message and chat_template_kwargs, see `chat_messages`)."""
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling options {sorted(unknown)}; use {SAMPLING_FIELDS}")
    given = [x is not None for x in (prompt, input_ids, messages)]
    if sum(given) != 1:
        raise TypeError("give exactly one of prompt, input_ids, messages")
    _check_chat_options(messages, tools, continue_final_message, chat_template_kwargs)
    req = pb.GenerateRequest(adapter=adapter or "", routing_key=routing_key or "")
    fields = {"priority": int(priority), "truncate_prompt_tokens": truncate_prompt_tokens,
              "add_special_tokens": add_special_tokens, **sampling}
    if prompt is not None:
        req.prompt = prompt
    elif input_ids is not None:
        req.input_ids.ids.extend(int(i) for i in input_ids)
    else:
        req.messages.CopyFrom(chat_messages(messages, tools, continue_final_message,
                                            chat_template_kwargs))
    for name, value in fields.items():
        if value is None:
            continue
        try:
            if name in ("stop", "stop_token_ids", "allowed_token_ids", "guided_choice",
                        "bad_words"):
                getattr(req, name).extend([value] if isinstance(value, str) else value)
            elif name == "guided_json" and not isinstance(value, str):  # a schema as a dict
                req.guided_json = json.dumps(value)
            elif name == "logit_bias":  # {token id: bias}
                req.logit_bias.update({int(t): float(b) for t, b in dict(value).items()})
            else:
                setattr(req, name, value)
        except (TypeError, ValueError) as exc:  # (protobuf's own words name no field)
            raise ValueError(f"{name}={value!r} cannot be sent: {_field_rule(req, name, exc)}") \
                from None
    return req


def _check_chat_options(messages, tools, continue_final_message, chat_template_kwargs) -> None:
    if (tools is not None or continue_final_message or chat_template_kwargs is not None) \
            and messages is None:
        raise TypeError("tools, continue_final_message and chat_template_kwargs go with "
                        "messages")


def _field_rule(req, name: str, exc: Exception) -> str:
    field = req.DESCRIPTOR.fields_by_name[name]
    bits = {field.TYPE_UINT32: 32, field.TYPE_UINT64: 64}.get(field.type)
    if bits and "out of range" in str(exc):
        return f"{name} takes whole numbers from 0 to {2 ** bits - 1} ({exc})"
    return str(exc)


def chat_messages(messages, tools=None, continue_final_message: bool = False,
                  chat_template_kwargs: dict | None = None) -> pb.ChatMessages:
    """ChatMessages from OpenAI's shapes. messages: {"role", "content"} dicts or (role,
    content) pairs; an assistant's dict may hold "tool_calls" ([{"id", "function": {"name",
    "arguments"}}], arguments as JSON text or a dict), a tool's "tool_call_id" and "name".
    tools: [{"type": "function", "function": {"name", "description", "parameters"}}] (or
    the inner dicts), parameters a JSON schema as a dict or its text.
    continue_final_message: continue the last (assistant's) message instead of a new turn;
    chat_template_kwargs: variables for the template ({"enable_thinking": False})."""
    chat = pb.ChatMessages(continue_final_message=continue_final_message,
                           chat_template_kwargs=_json_text(chat_template_kwargs, ""))
    for m in messages:
        if not isinstance(m, dict):
            role, content = m
            chat.messages.add(role=role, content=content)
            continue
        turn = chat.messages.add(role=m["role"], content=m.get("content") or "",
                                 tool_call_id=m.get("tool_call_id") or "",
                                 name=m.get("name") or "")
        for call in m.get("tool_calls") or ():
            fn = call.get("function", call)
            turn.tool_calls.add(id=call.get("id") or "", name=fn["name"],
                                arguments=_json_text(fn.get("arguments"), "{}"))
    for tool in tools or ():
        fn = tool.get("function", tool)
        chat.tools.add(name=fn["name"], description=fn.get("description") or "",
                       parameters=_json_text(fn.get("parameters"), ""))
    return chat


def _json_text(value, default: str) -> str:
    if value is None:
        return default
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Tokens:
    """An input as Generate sees it (Client.tokenize)."""

    token_ids: tuple[int, ...]
    max_model_len: int  # the most tokens a prompt plus its completion may hold


def build_tokenize_request(prompt=None, *, messages=None, tools=None,
                           continue_final_message: bool = False,
                           chat_template_kwargs: dict | None = None,
                           add_special_tokens: bool | None = None) -> pb.TokenizeRequest:
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt, messages")
    _check_chat_options(messages, tools, continue_final_message, chat_template_kwargs)
    req = (pb.TokenizeRequest(prompt=prompt) if prompt is not None else pb.TokenizeRequest(
        messages=chat_messages(messages, tools, continue_final_message, chat_template_kwargs)))
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def tokens_from_pb(msg: pb.TokenizeResponse) -> Tokens:
    return Tokens(token_ids=tuple(msg.token_ids), max_model_len=msg.max_model_len)


@dataclass(frozen=True)
class ShadowComparison:
    """How a shadow candidate's answers compared with the primary's."""

    primary: str
    candidate: str
    compared: int
    exact_match_rate: float
    token_agreement: float
    latency_ratio: float
    candidate_errors: int


@dataclass(frozen=True)
class GuardTrip:
    time: float  # unix time
    adapter: str  # the candidate name@version whose weight was set to 0
    metric: str  # error_rate | latency_ratio | disagreement
    value: float
    limit: float


@dataclass(frozen=True)
class RouteInfo:
    """A route: an alias over adapter versions with weights."""

    alias: str
    targets: tuple[tuple[str, float], ...]  # (name@version, weight)
    primary: str
    shadow: tuple[str, float] | None = None  # (name@version, fraction)
    guard: dict | None = None  # max_error_rate, max_latency_ratio, max_disagreement, window
    comparisons: tuple[ShadowComparison, ...] = ()
    trips: tuple[GuardTrip, ...] = ()
    history: tuple[tuple[tuple[str, float], ...], ...] = ()  # earlier targets, oldest first

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.targets)


def route_from_pb(m: pb.RouteInfo) -> RouteInfo:
    guard = None
    if m.HasField("guard"):
        guard = {"window": m.guard.window}
        for k in ("max_error_rate", "max_latency_ratio", "max_disagreement"):
            guard[k] = getattr(m.guard, k) if m.guard.HasField(k) else None
    return RouteInfo(
        alias=m.alias, targets=tuple((t.adapter, t.weight) for t in m.targets), primary=m.primary,
        shadow=(m.shadow.adapter, m.shadow.fraction) if m.HasField("shadow") else None,
        guard=guard,
        comparisons=tuple(ShadowComparison(c.primary, c.candidate, c.compared, c.exact_match_rate,
                                           c.token_agreement, c.latency_ratio, c.candidate_errors)
                          for c in m.comparisons),
        trips=tuple(GuardTrip(t.time.ToNanoseconds() / 1e9, t.adapter, t.metric, t.value, t.limit)
                    for t in m.trips),
        history=tuple(tuple((t.adapter, t.weight) for t in h.targets) for h in m.history))


def build_set_route_request(alias: str, targets, shadow=None, guard=None) -> pb.SetRouteRequest:
    """targets: {ref: weight} or [(ref, weight)]; shadow: (ref, fraction); guard: dict with
    any of max_error_rate, max_latency_ratio, max_disagreement, window."""
    items = targets.items() if isinstance(targets, dict) else targets
    req = pb.SetRouteRequest(alias=alias,
                             targets=[pb.RouteTarget(adapter=r, weight=w) for r, w in items])
    if shadow is not None:
        req.shadow.adapter, req.shadow.fraction = shadow[0], shadow[1]
    if guard is not None:
        req.guard.window = int(guard.get("window") or 0)
        for k in ("max_error_rate", "max_latency_ratio", "max_disagreement"):
            if guard.get(k) is not None:
                setattr(req.guard, k, guard[k])
    return req
