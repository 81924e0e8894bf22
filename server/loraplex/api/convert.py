"""Protobuf <-> domain types (loraplex.engine.request, AdapterInfo). Nothing else.

Every check here is about the shape of the protobuf message (which oneof is set,
ids inside the vocabulary, a chat template to render with); range checks of the
sampling options belong to SamplingParams.validate, in the domain.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from collections.abc import Callable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.engine.request import (FinishReason, GenerationRequest, RequestOutput,
                                     SamplingParams)
from loraplex.errors import InvalidArgument
from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb

FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
TIER_TO_PB = {"gpu": pb.TIER_GPU, "cpu": pb.TIER_CPU, "disk": pb.TIER_DISK}

_DEFAULT_SAMPLING = SamplingParams()
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_PROMPT_CHARS = 4_000_000  # grpc's default message limit is 4 MiB anyway


def sampling_from_pb(req: pb.GenerateRequest) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults."""
    d = _DEFAULT_SAMPLING
    return SamplingParams(
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else d.max_new_tokens,
        temperature=float(req.temperature),
        top_p=float(req.top_p) if req.HasField("top_p") else d.top_p,
        top_k=int(req.top_k),
        seed=int(req.seed) if req.HasField("seed") else None,
        repetition_penalty=(float(req.repetition_penalty) if req.HasField("repetition_penalty")
                            else d.repetition_penalty),
        presence_penalty=float(req.presence_penalty),
        frequency_penalty=float(req.frequency_penalty),
        min_p=float(req.min_p),
        min_tokens=int(req.min_tokens),
        stop=tuple(req.stop),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        keep_special_tokens=bool(req.keep_special_tokens),
        stop_token_ids=tuple(int(t) for t in req.stop_token_ids),
        bad_words=tuple(req.bad_words),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in req.logit_bias.items())),
        allowed_token_ids=tuple(int(t) for t in req.allowed_token_ids),
        ignore_eos=bool(req.ignore_eos),
        logprobs=bool(req.logprobs or req.top_logprobs),
        top_logprobs=int(req.top_logprobs),
        prompt_logprobs=int(req.prompt_logprobs) if req.HasField("prompt_logprobs") else None,
        guided_regex=req.guided_regex,
        guided_choice=tuple(req.guided_choice),
        guided_json=req.guided_json,
    )


