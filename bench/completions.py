"""n completions per request (GenerationRequest.n) against HF PEFT's num_return_sequences,
in one process, on the bench model (not a test).

    python -m bench.completions                          # 4 prompts x n = 8
    python -m bench.completions --shape small --repeat 1  # a smoke run (numbers mean nothing)

Workload: --prompts prompts of --prompt-len tokens, each for its own adapter (all linear
layers, rank 16), each asking for --n sampled completions (temperature 1, top_p 0.95) of
--new-tokens tokens, drawn anew each round. Systems, each timed from submission to the last
token, --repeat rounds after one untimed, each round starting with the next system:

  loraplex n             one request per prompt with n completions (prefix caching on)
  loraplex n, no cache   the same, --prefix-caching off: each completion computes its prompt
  loraplex n x 1         n requests of one completion per prompt, all at once (prefix caching
                         on): what the requests cost without the n option
  HF PEFT                one generate(num_return_sequences=n, adapter_names=...) over every
                         prompt (equal lengths: no padding), transformers' own n

Prints each system's tok/s (median and range) and its ratio to HF PEFT and to loraplex n.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from bench.baselines import load_peft_model
from bench.workload import SHAPES, bench_adapter_names, prepare_fp32_bench
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.engine.threads import run_in_fresh_thread, use_threads

SYSTEMS = ("loraplex n", "loraplex n, no cache", "loraplex n x 1", "HF PEFT")


def sampling(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.95,
                          ignore_eos=True)


def run_loraplex(engine: Engine, prompts: list[list[int]], names: list[str], n: int,
                 new_tokens: int, split: bool) -> float:
    """Seconds until every completion is done: one request of n per prompt, or (`split`) n
    requests of one."""
    async def drain(stream) -> int:
        return sum([len(out.token_ids) async for out in stream])

    async def main() -> float:
        requests = [GenerationRequest(p, sampling(new_tokens), adapter=a, n=1 if split else n)
                    for p, a in zip(prompts, names) for _ in range(n if split else 1)]
        streams = [engine.submit(r) for r in requests]
        start = time.perf_counter()
        tokens = await asyncio.gather(*[drain(s) for s in streams])
        assert sum(tokens) == len(prompts) * n * new_tokens
        return time.perf_counter() - start
    return asyncio.run(main())


@torch.no_grad()
def run_peft(model, prompts: list[list[int]], names: list[str], n: int, new_tokens: int) -> float:
    input_ids = torch.tensor(prompts)  # [prompts, prompt_len]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              num_return_sequences=n, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=config,
                         adapter_names=[a for a in names for _ in range(n)])
    seconds = time.perf_counter() - start
    assert out.shape == (len(prompts) * n, input_ids.shape[1] + new_tokens)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=400)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-n-"))
    base, adapters = prepare_fp32_bench(workdir, args.shape, args.prompts, args.threads)
    names = bench_adapter_names(args.prompts)
    common = dict(max_batch_tokens=4096, max_num_seqs=64, prefill_chunk=2048,
                  kv_cache_memory=2**30, max_gpu_adapters=32, max_cpu_adapters=32,
                  max_lora_rank=16, threads=args.threads)
    cached, uncached = (Engine.build(ModelConfig(path=str(base)),
                                     EngineConfig(**common, prefix_caching=on), str(adapters))
                        for on in (True, False))
    peft = run_in_fresh_thread(lambda: load_peft_model(base, {a: adapters / a for a in names}),
                               args.threads, "n-peft-load")
    vocab = cached.loaded.vocab_size
    seconds = {s: [] for s in SYSTEMS}
    try:
        for r in range(args.repeat + 1):  # round 0 untimed
            rnd = random.Random(r)
            prompts = [[rnd.randrange(3, vocab) for _ in range(args.prompt_len)]
                       for _ in range(args.prompts)]
            run = (args.prompts, args.n, args.new_tokens)
            for system in SYSTEMS[r % 4:] + SYSTEMS[:r % 4]:  # each round starts elsewhere
                cached.stop()  # one step loop at a time, none beside the baseline
                uncached.stop()
                if system == "HF PEFT":
                    took = run_in_fresh_thread(lambda: run_peft(peft, prompts, names, *run[1:]),
                                               args.threads, "n-peft")
                else:
                    engine = uncached if system.endswith("no cache") else cached
                    engine.start()
                    took = run_loraplex(engine, prompts, names, args.n, args.new_tokens,
                                        split=system.endswith("x 1"))
                if r:
                    seconds[system].append(took)
    finally:
        cached.stop()
        uncached.stop()
    tokens = args.prompts * args.n * args.new_tokens
    print(f"{args.prompts} prompts of {args.prompt_len} tokens x n = {args.n} completions of "
          f"{args.new_tokens} tokens ({tokens} tokens a round), {args.repeat} rounds")
    print("| system | tok/s (range) | vs HF PEFT | vs loraplex n |")
    print("|---|---|---|---|")
    median = {s: statistics.median(tokens / t for t in seconds[s]) for s in SYSTEMS}
    for system in SYSTEMS:
        tps = [tokens / t for t in seconds[system]]
        print(f"| {system} | {median[system]:.0f} ({min(tps):.0f}-{max(tps):.0f}) | "
              f"{median[system] / median['HF PEFT']:.2f}x | "
              f"{median[system] / median['loraplex n']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
