"""OpenAI's Responses API (POST /v1/responses) on top of chat: a request becomes the chat
request it asks for (`chat_body`), served by the chat path (template, tools, guides, the
tool call and reasoning parsers), and the parsed pieces become Responses output items:
a `reasoning` item, a `message` with one `output_text`, `function_call` items. `Events`
turns them into the stream's typed events as they come.

Taken: model, input (a string, or message / function_call / function_call_output /
reasoning items; text parts only), instructions, max_output_tokens, temperature, top_p,
tools (function tools), tool_choice, parallel_tool_calls, text.format (text,
json_object, json_schema), stream, store, metadata, user, previous_response_id (the
stored conversation it continues comes in as `history`: openai_store.py), and the chat
API's vLLM extras. Refused with 400 saying so: background, non-function tools, include and
reasoning options. No gRPC and no HTTP here.
"""

from __future__ import annotations

import json
import secrets
import time

from loraplex.openai_tools import CallDelta, Piece, Reasoning

_OWN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
        "tools", "tool_choice", "parallel_tool_calls", "text", "stream", "store",
        "metadata", "user", "previous_response_id", "background", "include", "reasoning",
        "truncation", "service_tier"}
_REFUSED = {  # field -> why, when it is set (not null, false or empty)
    "background": "background responses are not supported",
    "include": "include is not supported (no stored or extra output)",
    "reasoning": "reasoning options are not supported: the server's --reasoning-parser "
                 "decides",
}


class ResponsesError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def chat_body(body: dict, history: tuple[dict, ...] = ()) -> dict:
    """A Responses request (its fields' JSON types checked) -> the chat request it asks
    for; fields that are not the Responses API's own (vLLM's extras) pass as they are.
    `history`: the chat messages of the response it continues (previous_response_id),
    which come after its instructions and before its input."""
    for name, why in _REFUSED.items():
        if body.get(name):
            raise ResponsesError(f"{name}: {why}", name)
    if body.get("truncation") not in (None, "disabled"):
        raise ResponsesError('truncation must be "disabled" (or the chat API\'s '
                             "truncate_prompt_tokens)", "truncation")
    passed = {"model", "temperature", "top_p", "stream", "user", "parallel_tool_calls"}
    out = {k: v for k, v in body.items() if k in passed or k not in _OWN}
    messages = [*history, *_messages(body.get("input"))]
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise ResponsesError("instructions must be a string", "instructions")
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    out["messages"] = messages
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        out["tools"] = [_tool(i, t) for i, t in enumerate(_list(body["tools"], "tools"))]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        out["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        out["response_format"] = _response_format(fmt)
    return out


def conversation(body: dict, chat: dict, output: list[dict]) -> list[dict]:
    """The chat messages that a response continuing this one (`body`, its chat form `chat`,
    its output items) comes after: its own, less its instructions (which, as OpenAI's,
    are not carried over), and its output's (less the reasoning)."""
    messages = chat["messages"][1:] if body.get("instructions") is not None else chat["messages"]
    return [*messages, *_messages(output)]


def input_items(value) -> list[dict]:
    """A request's `input` (checked by chat_body) as the items GET
    /v1/responses/{id}/input_items lists: each with its id (the caller's, or a new one)
    and its message content as parts."""
    out: list[dict] = []
    for item in [{"role": "user", "content": value}] if isinstance(value, str) else value:
        kind = item.get("type", "message")
        if kind == "message":
            content = item["content"]
            part = "output_text" if item["role"] == "assistant" else "input_text"
            out.append({"id": item.get("id") or new_id("msg"), "type": "message",
                        "role": item["role"], "status": item.get("status", "completed"),
                        "content": [{"type": part, "text": content}]
                        if isinstance(content, str) else content})
        elif kind in _CALL_ITEMS:
            prefix, fields = _CALL_ITEMS[kind]
            out.append({"id": item.get("id") or new_id(prefix), "type": kind,
                        **{f: item.get(f) for f in fields},
                        "status": item.get("status", "completed")})
        else:  # reasoning
            out.append({**item, "id": item.get("id") or new_id("rs")})
    return out


_CALL_ITEMS = {"function_call": ("fc", ("call_id", "name", "arguments")),  # kind -> id
               "function_call_output": ("fco", ("call_id", "output"))}  # prefix, fields


def page(items: list[dict], query) -> dict:
    """One page of a list of items (OpenAI's cursor pagination): `query` the request's
    limit (1-100, default 20), order ("asc" or "desc", the default: newest first), after
    and before (item ids)."""
    limit = query.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise ResponsesError(f"limit must be an integer from 1 to 100, got {limit!r}", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ResponsesError(f'order must be "asc" or "desc", got {order!r}', "order")
    if query.get("include"):
        raise ResponsesError(f"include: {_REFUSED['include']}", "include")
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]

    def index(name: str) -> int | None:
        if not query.get(name):
            return None
        if query[name] not in ids:
            raise ResponsesError(f"{name}: no input item {query[name]!r} in this response",
                                 name)
        return ids.index(query[name])

    after, before = index("after"), index("before")
    start = 0 if after is None else after + 1
    end = len(ordered) if before is None else before
    data = ordered[start:end][:int(limit)]
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + len(data) < end}