def prompt_ids_from_pb(req: pb.GenerateRequest | pb.TokenizeRequest, tokenizer) -> list[int]:
    """Token ids of the request's input (prompt text, ids, or chat messages). The engine
    checks the ids against the vocabulary and the context length."""
    which = req.WhichOneof("input")
    if which is None:
        choices = [f.name for f in req.DESCRIPTOR.oneofs_by_name["input"].fields]
        raise InvalidArgument(f"set one of {', '.join(choices)}")
    special = req.add_special_tokens if req.HasField("add_special_tokens") else None
    if which != "prompt" and special:
        raise InvalidArgument(f"add_special_tokens is for a prompt: {which} get no special "
                              "tokens added (the chat template writes them)")
    if which == "prompt":
        if not req.prompt:
            raise InvalidArgument("prompt is empty")
        if len(req.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        ids = tokenizer.encode(req.prompt, add_special_tokens=special is not False)
    elif which == "input_ids":
        ids = list(req.input_ids.ids)
    else:
        ids = _render_chat(req.messages, tokenizer)
    if not ids:
        raise InvalidArgument(f"{which} is empty")
    return list(ids)


def token_ids_from_pb(msg: pb.TokenIds, vocab_size: int) -> list[int]:
    ids = list(msg.ids)
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise InvalidArgument(f"token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
    return ids


def _render_chat(chat: pb.ChatMessages, tokenizer) -> list[int]:
    if not chat.messages:
        raise InvalidArgument("messages is empty")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("this model has no chat template: send a prompt or input_ids")
    turns = [_turn(i, m) for i, m in enumerate(chat.messages)]
    tools = [_tool(i, t) for i, t in enumerate(chat.tools)] or None
    extra = _template_kwargs(chat.chat_template_kwargs, tokenizer)
    go_on = chat.continue_final_message
    if go_on and turns[-1]["role"] != "assistant":
        raise InvalidArgument("continue_final_message continues the assistant's message: "
                              f"the last message's role is {turns[-1]['role']!r}")
    try:
        text = tokenizer.apply_chat_template(turns, tools=tools, tokenize=False,
                                             add_generation_prompt=not go_on,
                                             continue_final_message=go_on, **extra)
    except Exception as exc:  # jinja's TemplateError, raise_exception() of the template
        raise InvalidArgument(f"the chat template refused these messages: {exc}") from None
    # The template writes the special tokens (BOS...) itself.
    return tokenizer.encode(text, add_special_tokens=False)


def _template_kwargs(text: str, tokenizer) -> dict:
    """chat_template_kwargs: a JSON object of template variables, none of them a name that
    apply_chat_template takes itself."""
    if not text:
        return {}
    extra = _json(text, "chat_template_kwargs")
    if not isinstance(extra, dict):
        raise InvalidArgument('chat_template_kwargs must be a JSON object, e.g. '
                              '{"enable_thinking": false}')
    taken = sorted(set(extra) & (_apply_parameters(type(tokenizer)) | {"messages"}))
    if taken:
        raise InvalidArgument(f"chat_template_kwargs cannot set {taken}: apply_chat_template "
                              "takes them itself")
    return extra


@functools.cache
def _apply_parameters(tokenizer_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(tokenizer_type.apply_chat_template).parameters)


def _turn(i: int, m: pb.ChatMessage) -> dict:
    """A message as chat templates take it (HF's shape: tool call arguments as objects)."""
    if not m.role:
        raise InvalidArgument(f"messages[{i}].role is empty")
    turn = {"role": m.role, "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name,
                          "arguments": _json(c.arguments or "{}", f"messages[{i}].tool_calls[{j}]"
                                                          ".arguments")}}
            for j, c in enumerate(m.tool_calls)]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    if m.name:
        turn["name"] = m.name
    return turn


def _tool(i: int, t: pb.Tool) -> dict:
    """A tool as chat templates take it (OpenAI's shape)."""
    if not t.name:
        raise InvalidArgument(f"tools[{i}].name is empty")
    parameters = (_json(t.parameters, f"tools[{i}].parameters") if t.parameters
                  else {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"tools[{i}].parameters must be a JSON schema object")
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": parameters}}


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not JSON: {exc}") from None


def generation_request_from_pb(req: pb.GenerateRequest, tokenizer, deadline: float | None,
                               max_model_len: int) -> GenerationRequest:
    """An unset max_new_tokens means the default, capped to what the context leaves."""
    ids = prompt_ids_from_pb(req, tokenizer)
    if req.HasField("truncate_prompt_tokens"):
        if req.truncate_prompt_tokens < 1:
            raise InvalidArgument("truncate_prompt_tokens must be >= 1 when set")
        ids = ids[-req.truncate_prompt_tokens:]
    sampling = sampling_from_pb(req)
    if not req.HasField("max_new_tokens"):
        room = max(1, max_model_len - len(ids))
        sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room))
    return GenerationRequest(prompt_ids=ids, sampling=sampling, adapter=req.adapter,
                             deadline=deadline, priority=int(req.priority), n=int(req.n) or 1)


