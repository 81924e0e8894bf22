"""Serving sampled requests (temperature 0.7, top-p 0.9, seeded) with the batched sampler
against the same engine drawing row by row (sampler.sample_one), on the bench model.

    python -m bench.sampling_serve

32 requests of 16-48 random tokens, 32 new tokens each, N = 0 and 32 adapters; 3 timed
rounds after one untimed, both forms in each; prints the median tok/s and ratio, and
whether both drew the same tokens (they must: same seeds).
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

from bench.workload import bench_adapter_names, prepare_fp32_bench
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.engine import Engine, collect
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.model import sampler

BATCHED = sampler.sample
ADAPTERS = 32


def row_by_row(logits, params, rows):
    """sampler.sample as it was: every adjusted row alone (sample_one, a sort of the row)."""
    return [sampler.sample_one(logits[i].float(), p, r) if sampler.adjusts(p, r)
            else BATCHED(logits[i:i + 1], [p], [r])[0] for i, (p, r) in enumerate(zip(params, rows))]


def requests(num_adapters: int, seed: int) -> list[GenerationRequest]:
    rnd = random.Random(seed)
    names = bench_adapter_names(ADAPTERS)
    return [GenerationRequest(
        [rnd.randrange(3, 8000) for _ in range(rnd.randint(16, 48))],  # (vocabulary 8,000)
        SamplingParams(max_new_tokens=32, ignore_eos=True, temperature=0.7, top_p=0.9, seed=i),
        adapter=names[i % num_adapters] if num_adapters else "") for i in range(32)]


def serve(engine: Engine, work: list[GenerationRequest]) -> tuple[float, list]:
    """All at once: (tok/s, each request's tokens)."""
    async def main():
        start = time.perf_counter()
        outs = await asyncio.gather(*[collect(engine.submit(r)) for r in work])
        return outs, time.perf_counter() - start
    outs, seconds = asyncio.run(main())
    return sum(len(o.token_ids) for o in outs) / seconds, [o.token_ids for o in outs]


def main() -> None:
    work = Path("/tmp/loraplex-bench")
    work.mkdir(exist_ok=True)
    base, adapters = prepare_fp32_bench(work, "bench", ADAPTERS, 2)
    engine = Engine.build(ModelConfig(path=str(base)), EngineConfig(
        threads=2, max_gpu_adapters=ADAPTERS, max_cpu_adapters=ADAPTERS, max_lora_rank=16,
        prefix_caching=False), str(adapters))
    engine.start()
    try:
        for n in (0, ADAPTERS):
            tps, ratios, same = {"row": [], "batched": []}, [], True
            for r in range(4):  # round 0 untimed
                res = {}
                for name, fn in (("row", row_by_row), ("batched", BATCHED)):
                    sampler.sample = fn
                    res[name] = serve(engine, requests(n, r))
                    if r:
                        tps[name].append(res[name][0])
                if r:
                    ratios.append(res["batched"][0] / res["row"][0])
                same = same and res["row"][1] == res["batched"][1]
            print(f"N={n} row-by-row {statistics.median(tps['row']):.0f} tok/s, batched "
                  f"{statistics.median(tps['batched']):.0f} tok/s, ratio "
                  f"{statistics.median(ratios):.2f}x, same tokens {same}")
    finally:
        sampler.sample = BATCHED
        engine.stop()


if __name__ == "__main__":
    main()