def _messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict] = []
    for i, item in enumerate(_list(value, "input")):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ResponsesError(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ResponsesError(f"{where}.role must be user, system, developer or "
                                     f"assistant, got {json.dumps(role)}", "input")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(where, item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else
                        _text(where + ".output", output)})
        elif kind != "reasoning":  # (an earlier turn's reasoning: not sent to the template)
            raise ResponsesError(f"{where}: items of type {kind!r} are not supported (message, "
                                 "function_call, function_call_output, reasoning)", "input")
    if not out:
        raise ResponsesError("input is required: a string or a list of items", "input")
    return out


def _text(where: str, content) -> str:
    """A message's content: a string, or text parts (input_text, output_text)."""
    if isinstance(content, str):
        return content
    parts = _list(content, "input")
    if any(not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text",
                                                             "text")
           or not isinstance(p.get("text"), str) for p in parts):
        raise ResponsesError(f"{where}: only text parts are supported (input_text, "
                             "output_text, each with a string text)", "input")
    return "".join(p["text"] for p in parts)


def _tool(i: int, tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise ResponsesError(f"tools[{i}]: only function tools are supported, got "
                             f"{json.dumps(kind)}", "tools")
    return {"type": "function", "function": {k: tool[k] for k in (
        "name", "description", "parameters", "strict") if tool.get(k) is not None}}


def _response_format(fmt) -> dict:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise ResponsesError('text.format.type must be "text", "json_object" or '
                             '"json_schema"', "text")
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {
        k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}


def _list(value, param: str) -> list:
    if not isinstance(value, list):
        raise ResponsesError(f"{param} must be an array", param)
    return value


# ---- answers ----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def response(body: dict, chat: dict, response_id: str, output: list[dict], status: str,
             usage: dict | None, stored: bool = False) -> dict:
    """The Response object: `body` the request, `chat` its chat form; `stored`: whether it
    is kept for previous_response_id and GET."""
    return {"id": response_id, "object": "response", "created_at": int(time.time()),
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "instructions": body.get("instructions"), "max_output_tokens":
            body.get("max_output_tokens"), "model": body["model"], "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": None,
            "store": stored,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto" if chat.get("tools") else "none"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0),
            "truncation": "disabled", "usage": usage, "user": body.get("user"),
            "metadata": body.get("metadata") or {}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def reasoning_item(item_id: str, text: str, done: bool = True) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if done else [],
            "status": "completed" if done else "in_progress"}


def message_item(item_id: str, text: str, done: bool = True) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant",
            "status": "completed" if done else "in_progress",
            "content": [output_text(text)] if done else []}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              done: bool = True) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed" if done else "in_progress"}


