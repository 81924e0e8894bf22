"""Speculative decoding by prompt lookup against plain decoding, on a trained model.

    python -m bench.speculation [--tokens 4] [--concurrency 1 8 32] [--repeat 5]

The demo's model (demo/assets: a 0.6M-parameter character-level Llama trained to copy
`abc=` to `abc`, and three adapters trained on it for reverse, sort and caesar) serves
one engine without speculation and one per --tokens value (--num-speculative-tokens),
in one process, on the same requests (the demo's inputs, 3 to 12 letters):
  copy   the base model only: its output is in its prompt, the case prompt lookup is for;
  mixed  copy, reverse, sort and caesar in turn: the adapters' outputs are mostly not.
Each workload runs at each concurrency (requests in flight: a new one is sent as one
ends) in --repeat rounds (every engine in turn); the table gives tok/s (median over
rounds), the speed-up against plain decoding within each round (median), the share of
drafts kept, and whether every output equals plain decoding's (greedy: it must).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.bench import cpu_model
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.engine import Engine, collect
from loraplex.engine.request import GenerationRequest, SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "demo"
sys.path.insert(0, str(DEMO))
import tasks  # noqa: E402  (demo/tasks.py)

TASKS = {"copy": ("",), "mixed": ("", "reverse", "sort", "caesar")}


def workload(engine: Engine, name: str, count: int, seed: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    adapters = TASKS[name]
    tokenizer = engine.tokenizer
    return [GenerationRequest(tokenizer(tasks.prompt_for(tasks.random_input(rng))).input_ids,
                              SamplingParams(max_new_tokens=tasks.MAX_LEN + 2),
                              adapter=adapters[i % len(adapters)])
            for i in range(count)]


def serve(engine: Engine, requests: list[GenerationRequest], concurrency: int) -> dict:
    """Keep `concurrency` requests in flight until all are served; tok/s over the wall time."""
    async def main():
        pending, outs = list(reversed(requests)), {}

        async def worker():
            while pending:
                i = len(pending) - 1
                outs[i] = await collect(engine.submit(pending.pop()))
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return [outs[len(requests) - 1 - i] for i in range(len(requests))], \
            time.perf_counter() - start

    def drafts() -> tuple[float, float]:
        values = {s.name: s.value for m in engine.metrics.registry.collect() for s in m.samples}
        return (values["loraplex_spec_decode_draft_tokens_total"],
                values["loraplex_spec_decode_accepted_tokens_total"])

    before = drafts()
    outs, seconds = asyncio.run(main())
    after = drafts()
    failed = [o.error for o in outs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outs)} requests failed: {failed[0]}")
    tokens = sum(len(o.token_ids) for o in outs)
    return dict(tokens=tokens, seconds=seconds, tok_per_s=tokens / seconds,
                drafted=after[0] - before[0], accepted=after[1] - before[1],
                outputs=[list(o.token_ids) for o in outs])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4],
                    help="--num-speculative-tokens of the speculating engines")
    ap.add_argument("--prompt-lookup-min", type=int, default=EngineConfig.prompt_lookup_min)
    ap.add_argument("--prompt-lookup-max", type=int, default=EngineConfig.prompt_lookup_max)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=96, help="requests per run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="write every round as JSON here")
    args = ap.parse_args(argv)

    model = ModelConfig(path=str(DEMO / "assets" / "model"))
    engines = {}
    for k in [0, *args.tokens]:
        cfg = EngineConfig(num_speculative_tokens=k, prompt_lookup_min=args.prompt_lookup_min,
                           prompt_lookup_max=args.prompt_lookup_max, threads=args.threads,
                           max_gpu_adapters=4, max_cpu_adapters=4)
        engines[k] = Engine.build(model, cfg, str(DEMO / "assets" / "adapters"))
        engines[k].start()
    results = []
    try:
        for name in TASKS:
            requests = workload(engines[0], name, args.requests, seed=7)
            for concurrency in args.concurrency:
                runs = {k: [] for k in engines}
                for k, engine in engines.items():  # untimed: warm-up, adapters loaded
                    serve(engine, requests, concurrency)
                for _ in range(args.repeat):
                    for k, engine in engines.items():
                        runs[k].append(serve(engine, requests, concurrency))
                for k, rs in runs.items():
                    drafted = sum(r["drafted"] for r in rs)
                    results.append(dict(
                        workload=name, concurrency=concurrency, num_speculative_tokens=k,
                        tok_per_s=statistics.median(r["tok_per_s"] for r in rs),
                        speedup=statistics.median(r["tok_per_s"] / p["tok_per_s"]
                                                  for r, p in zip(rs, runs[0])),
                        accepted=sum(r["accepted"] for r in rs) / drafted if drafted else None,
                        same_outputs=all(r["outputs"] == runs[0][0]["outputs"] for r in rs),
                        rounds=[{key: r[key] for key in ("tokens", "seconds", "drafted",
                                                         "accepted")} for r in rs]))
                    print_row(results[-1], flush=True)
    finally:
        for engine in engines.values():
            engine.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            cpu=cpu_model(), torch=torch.__version__, threads=args.threads,
            requests=args.requests, repeat=args.repeat,
            prompt_lookup=[args.prompt_lookup_min, args.prompt_lookup_max],
            results=results), indent=1) + "\n")
    return results


def print_row(r: dict, flush: bool = False) -> None:
    kept = "" if r["accepted"] is None else f"{100 * r['accepted']:.0f}%"
    print(f"| {r['workload']} | {r['concurrency']} | {r['num_speculative_tokens']} | "
          f"{r['tok_per_s']:.0f} | {r['speedup']:.2f}x | {kept} | "
          f"{'yes' if r['same_outputs'] else 'NO'} |", flush=flush)


if __name__ == "__main__":
    print("| workload | concurrency | drafts (k) | tok/s | vs k=0 | drafts kept | "
          "same outputs |\n|---|---|---|---|---|---|---|")
    main()
