"""The sampler's time a step: batched (`sampler.sample`) against row by row with a sort of
the vocabulary (`sampler.sample_one`, its definition, which is how every sampled row was
drawn before the batched form).

    python -m bench.sampling [--repeat 20] [--threads 2]

Rows of logits of two shapes: `zipf` (token r of a random order at -1.1 log r plus noise:
a peaked next-token distribution, as a trained model's) and `flat` (standard normal x 3:
a random model's, whose top-p cut lies thousands of tokens down). Each row is seeded, so
both forms draw the same tokens (checked). Prints ms a call (median of --repeat).
"""

from __future__ import annotations

import argparse
import statistics
import time

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
         "greedy, repetition 1.1": dict(repetition_penalty=1.1)}


def logits_of(shape: str, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if shape == "flat":
        return torch.randn(rows, vocab, generator=gen) * 3
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log() * -1.1  # [V]
    noise = torch.randn(rows, vocab, generator=gen) * 0.3
    order = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)])
    return (ranks[order] + noise) * 4  # [rows, V]: logits of a peaked distribution


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
    ap.add_argument("--seen", type=int, nargs=2, default=[512, 128], metavar=("PROMPT", "OUTPUT"),
                    help="each row's prompt and output lengths (what the penalties read)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print("| logits | vocab | rows | sampling | row by row, ms | batched, ms | speed-up |\n"
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

                    def rows():
                        return [sampler.RowContext(seen[i][0], seen[i][1], (),
                                                   torch.Generator().manual_seed(i))
                                for i in range(n)]

                    one, alone = timed(lambda: [sampler.sample_one(logits[i], params[i], r)
                                                for i, r in enumerate(rows())], args.repeat)
                    batched, together = timed(lambda: sampler.sample(logits, params, rows()),
                                              args.repeat)
                    same = "" if together == alone else " (tokens differ)"
                    print(f"| {shape} | {vocab} | {n} | {name} | {one:.2f} | {batched:.2f} | "
                          f"{one / batched:.1f}x{same} |", flush=True)


if __name__ == "__main__":
    main()
