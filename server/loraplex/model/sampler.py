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
import math
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


# Both forms of a truncated draw (sample_one and the batched one) compute the same float32
# numbers for a row's likeliest tokens, whatever its neighbours, the width it is drawn at
# or the threads: unnormalized weights exp(logit - the row's max) and their running sums,
# which torch sums along the row one after another (in float64 on the CPU), never a
# normalizer summed over a width that differs between the forms. A float32 softmax's did:
# its rounding moved the top-p cut by a token for about one flat row in a few hundred.

def _weights(logits: torch.Tensor) -> torch.Tensor:
    """[R, W] logits (-inf: never) -> [R, W] exp(logit - the row's max): 0 for never."""
    return (logits - logits.amax(-1, keepdim=True)).exp_()


def _before(cumulative: torch.Tensor) -> torch.Tensor:
    """[R, W] running sums -> [R, W] the sum of the weights before each column."""
    return torch.nn.functional.pad(cumulative[:, :-1], (1, 0))


def _mass(logits: torch.Tensor) -> torch.Tensor:
    """[R, V] logits in id order -> [R] their weights' sum (top-p's total without top-k)."""
    return _weights(logits).cumsum(-1)[:, -1]


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


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
    the token at which the running sum of weights (unnormalized probabilities) passes u x
    their total: over all tokens in id order for temperature alone, else over the kept
    tokens likeliest first. Kept: the top_k likeliest; of those, the smallest prefix
    reaching top_p of their mass (of the whole row's without top-k); of those, the ones at
    least min_p x as likely as the likeliest (see _weights for the arithmetic both share)."""
    logits = adjust(logits, params, row)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = logits[None] / params.temperature  # [1, V]
    u = _uniforms([row.generator], logits.device)  # [1]
    if not _truncates(params):
        return int(_inverse_cdf(scaled, u)[0])
    values, ids = scaled.sort(descending=True)  # [1, V] each
    weights = _weights(values)  # [1, V]
    k = min(params.top_k or values.shape[-1], values.shape[-1])
    weights[:, k:] = 0.0
    cumulative = weights.cumsum(-1)  # [1, V]
    keep = torch.arange(values.shape[-1], device=values.device)[None] < k  # [1, V]
    if params.top_p < 1.0:
        mass = cumulative[:, k - 1] if params.top_k else _mass(scaled)  # [1]
        keep &= _before(cumulative) < _floats([params.top_p], mass.device) * mass
    if params.min_p:
        keep &= values >= values[:, :1] + _floats([math.log(params.min_p)], values.device)
    kept = int(keep.sum())  # >= 1: the likeliest is always kept
    return int(ids[0, _index_at(cumulative, cumulative[:, kept - 1:kept], u)[0]])


def _uniforms(generators: list, device: torch.device) -> torch.Tensor:
    """[R] uniforms in [0, 1): a seeded row's from its own generator (one a draw, whatever
    else is batched), the others' from torch's."""
    u = torch.rand(len(generators), device=device)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand(1, device=g.device, generator=g).to(device)[0]
    return u


def _inverse_cdf(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """scaled: [R, W] logits (-inf: never) -> [R] the index where each row's running sum of
    probabilities passes u: [R] x its total (kept below it: so the index is never past the
    last token of a positive probability). A temperature-only draw: torch's softmax takes
    each row alone, in the same steps however many rows there are."""
    cumulative = scaled.softmax(-1).cumsum(-1)  # [R, W] (softmax: one pass, row by row)
    return _index_at(cumulative, cumulative[:, -1:], u)


def _index_at(cumulative: torch.Tensor, total: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """cumulative: [R, W] running sums of weights, total: [R, 1] one of them, u: [R] in
    [0, 1) -> [R] the first index whose sum exceeds u x total (so at or before total's)."""
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True)[:, 0]


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
    whole = [t for t, p in enumerate(params) if p.top_p < 1.0 and not p.top_k]
    mass = torch.zeros(len(params), device=scaled.device)  # [T] top-p's, without top-k
    if whole:
        mass[whole] = _mass(_take(scaled, whole))
    tokens: list[int | None] = [None] * len(params)
    rows = list(range(len(params)))
    for tier in (*CANDIDATES, vocab):
        widths = [min(vocab, max(tier, params[r].top_k)) for r in rows]  # each row's own
        picks, complete = _truncated_at(_take(scaled, rows), [params[r] for r in rows],
                                        u[rows], mass[rows], widths)
        for r, token, ok in zip(rows, picks, complete):
            if ok or tier >= vocab:
                tokens[r] = token
        rows = [r for r in rows if tokens[r] is None]
        if not rows:
            break
    return tokens


def _truncated_at(scaled: torch.Tensor, params: list[SamplingParams], u: torch.Tensor,
                  mass: torch.Tensor, widths: list[int]) -> tuple[list[int], list[bool]]:
    """The draw of each row among its widths[r] likeliest tokens, and whether its kept
    tokens are all among them (else the pick is not to be used). The kept tokens are a
    prefix of the candidates (top-k, top-p and min-p each cut the likeliest-first order),
    so the draw reads the candidates' running sums up to the last kept one."""
    device = scaled.device
    values, ids = scaled.topk(max(widths), dim=-1)  # [T, C] descending
    col = torch.arange(values.shape[-1], device=device)  # [C]
    width = torch.tensor(widths, device=device)  # [T]
    has_k = torch.tensor([bool(p.top_k) for p in params], device=device)  # [T]
    k = torch.where(has_k, torch.tensor([p.top_k for p in params], device=device).minimum(width),
                    width)  # [T]
    keep = col < k[:, None]  # [T, C]: top-k, or the row's candidates
    cumulative = _weights(values).masked_fill_(~keep, 0.0).cumsum(-1)  # [T, C]
    before = _before(cumulative)  # [T, C] the weight of the likelier candidates
    mass = torch.where(has_k, cumulative.gather(1, (k - 1)[:, None])[:, 0], mass)  # [T]
    top_p = _floats([p.top_p for p in params], device)  # [T]
    cut = torch.where(top_p < 1.0, top_p * mass, math.inf)  # [T] (1: no cut)
    keep &= before < cut[:, None]
    floor = values[:, :1] + _floats([math.log(p.min_p) if p.min_p else -math.inf
                                     for p in params], device)[:, None]  # [T, 1]
    keep &= values >= floor
    last = (width - 1)[:, None]  # [T, 1] each row's last candidate
    complete = (has_k | (width == scaled.shape[-1]) | (before.gather(1, last)[:, 0] >= cut)
                | (values.gather(1, last) < floor)[:, 0])  # [T]: the cut lies within
    kept = keep.sum(-1)  # [T] >= 1 (the likeliest is always kept)
    picked = _index_at(cumulative, cumulative.gather(1, (kept - 1)[:, None]), u)  # [T]
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
