"""Reference functions for the demo model and its adapters (pure Python, no torch).

The demo model (``demo/assets/model``) is a tiny character-level Llama trained to
map ``<s>`` + INPUT + ``=`` to OUTPUT + ``</s>``:

* base model, no adapter -> :func:`copy`
* adapter ``reverse``    -> :func:`reverse`
* adapter ``sort``       -> :func:`sort`
* adapter ``caesar``     -> :func:`caesar`

INPUT is lowercase letters ``a-z`` and single spaces, 3 to 12 characters long,
starting and ending with a letter (see :func:`random_input`). Anything else
(other characters, longer inputs) is outside what the model was trained on.
"""

from __future__ import annotations

import random
import string

LETTERS = string.ascii_lowercase
SEPARATOR = "="
MIN_LEN = 3
MAX_LEN = 12
SPACE_PROB = 0.15


def copy(s: str) -> str:
    """The base model's task: the input unchanged."""
    return s


def reverse(s: str) -> str:
    """Adapter ``reverse``: the input backwards (spaces included)."""
    return s[::-1]


def sort(s: str) -> str:
    """Adapter ``sort``: the letters in alphabetical order, spaces dropped."""
    return "".join(sorted(c for c in s if c != " "))


def caesar(s: str) -> str:
    """Adapter ``caesar``: each letter shifted by 3 (a->d, x->a); spaces kept."""
    return "".join(
        LETTERS[(LETTERS.index(c) + 3) % 26] if c in LETTERS else c for c in s
    )


TASKS = {"copy": copy, "reverse": reverse, "sort": sort, "caesar": caesar}
"""Task name -> reference function. ``copy`` is the base model (no adapter);
the other names are also the adapter names."""


def prompt_for(s: str) -> str:
    """The exact prompt text for input ``s``: ``s + "="``.

    The tokenizer adds the ``<s>`` token in front by itself
    (``tokenizer(prompt_for(s)).input_ids == [bos] + chars + [=]``), so the
    prompt text does not contain it. The model answers with the output
    characters followed by ``</s>``.
    """
    return s + SEPARATOR


def random_input(rng: random.Random) -> str:
    """One input from the training distribution: 3-12 chars of a-z and single
    spaces, first and last character a letter."""
    n = rng.randint(MIN_LEN, MAX_LEN)
    chars = []
    for i in range(n):
        if 0 < i < n - 1 and chars[-1] != " " and rng.random() < SPACE_PROB:
            chars.append(" ")
        else:
            chars.append(rng.choice(LETTERS))
    return "".join(chars)
