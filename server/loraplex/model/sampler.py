"""Pick each sequence's next token from its logits, with its own sampling parameters.

Greedy rows with nothing to adjust are decided together with one argmax, and greedy rows
whose only adjustment is a guide's mask with one masked argmax. The others get the
penalties (repetition, presence, frequency) all together, then one by one the logit bias,
the allowed ids or the guide's mask and the banned tokens (stops before min_tokens, bad
words); then the sampled ones are drawn together (temperature, top-k, top-p, min-p; see
sample_one, the definition), each with one uniform from the request's own generator, so a
seed makes a request reproducible whatever else is batched with it. Log-probabilities are
those of the model's raw distribution."""

from __future__ import annotations

import array
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


def adjust(logits: torch.Tensor, params: SamplingParams, row: RowContext) -> torch.Tensor:
    """logits: [V] float32 -> the same after the row's penalties, logit bias, allowed ids,
    guide mask and bans (what comes before the choice, greedy or sampled)."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, row.prompt + row.output,
                                          params.repetition_penalty)
    if _penalizes_output(params, row):
        logits = apply_presence_frequency(logits, row.output, params.presence_penalty,
                                          params.frequency_penalty)
    return restrict(logits, params, row)


def restrict(logits: torch.Tensor, params: SamplingParams, row: RowContext) -> torch.Tensor:
    """logits: [V] -> the same after the logit bias, allowed ids, guide mask and bans (what
    `adjust` does after the penalties)."""
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
    return logits


def _penalizes_output(params: SamplingParams, row: RowContext) -> bool:
    return bool((params.presence_penalty or params.frequency_penalty) and row.output)


def _penalize(chosen: torch.Tensor, params: list[SamplingParams], rows: list[RowContext]
              ) -> None:
    """chosen: [A, V] logits of the rows `params` / `rows` describe, penalized in place as
    `adjust` penalizes each alone (the same arithmetic), every row at once: one gather and
    one scatter over the flat positions row * V + token of the tokens each row has seen."""
    vocab = chosen.shape[-1]
    flat = chosen.view(-1)  # [A * V] (chosen is a fresh copy: contiguous)
    rep = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        # [S] (a token seen twice is written twice, with the same value: no unique needed)
        where = _flat_positions([(rows[j].prompt, rows[j].output) for j in rep], rep, vocab,
                                chosen.device)
        penalty = torch.tensor([p.repetition_penalty for p in params],
                               device=chosen.device)[where // vocab]  # [S]
        picked = flat[where]  # [S]
        flat[where] = torch.where(picked > 0, picked / penalty, picked * penalty)
    counted = [j for j, (p, row) in enumerate(zip(params, rows)) if _penalizes_output(p, row)]
    if counted:
        where, counts = _flat_positions([(rows[j].output,) for j in counted], counted, vocab,
                                        chosen.device).unique(return_counts=True)  # [S] each
        row_of = where // vocab  # [S]
        frequency = torch.tensor([p.frequency_penalty for p in params],
                                 device=chosen.device)[row_of]  # [S]
        presence = torch.tensor([p.presence_penalty for p in params],
                                device=chosen.device)[row_of]  # [S]
        flat[where] = flat[where] - frequency * counts.to(chosen.dtype) - presence


def _flat_positions(tokens: list[tuple[list[int], ...]], at: list[int], vocab: int,
                    device: torch.device) -> torch.Tensor:
    """[sum of lengths] row * vocab + token for every token of each tokens[i] (a tuple of
    lists: prompt, output), row = at[i]."""
    ids = array.array("q")  # (3x faster than torch.tensor of a list, for 20k tokens)
    for lists in tokens:
        for some in lists:
            ids.extend(some)
    lengths = torch.tensor([sum(map(len, lists)) for lists in tokens], device=device)  # [R]
    offsets = torch.tensor(at, dtype=torch.long, device=device) * vocab  # [R]
    flat = torch.frombuffer(ids, dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
    return flat.to(device) + offsets.repeat_interleave(lengths)


def sample_one(logits: torch.Tensor, params: SamplingParams, row: RowContext) -> int:
    """logits: [V] float32 -> token id: the definition that `sample` computes in batches.
    A draw takes one uniform u from the row's generator (a seed's, else torch's) and picks
    the token at which the cumulative probability passes u: over the kept tokens likeliest
    first where top-k, top-p or min-p truncate, else over all of them in id order."""
    logits = adjust(logits, params, row)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = logits / params.temperature
    u = _uniforms([row.generator], logits.device)
    if not _truncates(params):
        return int(_inverse_cdf(scaled[None], u)[0])
    scaled = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    if params.min_p:
        scaled = filter_min_p(scaled, params.min_p)
    values, ids = scaled.sort(descending=True)
    return int(ids[_inverse_cdf(values[None], u)[0]])


def _uniforms(generators: list, device: torch.device) -> torch.Tensor:
    """[R] uniforms in [0, 1): a seeded row's from its own generator (one a draw, whatever
    else is batched), the others' from torch's."""
    u = torch.rand(len(generators), device=device)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand(1, device=g.device, generator=g).to(device)[0]
    return u


def _inverse_cdf(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """scaled: [R, W] logits (-inf: never) -> [R] the index where each row's cumulative
    softmax passes u: [R] (a fraction of the row's total, kept below it: so the index is
    never past the last token of a positive probability)."""
    cdf = scaled.softmax(-1).cumsum(-1)  # [R, W], nondecreasing
    total = cdf[:, -1:]  # [R, 1]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


# A truncated row (top-k, top-p or min-p) is drawn among its likeliest tokens, found by one
# topk of the first width in CANDIDATES that holds its kept tokens (its top_k when larger),
# not by a sort of the vocabulary; a row whose top-p or min-p cut lies further down goes to
# the next width, the last being the whole vocabulary. The kept tokens, their order and u
# do not depend on the width, so neither does the token.
CANDIDATES = (256, 4096)


def _draw_truncated(scaled: torch.Tensor, params: list[SamplingParams],
                    u: torch.Tensor) -> list[int]:
    """scaled: [T, V] logits / temperature of rows with top-k, top-p or min-p; u: [T] ->
    a token each."""
    vocab = scaled.shape[-1]
    full_lse = scaled.logsumexp(-1)  # [T] (top-p's normalizer of the rows without top-k)
    tokens: list[int | None] = [None] * len(params)
    rows = list(range(len(params)))
    for tier in (*CANDIDATES, vocab):
        widths = [min(vocab, max(tier, params[r].top_k)) for r in rows]  # each row's own
        every = len(rows) == len(params)  # (then no copy of the rows)
        picks, complete = _truncated_at(scaled if every else scaled[rows],
                                        [params[r] for r in rows], u[rows], full_lse[rows],
                                        widths)
        for r, token, ok in zip(rows, picks, complete):
            if ok or tier >= vocab:
                tokens[r] = token
        rows = [r for r in rows if tokens[r] is None]
        if not rows:
            break
    return tokens


def _truncated_at(scaled: torch.Tensor, params: list[SamplingParams], u: torch.Tensor,
                  full_lse: torch.Tensor, widths: list[int]) -> tuple[list[int], list[bool]]:
    """The draw of each row among its widths[r] likeliest tokens, and whether its kept
    tokens are all among them (else the pick is not to be used)."""
    device = scaled.device
    values, ids = scaled.topk(max(widths), dim=-1)  # [T, C] descending
    col = torch.arange(values.shape[-1], device=device)  # [C]
    width = torch.tensor(widths, device=device)  # [T]
    has_k = torch.tensor([bool(p.top_k) for p in params], device=device)  # [T]
    k = torch.where(has_k, torch.tensor([p.top_k for p in params], device=device), width)
    keep = col < k[:, None]  # [T, C]: top-k, or the row's candidates
    # top-p over the distribution top-k leaves (the whole row's without top-k)
    lse = torch.where(has_k, values.masked_fill(~keep, float("-inf")).logsumexp(-1),
                      full_lse)  # [T]
    probs = (values - lse[:, None]).exp().masked_fill(~keep, 0.0)  # [T, C]
    before = probs.cumsum(-1) - probs  # [T, C] the mass of the likelier candidates
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]  # [T, 1]
    keep &= before < top_p
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]  # [T, 1]
    floor = values[:, :1] + min_p.log()  # [T, 1] (log 0 = -inf: no cut)
    keep &= values >= floor
    last = (width - 1)[:, None]  # [T, 1] each row's last candidate
    complete = (has_k | (width == scaled.shape[-1]) | (before.gather(1, last) >= top_p)[:, 0]
                | (values.gather(1, last) < floor)[:, 0])  # [T]: the cut lies within
    picked = _inverse_cdf(values.masked_fill(~keep, float("-inf")), u)  # [T]
    return ids.gather(1, picked[:, None])[:, 0].tolist(), complete.tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], rows: list[RowContext]
           ) -> list[int]:
    """logits: [N, V] -> one token id per row (each as sample_one would pick it)."""
    logits = logits.float()
    tokens = [0] * len(params)
    # greedy rows whose only adjustment is a guide's mask: one masked argmax for them all
    masked = [i for i, (p, row) in enumerate(zip(params, rows))
              if row.mask is not None and not adjusts_besides_mask(p, row)]
    adjusted = [i for i, (p, row) in enumerate(zip(params, rows))
                if adjusts_besides_mask(p, row)]
    plain = [i for i, (p, row) in enumerate(zip(params, rows)) if not adjusts(p, row)]
    if plain:  # greedy rows with nothing to adjust: one argmax
        picked = _take(logits, plain)
        for i, token in zip(plain, picked.argmax(-1).tolist()):
            tokens[i] = token
    if masked:
        masks = torch.stack([rows[i].mask for i in masked]).to(logits.device)  # [M, V]
        picked = _take(logits, masked).masked_fill(~masks, float("-inf")).argmax(-1)  # [M]
        for i, token in zip(masked, picked.tolist()):
            tokens[i] = token
    if adjusted:
        for i, token in zip(adjusted, _adjusted(logits, params, rows, adjusted)):
            tokens[i] = token
    return tokens


def _adjusted(logits: torch.Tensor, params: list[SamplingParams], rows: list[RowContext],
              adjusted: list[int]) -> list[int]:
    """The tokens of the rows at `adjusted` (penalties and the like, or a temperature)."""
    # [A, V] a copy (torch.stack of rows is 20x slower, indexing with a list 3x)
    chosen = logits.clone() if len(adjusted) == len(logits) else _take(logits, adjusted)
    _penalize(chosen, [params[i] for i in adjusted], [rows[i] for i in adjusted])
    for j, i in enumerate(adjusted):
        row = chosen[j]
        out = restrict(row, params[i], rows[i])
        if out is not row:
            row.copy_(out)
    tokens = [0] * len(adjusted)
    greedy = [j for j, i in enumerate(adjusted) if params[i].temperature == 0.0]
    if greedy:
        for j, token in zip(greedy, _take(chosen, greedy).argmax(-1).tolist()):
            tokens[j] = token
    drawn = [j for j, i in enumerate(adjusted) if params[i].temperature != 0.0]
    if not drawn:
        return tokens
    ids = [adjusted[j] for j in drawn]  # the rows drawn, in batch order
    temperature = torch.tensor([params[i].temperature for i in ids],
                               device=logits.device)[:, None]  # [D, 1]
    scaled = _take(chosen, drawn).div_(temperature)
    u = _uniforms([rows[i].generator for i in ids], logits.device)  # [D]
    truncated = [d for d, i in enumerate(ids) if _truncates(params[i])]
    whole = [d for d, i in enumerate(ids) if not _truncates(params[i])]
    if whole:  # temperature alone: over each whole row
        rows_whole = _take(scaled, whole)
        for d, token in zip(whole, _inverse_cdf(rows_whole, u[whole]).tolist()):
            tokens[drawn[d]] = token
    if truncated:
        picks = _draw_truncated(_take(scaled, truncated), [params[ids[d]] for d in truncated],
                                u[truncated])
        for d, token in zip(truncated, picks):
            tokens[drawn[d]] = token
    return tokens


def _take(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t: [R, ...] -> its rows at `index` (t itself when they are all of them, in order)."""
    if len(index) == len(t):
        return t
    return t.index_select(0, torch.tensor(index, device=t.device))


def _truncates(params: SamplingParams) -> bool:
    return bool(params.top_k or params.top_p < 1.0 or params.min_p)


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
