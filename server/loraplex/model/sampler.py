"""Pick each sequence's next token from its logits, with its own sampling parameters.

Greedy rows with nothing to adjust are decided together with one argmax, and greedy rows
whose only adjustment is a guide's mask with one masked argmax. The others go one by
one: the penalties (repetition, presence, frequency), the logit bias, the allowed ids or
the guide's mask and the banned tokens (stops before min_tokens, bad words), then for
sampled rows temperature, top-k, top-p, min-p and a draw from the request's own
generator, so a seed makes a request reproducible whatever else is batched with it.
Log-probabilities are those of the model's raw distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.request import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class RowContext:
    """What a row's sampling reads besides its logits."""

    prompt: list[int]  # (read by the repetition penalty only)
    output: list[int]  # the tokens generated so far
    banned: tuple[int, ...] = ()  # ids it may not produce now (stops before min_tokens, bad words)
    generator: torch.Generator | None = None  # the request's, when it has a seed
    mask: torch.Tensor | None = None  # [V] bool, guided decoding's: True = may be produced


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF semantics: a seen token's positive logit is divided, a negative one multiplied."""
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency(logits: torch.Tensor, output: list[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's semantics, over the output only: logits: [V] -> logits - frequency * count
    - presence * (count > 0), count: each token's occurrences in `output`."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=logits.device),
                            minlength=logits.shape[-1]).to(logits.dtype)  # [V]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """logits: [V] -> the same with each (token id, bias) added to its token's logit."""
    ids, values = zip(*bias)
    return logits.index_add(0, torch.tensor(ids, device=logits.device),
                            torch.tensor(values, dtype=logits.dtype, device=logits.device))


def keep_only(logits: torch.Tensor, allowed: tuple[int, ...]) -> torch.Tensor:
    """logits: [V] -> -inf everywhere but at the `allowed` ids."""
    idx = torch.tensor(allowed, device=logits.device)
    return torch.full_like(logits, float("-inf")).index_copy(0, idx, logits[idx])


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits: [V] -> the same with tokens less likely than min_p x the likeliest at -inf."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


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


def adjusts(params: SamplingParams, row: RowContext) -> bool:
    """Whether the row's logits change before its choice (else greedy is a plain argmax)."""
    return row.mask is not None or adjusts_besides_mask(params, row)


def adjusts_besides_mask(params: SamplingParams, row: RowContext) -> bool:
    return bool(params.temperature != 0.0 or params.repetition_penalty != 1.0
                or params.presence_penalty or params.frequency_penalty or params.logit_bias
                or params.allowed_token_ids or row.banned)


def sample_one(logits: torch.Tensor, params: SamplingParams, row: RowContext) -> int:
    """logits: [V] float32 -> token id."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, row.prompt + row.output,
                                          params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and row.output:
        logits = apply_presence_frequency(logits, row.output, params.presence_penalty,
                                          params.frequency_penalty)
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.allowed_token_ids:
        logits = keep_only(logits, params.allowed_token_ids)
    if row.mask is not None:
        logits = logits.masked_fill(~row.mask.to(logits.device), float("-inf"))
    if row.banned:
        unbanned = logits
        logits = logits.index_fill(0, torch.tensor(row.banned, device=logits.device),
                                   float("-inf"))
        if not torch.isfinite(logits).any():
            logits = unbanned  # (a guide or allowed ids with no other way on win over bans)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    if params.min_p:
        logits = filter_min_p(logits, params.min_p)
    probs = logits.softmax(-1)
    generator = row.generator
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # a seed's (CPU) generator draws on its device
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], rows: list[RowContext]
           ) -> list[int]:
    """logits: [N, V] -> one token id per row."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy for every row, then fix the others
    # greedy rows whose only adjustment is a guide's mask: one masked argmax for them all
    masked = [i for i, (p, row) in enumerate(zip(params, rows))
              if row.mask is not None and not adjusts_besides_mask(p, row)]
    if masked:
        masks = torch.stack([rows[i].mask for i in masked]).to(logits.device)  # [M, V]
        picked = logits[masked].masked_fill(~masks, float("-inf")).argmax(-1)  # [M]
        for i, token in zip(masked, picked.tolist()):
            tokens[i] = token
    done = set(masked)
    for i, (p, row) in enumerate(zip(params, rows)):
        if adjusts(p, row) and i not in done:
            tokens[i] = sample_one(logits[i], p, row)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
    """logits: [N, V]; raw log-softmax of each chosen token and of the `top[i]` most likely,
    and the chosen token's rank."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    index = torch.tensor(tokens, dtype=torch.long, device=logp.device).unsqueeze(1)  # [N, 1]
    chosen = logp.gather(1, index)  # [N, 1]
    ranks = ((logp > chosen).sum(1) + 1).tolist()  # [N]
    chosen = chosen.squeeze(1).tolist()  # [N]
    k = max(top, default=0)
    if k:
        values, ids = torch.topk(logp, k)  # [N, k] each
        values, ids = values.tolist(), ids.tolist()
    else:
        values = ids = [[]] * len(tokens)
    return [TokenLogprob(tok, lp, tuple(zip(i[:n], v[:n])), rank)
            for tok, lp, n, i, v, rank in zip(tokens, chosen, top, ids, values, ranks)]
