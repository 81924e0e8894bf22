"""Type checks for the JSON bodies the HTTP APIs take (openai_api.py, lorax_api.py).

A field table maps each known name to a type, or a tuple of types, among int, float, str,
bool, list and dict; null is always allowed and means unset. Each API turns a problem
found here into its own error body.
"""

from __future__ import annotations

import json

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "an array", dict: "an object"}


def is_type(value, t: type) -> bool:
    """Whether a JSON value has type t (JSON's true is no number; an integer is one)."""
    if isinstance(value, bool):
        return t is bool
    return isinstance(value, t) or (t is float and isinstance(value, int))


def first_problem(body: dict, fields: dict, items: dict | None = None, where: str = "",
                  ignored: frozenset = frozenset()) -> tuple[str, str] | None:
    """(field, message) for the first unknown field or value of the wrong type in body,
    else None. items: for array fields, the type of each element; where: a prefix for
    the field's name in messages ("parameters."); ignored: names accepted unread."""
    for name, value in body.items():
        if name in ignored:
            continue
        if name not in fields:
            return name, (f"unknown field {where + name!r}; see the loraplex README for the "
                          "fields this API takes")
        if value is None:
            continue
        want = fields[name] if isinstance(fields[name], tuple) else (fields[name],)
        shown = json.dumps(value)[:80]
        if not any(is_type(value, t) for t in want):
            return name, f"{where}{name} must be {' or '.join(_NAMES[t] for t in want)}, got {shown}"
        item = (items or {}).get(name)
        if isinstance(value, list) and item is not None and not all(is_type(v, item) for v in value):
            kind = "strings" if item is str else "whole numbers"
            return name, f"{where}{name} must be an array of {kind}, got {shown}"
    return None
