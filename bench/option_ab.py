"""One engine option against another, in one process, on the bench model (not a test).

    python -m bench.option_ab --option kv_cache_dtype auto bfloat16
    python -m bench.option_ab --option prefix_caching off on --system-prompt 400
    python -m bench.option_ab --shape small ...  # a smoke run (numbers mean nothing)

Builds one engine per value of the EngineConfig field (the rest as in bench.bench), then
runs the same 32 requests through each in turn, --repeat rounds after one untimed, with
N = 0, 1 and 32 distinct adapters. Prompts are a shared system prompt of --system-prompt
tokens (0: none) plus 16-48 tokens of their own, drawn anew each round (so a prefix cache
finds only what the round itself computed), with --new-tokens each. Prints each value's
tok/s per round and the median over rounds of its ratio to the first value's.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
from pathlib import Path

from bench.bench import run_engine
from bench.workload import (SHAPES, BenchRequest, bench_adapter_names,
                            prepare_fp32_bench)
from loraplex.config import EngineConfig, ModelConfig, parse_switch
from loraplex.engine.engine import Engine
from loraplex.engine.threads import use_threads

ADAPTERS = (0, 1, 32)


def parse_value(field: dataclasses.Field, text: str):
    """'on' -> True for a bool field, '8' -> 8 for an int one, else the text."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    return {"bool": parse_switch, "int": int, "float": float}.get(kind, str)(text)


def workload(num_adapters: int, system_len: int, new_tokens: int, vocab: int,
             seed: int) -> list[BenchRequest]:
    rnd = random.Random(seed)
    system = [rnd.randrange(3, vocab) for _ in range(system_len)]
    names = bench_adapter_names(max(num_adapters, 1))
    return [BenchRequest(system + [rnd.randrange(3, vocab) for _ in range(rnd.randint(16, 48))],
                         new_tokens, names[i % num_adapters] if num_adapters else None)
            for i in range(32)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--option", nargs="+", required=True, metavar=("FIELD", "VALUE"),
                        help="an EngineConfig field and two or more values")
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--system-prompt", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    name, *texts = args.option
    if name not in fields or len(texts) < 2:
        parser.error(f"--option takes an EngineConfig field ({', '.join(fields)}) and "
                     "at least two values")
    values = [parse_value(fields[name], t) for t in texts]
    use_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-ab-"))
    base, adapters = prepare_fp32_bench(workdir, args.shape, max(ADAPTERS), args.threads)
    common = dict(max_batch_tokens=4096, max_num_seqs=32, prefill_chunk=2048,
                  kv_cache_memory=2**30, max_gpu_adapters=32, max_cpu_adapters=32,
                  max_lora_rank=16, threads=args.threads, prefix_caching=False)
    engines = [Engine.build(ModelConfig(path=str(base)), EngineConfig(**{**common, name: value}),
                            str(adapters)) for value in values]
    vocab = engines[0].loaded.vocab_size
    try:
        for n in ADAPTERS:
            rounds = []  # per round: tok/s of each engine
            for r in range(args.repeat + 1):  # round 0 untimed
                work = workload(n, args.system_prompt, args.new_tokens, vocab, seed=r)
                tps = []
                for engine in engines:
                    for other in engines:  # one step loop at a time
                        if other is not engine:
                            other.stop()
                    engine.start()
                    tps.append(run_engine(engine, work)["tok_per_s"])
                if r:
                    rounds.append(tps)
            for i, text in enumerate(texts):
                ratio = statistics.median(t[i] / t[0] for t in rounds)
                print(f"N={n:<3d} {name}={text:10s} tok/s {[round(t[i]) for t in rounds]} "
                      f"{ratio:.2f}x of {texts[0]}", flush=True)
    finally:
        for engine in engines:
            engine.stop()


if __name__ == "__main__":
    main()
