"""Serving sampled requests (temperature 0.7, top-p 0.9, seeded) with the batched sampler
against the same engine drawing row by row (sampler.sample_one), on the bench model.

    python -m bench.sampling_serve

32 requests of 16-48 random tokens, 32 new tokens each, N = 0 and 32 adapters; 3 timed
rounds after one untimed, both forms in each; prints the median tok/s and ratio, and
whether both drew the same tokens (they must: same seeds).
"""
import asyncio, random, statistics, time  # noqa: E401
from pathlib import Path
from bench.workload import prepare_fp32_bench, bench_adapter_names
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.engine import Engine, collect
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.model import sampler


def main() -> None:
    work = Path("/tmp/loraplex-bench"); work.mkdir(exist_ok=True)
    base, ads = prepare_fp32_bench(work, "bench", 32, 2)
    eng = Engine.build(ModelConfig(path=str(base)), EngineConfig(threads=2, max_gpu_adapters=32, max_cpu_adapters=32, max_lora_rank=16, prefix_caching=False), str(ads))
    eng.start()
    names = bench_adapter_names(32)
    batched = sampler.sample
    def row_by_row(logits, params, rows):
        return [batched(logits[i:i+1], [p], [r])[0] if not sampler.adjusts(p, r) else sampler.sample_one(logits[i].float(), p, r) for i, (p, r) in enumerate(zip(params, rows))]
    def run(n_adapters, seed):
        rnd = random.Random(seed)
        reqs = [GenerationRequest([rnd.randrange(3, 8000) for _ in range(rnd.randint(16, 48))],
                SamplingParams(max_new_tokens=32, ignore_eos=True, temperature=0.7, top_p=0.9, seed=i),
                adapter=names[i % n_adapters] if n_adapters else "") for i in range(32)]
        async def main():
            t = time.perf_counter(); outs = await asyncio.gather(*[collect(eng.submit(r)) for r in reqs])
            return outs, time.perf_counter() - t
        outs, dt = asyncio.run(main())
        return sum(len(o.token_ids) for o in outs) / dt, [o.token_ids for o in outs]
    for n in (0, 32):
        ratios, tps = [], {"row": [], "batched": []}
        for r in range(4):
            res = {}
            for name, fn in (("row", row_by_row), ("batched", batched)):
                sampler.sample = fn
                res[name] = run(n, r)
                if r: tps[name].append(res[name][0])
            if r: ratios.append(res["batched"][0] / res["row"][0])
            same = res["row"][1] == res["batched"][1]
        print(f"N={n} row-by-row {statistics.median(tps['row']):.0f} tok/s, batched {statistics.median(tps['batched']):.0f} tok/s, ratio {statistics.median(ratios):.2f}x, same tokens {same}")
    eng.stop()


if __name__ == "__main__":
    main()
