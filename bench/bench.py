"""loraplex against its baselines, in one process, on the same model and requests.

    make bench                       # = python -m bench.bench (the ~27M Llama, 2 threads)
    python -m bench.bench --small    # a smoke run on a tiny model (numbers mean nothing)

Variants, each on equal (32 new tokens) and varied (8..64) output lengths:
  loraplex with no adapter, 1 adapter for all requests, N = 8, 32, 128 distinct adapters;
  HF PEFT mixed-batch generate(adapter_names=...) on the same requests (N = 1, 8, 32);
  transformers generate, no adapter (static batching).
Every request makes exactly its max_new_tokens (EOS ignored); only those useful tokens
are counted. Each variant runs once untimed (loading, warm-up), then --repeat times
timed; the run with the median tok/s is reported (all of them are kept in the JSON).
The loraplex variants are timed in rounds (N=0, 1, 8, 32, 128, then again), so a
drift in the machine's speed does not land on one of them.
Prints a table with ratios, writes the full results as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.baselines import (hf_static_batch, load_hf_model, load_peft_model, peft_static_batch,
                             warm_up)
from bench.workload import (BenchRequest, bench_adapter_names, build_bench_adapters,
                            build_bench_model, make_workload)
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.engine import Engine, collect
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.engine.threads import run_in_fresh_thread, use_threads

LORAPLEX_N = (0, 1, 8, 32, 128)
PEFT_N = (1, 8, 32)


def run_engine(engine: Engine, work: list[BenchRequest]) -> dict:
    """Submit all requests at once; wall time until the last one finishes."""
    async def main():
        streams = [engine.submit(GenerationRequest(
            r.prompt_ids, SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True),
            adapter=r.adapter or "")) for r in work]
        start = time.perf_counter()
        outs = await asyncio.gather(*[collect(s) for s in streams])
        return outs, time.perf_counter() - start
    outs, seconds = asyncio.run(main())
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(r.max_new_tokens for r in work)
    return dict(tokens=tokens, seconds=seconds, tok_per_s=tokens / seconds)


def median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s, with every run's tok/s under "runs"."""
    runs = sorted(runs, key=lambda r: r["tok_per_s"])
    return dict(runs[len(runs) // 2], runs=[round(r["tok_per_s"], 1) for r in runs])


def timed(fn, repeat: int) -> dict:
    """fn() once untimed (loads adapters, warms caches), then the median of `repeat` runs."""
    fn()
    return median_run([fn() for _ in range(repeat)])


def interleaved(fns: dict, repeat: int) -> dict:
    """Like `timed` for several variants, run in rounds (A B C, A B C, ...) so that a drift
    in the machine's speed (+-20% on a shared CPU) hits every variant alike."""
    for fn in fns.values():
        fn()
    runs = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            runs[key].append(fn())
    return {key: median_run(r) for key, r in runs.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    use_threads(args.threads)  # the baselines run on this thread

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    adapters_dir = workdir / "adapters"

    def prepare() -> tuple[Path, int]:
        base_dir = build_bench_model(workdir / "base", small=args.small)
        if not adapters_dir.exists():
            build_bench_adapters(base_dir, adapters_dir, max(LORAPLEX_N), rank=args.rank)
        return base_dir, load_hf_model(base_dir).config.vocab_size

    # On a thread that exits: torch work on this (main) thread would leave it an OpenMP
    # pool for the engine's step loop to compete with (loraplex.engine.threads). One
    # 2-thread matmul here made 8 adapters with varied lengths 0.58x of N=0 instead of 0.79x.
    base_dir, vocab = run_in_fresh_thread(prepare, args.threads, "bench-prepare")
    workloads = {"equal": 32, "varied": (8, 64)}
    results = []

    def record(system, n, shape, result):
        result.update(system=system, adapters=n, outputs=shape)
        results.append(result)
        print(f"{system:10s} N={n:<4d} {shape:7s} {result['tok_per_s']:8.1f} tok/s "
              f"({result['tokens']} tokens in {result['seconds']:.2f} s)", flush=True)

    engine = Engine.build(
        ModelConfig(path=str(base_dir), quantize=args.quantize),
        EngineConfig(max_batch_tokens=4096, max_num_seqs=args.num_requests, prefill_chunk=2048,
                     kv_cache_memory=512 * 2**20, max_gpu_adapters=min(args.num_requests, 128),
                     max_cpu_adapters=max(LORAPLEX_N), max_lora_rank=args.rank,
                     threads=args.threads),
        str(adapters_dir))
    engine.start()
    try:
        for shape, new_tokens in workloads.items():
            works = {n: make_workload(args.num_requests, (16, 64), new_tokens, n, vocab)
                     for n in LORAPLEX_N}
            fns = {n: (lambda w=w: run_engine(engine, w)) for n, w in works.items()}
            for n, result in interleaved(fns, args.repeat).items():
                record("loraplex", n, shape, result)
    finally:
        engine.stop()
    del engine

    hf = load_hf_model(base_dir)
    warm_up(hf, with_adapters=False)
    for shape, new_tokens in workloads.items():
        work = make_workload(args.num_requests, (16, 64), new_tokens, 0, vocab)
        record("hf", 0, shape, timed(lambda: hf_static_batch(hf, work, args.num_requests),
                                     args.repeat))
    del hf
    for n in PEFT_N:
        peft = load_peft_model(base_dir, {k: adapters_dir / k for k in bench_adapter_names(n)})
        warm_up(peft, with_adapters=True)
        for shape, new_tokens in workloads.items():
            work = make_workload(args.num_requests, (16, 64), new_tokens, n, vocab)
            record("peft", n, shape, timed(
                lambda: peft_static_batch(peft, work, args.num_requests), args.repeat))
        del peft

    print_table(results)
    meta = dict(machine=platform.machine(), processor=platform.processor(),
                cpus=os.cpu_count(), threads=args.threads, torch=torch.__version__,
                quantize=args.quantize, small=args.small, load_avg=os.getloadavg(),
                date=time.strftime("%Y-%m-%d"))
    if args.out:
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    return results


def print_table(results: list[dict]) -> None:
    by = {(r["system"], r["adapters"], r["outputs"]): r["tok_per_s"] for r in results}
    print("\noutputs  system     N     tok/s   vs loraplex N=0   vs PEFT same N   vs HF generate")
    for shape in ("equal", "varied"):
        own = by[("loraplex", 0, shape)]
        hf = by[("hf", 0, shape)]
        for (system, n, s), tps in by.items():
            if s != shape:
                continue
            peft = by.get(("peft", n, shape))
            vs_peft = f"{tps / peft:13.2f}x" if system == "loraplex" and peft else " " * 14
            print(f"{shape:8s} {system:9s} {n:4d} {tps:8.1f} {tps / own:15.2f}x  {vs_peft} "
                  f"{tps / hf:14.2f}x")


if __name__ == "__main__":
    main()