def response_from_outputs(outputs: list[RequestOutput], token_bytes: Callable[[int], bytes],
                          special: frozenset[int] = frozenset()) -> pb.GenerateResponse:
    """One GenerateResponse holding the deltas of `outputs` (one stream message or a
    whole unary answer); counts and finish reason come from the last. `token_bytes` and
    `special` (the tokenizer's special ids) name the logprobs' tokens."""
    last = outputs[-1]
    resp = pb.GenerateResponse(
        text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        finish_reason=FINISH_TO_PB[last.finish_reason],
        prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
        adapter=last.adapter, request_id=last.request_id, index=last.index)
    for o in outputs:
        resp.logprobs.extend(_logprob_to_pb(lp, token_bytes, special) for lp in o.logprobs)
        resp.prompt_logprobs.extend(_logprob_to_pb(lp, token_bytes, special)
                                    for lp in o.prompt_logprobs)
    return resp


def response_from_completions(outputs: list[RequestOutput], n: int,
                              token_bytes: Callable[[int], bytes],
                              special: frozenset[int] = frozenset()) -> pb.GenerateResponse:
    """The answer of Generate: the deltas of `outputs` (a whole request's, of n completions)
    folded per completion; with n > 1, all in `completions` and completion 0's on top."""
    per: list[list[RequestOutput]] = [[] for _ in range(n)]
    for o in outputs:
        per[o.index].append(o)
    resp = response_from_outputs(per[0], token_bytes, special)
    if n > 1:
        for index, outs in enumerate(per):
            one = response_from_outputs(outs, token_bytes, special)
            resp.completions.append(pb.Completion(
                index=index, text=one.text, token_ids=one.token_ids,
                finish_reason=one.finish_reason, completion_tokens=one.completion_tokens,
                logprobs=one.logprobs))
    return resp


def _logprob_to_pb(lp, token_bytes: Callable[[int], bytes],
                   special: frozenset[int]) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                           special=lp.token_id in special,
                           token=token_bytes(lp.token_id),
                           top=[pb.TopLogprob(token_id=t, logprob=p, token=token_bytes(t))
                                for t, p in lp.top])


def adapter_info_to_pb(info) -> pb.AdapterInfo:
    msg = pb.AdapterInfo(
        name=info.name, version=info.version, path=str(info.path), rank=int(info.rank),
        alpha=float(info.alpha), target_modules=list(info.target_modules),
        size_bytes=int(info.size_bytes), tier=TIER_TO_PB.get(info.tier, pb.TIER_UNSPECIFIED),
        current=bool(info.current), in_use=int(info.in_use),
        requests_served=int(info.requests_served))
    if info.last_used is not None:
        ts = Timestamp()
        ts.FromNanoseconds(int(info.last_used * 1e9))
        msg.last_used.CopyFrom(ts)
    if info.load_time_s is not None:
        dur = Duration()
        dur.FromNanoseconds(int(info.load_time_s * 1e9))
        msg.load_time.CopyFrom(dur)
    return msg


def adapter_label(adapter: str) -> str:
    """The metrics label of a requested adapter: the reference as given ("" = base
    model, like the engine's labels), "_invalid" for malformed references."""
    name, _, version = adapter.partition("@")
    if not adapter:
        return ""
    ok = _ADAPTER_NAME.match(name) and (not version or _ADAPTER_NAME.match(version))
    return adapter if ok else "_invalid"


def merge_args_from_pb(req: pb.MergeAdaptersRequest) -> dict:
    """Keyword arguments of a merge (PEFT add_weighted_adapter names); unset = None."""
    if not req.name:
        raise InvalidArgument("name of the merged adapter is empty")
    if not req.sources:
        raise InvalidArgument("sources is empty: name at least one adapter")
    weights = list(req.weights) or [1.0] * len(req.sources)
    if len(weights) != len(req.sources):
        raise InvalidArgument(f"{len(req.weights)} weights for {len(req.sources)} sources")
    # The values of combination_type, density... are checked by the merge itself.
    return dict(name=req.name, sources=list(req.sources), weights=weights,
                combination_type=req.combination_type or "linear", density=float(req.density) or None,
                majority_sign_method=req.majority_sign_method or "total", svd_rank=int(req.svd_rank) or None,
                seed=int(req.seed) if req.HasField("seed") else None)
