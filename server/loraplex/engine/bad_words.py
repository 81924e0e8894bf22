"""vLLM's bad_words: words the output may not contain, as token sequences.

A word is tokenized as it is (its form at the start of a text) and after a space (its
form mid-text); the last token of each such sequence is banned whenever the output ends
with the sequence's other tokens, so the sequence never appears (a one-token word is
never produced). Another tokenization of the same text (a word split differently, or
glued to the text before it) is not caught, as in vLLM.
"""

from __future__ import annotations


def token_sequences(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids, as it is and after a space, without repeats."""
    out: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)


def banned_next(sequences: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """The ids that would complete one of `sequences` after `output`."""
    return [ids[-1] for ids in sequences
            if len(ids) <= len(output) + 1
            and tuple(output[len(output) - len(ids) + 1:]) == ids[:-1]]
