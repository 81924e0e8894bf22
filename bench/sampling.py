"""The sampler's time a step: batched (`sampler.sample`) against row by row with a sort of
the vocabulary (`sampler.sample_one`, its definition, which is how every sampled row was
drawn before the batched form), or with --against REV against `sample` as it was at that
git revision (its sampler.py, loaded from `git show`).

    python -m bench.sampling [--repeat 20] [--threads 2] [--against REV]

Rows of logits of two shapes: `zipf` (token r of a random order at -1.1 log r plus noise:
a peaked next-token distribution, as a trained model's) and `flat` (standard normal x 3:
a random model's, whose top-p cut lies thousands of tokens down). Each row is seeded, so
both forms draw the same tokens (checked; against a revision whose arithmetic differs,
a token may differ where a draw lies within rounding of a boundary). Each row has seen
--seen tokens (prompt, output: what the penalties read). Prints ms a call (median of
--repeat).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types

import torch

from loraplex.engine.request import SamplingParams
from loraplex.model import sampler

KINDS = {"temperature 0.7": dict(temperature=0.7),
         "+ top-p 0.9": dict(temperature=0.7, top_p=0.9),
         "+ top-k 50": dict(temperature=0.7, top_k=50),
         "+ top-p 0.9, repetition 1.1": dict(temperature=0.7, top_p=0.9,
                                             repetition_penalty=1.1),
         "+ top-p 0.9, frequency 0.5, presence 0.5": dict(temperature=0.7, top_p=0.9,
                                                          frequency_penalty=0.5,
                                                          presence_penalty=0.5),
         "+ min-p 0.05": dict(temperature=0.7, min_p=0.05),
         "greedy, repetition 1.1": dict(repetition_penalty=1.1),
         "greedy, frequency 0.5, presence 0.5": dict(frequency_penalty=0.5,
                                                     presence_penalty=0.5)}


def logits_of(shape: str, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if shape == "flat":
        return torch.randn(rows, vocab, generator=gen) * 3
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log() * -1.1  # [V]
    noise = torch.randn(rows, vocab, generator=gen) * 0.3
    order = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)])
    return (ranks[order] + noise) * 4  # [rows, V]: logits of a peaked distribution


def sampler_at(rev: str) -> types.ModuleType:
    """model/sampler.py as it was at git revision `rev`, as a module."""
    source = subprocess.run(["git", "show", f"{rev}:server/loraplex/model/sampler.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"sampler_at_{rev}")
    sys.modules[module.__name__] = module  # (its dataclasses look themselves up there)
    exec(compile(source, f"{rev}:sampler.py", "exec"), module.__dict__)
    return module


def timed(fn, repeat: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seen", type=int, nargs=2, default=[512, 128],
                    metavar=("PROMPT", "OUTPUT"),
                    help="each row's prompt and output lengths (what the penalties read)")
    ap.add_argument("--against", metavar="REV",
                    help="compare with `sample` at this git revision, not row by row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    other = sampler_at(args.against) if args.against else None
    before = f"{args.against}, ms" if other else "row by row, ms"
    print(f"| logits | vocab | rows | sampling | {before} | batched, ms | speed-up |\n"
          "|---|---|---|---|---|---|---|")
    for shape in ("zipf", "flat"):
        for vocab in args.vocab:
            for n in args.rows:
                logits = logits_of(shape, n, vocab, gen)
                seen = [(torch.randint(0, vocab, (args.seen[0],), generator=gen).tolist(),
                         torch.randint(0, vocab, (args.seen[1],), generator=gen).tolist())
                        for _ in range(n)]
                for name, kind in KINDS.items():
                    params = [SamplingParams(**kind)] * n

                    def rows(module=sampler):
                        return [module.RowContext(seen[i][0], seen[i][1], (),
                                                  torch.Generator().manual_seed(i))
                                for i in range(n)]

                    if other:
                        one, alone = timed(lambda: other.sample(logits, params, rows(other)),
                                           args.repeat)
                    else:
                        one, alone = timed(lambda: [sampler.sample_one(logits[i], params[i], r)
                                                    for i, r in enumerate(rows())], args.repeat)
                    batched, together = timed(lambda: sampler.sample(logits, params, rows()),
                                              args.repeat)
                    same = "" if together == alone else " (tokens differ)"
                    print(f"| {shape} | {vocab} | {n} | {name} | {one:.2f} | {batched:.2f} | "
                          f"{one / batched:.2f}x{same} |", flush=True)


if __name__ == "__main__":
    main()