def output_items(pieces: list[Piece]) -> list[dict]:
    """The whole answer's output items from all of its pieces."""
    thought = "".join(p.text for p in pieces if isinstance(p, Reasoning))
    content = "".join(p for p in pieces if isinstance(p, str))
    items = [reasoning_item(new_id("rs"), thought)] if thought else []
    calls: list[dict] = []
    for p in pieces:
        if isinstance(p, CallDelta):
            if p.id:
                calls.append(call_item(new_id("fc"), p.id, p.name, ""))
            calls[p.index]["arguments"] += p.arguments
    if content or not calls:
        items.append(message_item(new_id("msg"), content))
    return items + calls


class Events:
    """The stream's events of one response, from its pieces as they come: each output item
    is added, grows by deltas, and is done before the next one starts."""

    def __init__(self, head: dict):
        self._head = head  # the Response object so far (status, output: the done items)
        self._seq = 0
        self._open: dict | None = None  # the item being written
        self._text = ""  # its text so far (reasoning, output text or arguments)

    @property
    def response(self) -> dict:
        """The Response object so far (once finished: the whole)."""
        return self._head

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self._head),
                self._event("response.in_progress", response=self._head)]

    def feed(self, pieces: list[Piece]) -> list[dict]:
        out: list[dict] = []
        for p in pieces:
            if isinstance(p, Reasoning):
                out += self._ensure("reasoning") + [self._delta(
                    "response.reasoning_text.delta", p.text, content_index=0)]
            elif isinstance(p, str):
                out += self._ensure("message") + [self._delta(
                    "response.output_text.delta", p, content_index=0, logprobs=[])]
            else:
                if p.id:
                    out += self._close()
                    out += self._add(call_item(new_id("fc"), p.id, p.name, "", done=False))
                out.append(self._delta("response.function_call_arguments.delta", p.arguments))
        return out

    def finish(self, status_: str, usage_: dict) -> list[dict]:
        out = self._close()
        self._head = {**self._head, "status": status_, "usage": usage_,
                      "incomplete_details": {"reason": "max_output_tokens"}
                      if status_ == "incomplete" else None}
        kind = "response.completed" if status_ == "completed" else "response.incomplete"
        return out + [self._event(kind, response=self._head)]

    def error(self, code: str, message: str) -> dict:
        """The event of a failure after the stream began (it ends the stream)."""
        return self._event("error", code=code, message=message, param=None)

    def _ensure(self, kind: str) -> list[dict]:
        if self._open is not None and self._open["type"] == kind:
            return []
        out = self._close()
        item = (reasoning_item(new_id("rs"), "", done=False) if kind == "reasoning"
                else message_item(new_id("msg"), "", done=False))
        out += self._add(item)
        part = ({"type": "reasoning_text", "text": ""} if kind == "reasoning"
                else output_text(""))
        if kind == "message":
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=self._index, content_index=0, part=part))
        return out

    def _add(self, item: dict) -> list[dict]:
        self._open, self._text = item, ""
        return [self._event("response.output_item.added", output_index=self._index,
                            item=item)]

    def _delta(self, kind: str, text: str, **fields) -> dict:
        self._text += text
        return self._event(kind, item_id=self._open["id"], output_index=self._index,
                           delta=text, **fields)

    def _close(self) -> list[dict]:
        item, text = self._open, self._text
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self._index}
        if item["type"] == "reasoning":
            done = reasoning_item(item["id"], text)
            out = [self._event("response.reasoning_text.done", **where, content_index=0,
                               text=text)]
        elif item["type"] == "message":
            done = message_item(item["id"], text)
            out = [self._event("response.output_text.done", **where, content_index=0,
                               text=text, logprobs=[]),
                   self._event("response.content_part.done", **where, content_index=0,
                               part=output_text(text))]
        else:
            done = {**item, "arguments": text, "status": "completed"}
            out = [self._event("response.function_call_arguments.done", **where,
                               arguments=text)]
        out.append(self._event("response.output_item.done", output_index=self._index,
                               item=done))
        self._head = {**self._head, "output": [*self._head["output"], done]}
        self._open, self._text = None, ""
        return out

    @property
    def _index(self) -> int:
        return len(self._head["output"])  # (the open item comes after the done ones)

    def _event(self, kind: str, **fields) -> dict:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}
