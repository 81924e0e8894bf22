"""The Responses API's stored responses (openai_api.py, openai_responses.py): what
`previous_response_id` continues and GET / DELETE /v1/responses/{id} read. Kept in this
process's memory, the least recently used dropped past a byte budget, each readable only
with the bearer token that made it (none: by any caller without one). No HTTP here."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Stored:
    response: dict  # the Response object as it was answered
    conversation: tuple[dict, ...]  # chat messages that a later response continues
    input_items: tuple[dict, ...]  # its request's input, as items with ids
    size: int  # bytes of the three as JSON (what the budget counts)


def owner_of(authorization: str) -> str:
    """Whose a response is: a digest of the caller's Authorization header ("" = none)."""
    return hashlib.sha256(authorization.encode()).hexdigest()


class ResponseStore:
    """Responses by id, at most `max_bytes` of them as JSON, the least recently stored or
    read dropped first (the newest always kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], Stored] = OrderedDict()  # (owner, id) ->
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, owner: str, response: dict, conversation: list[dict],
            input_items: list[dict]) -> None:
        size = sum(len(json.dumps(x)) for x in (response, conversation, input_items))
        key = (owner, response["id"])
        self._drop(key)
        self._items[key] = Stored(response, tuple(conversation), tuple(input_items), size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._items) > 1:
            self._drop(next(iter(self._items)))

    def get(self, owner: str, response_id: str) -> Stored | None:
        stored = self._items.get((owner, response_id))
        if stored is not None:
            self._items.move_to_end((owner, response_id))
        return stored

    def delete(self, owner: str, response_id: str) -> bool:
        return self._drop((owner, response_id))

    def _drop(self, key: tuple[str, str]) -> bool:
        stored = self._items.pop(key, None)
        if stored is None:
            return False
        self.bytes -= stored.size
        return True
