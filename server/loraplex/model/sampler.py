"""Pick each sequence's next token from its logits, with its own sampling parameters.

Greedy rows are decided together with one argmax; sampled rows go one by one
(repetition penalty, temperature, top-k, top-p, then a draw from the request's
own generator, so a seed makes a request reproducible whatever else is batched
with it). Log-probabilities are those of the model's raw distribution.
"""

from __future__ import annotations

import torch

from loraplex.engine.request import SamplingParams, TokenLogprob


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF semantics: a seen token's positive logit is divided, a negative one multiplied."""
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] -> same with excluded tokens at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, params: SamplingParams, seen: list[int],
               generator: torch.Generator | None) -> int:
    """logits: [V] float32 -> token id."""
    if params.repetition_penalty != 1.0 and seen:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # a seed's (CPU) generator draws on its device
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: [N, V] -> one token id per row."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy for every row, then fix the others
    for i, p in enumerate(params):
        if p.temperature != 0.0 or p.repetition_penalty != 1.0:
            tokens[i] = sample_one(logits[i], p, seen[i], generators[i])
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
    """logits: [N, V]; raw log-softmax of each chosen token and of the `top[i]` most likely."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    out = []
    for i, tok in enumerate(tokens):
        alternatives = ()
        if top[i]:
            values, ids = torch.topk(logp[i], top[i])
            alternatives = tuple(zip(ids.tolist(), values.tolist()))
        out.append(TokenLogprob(tok, float(logp[i, tok]), alternatives))
    return out
