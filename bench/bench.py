"""loraplex against its baselines, in one process, on the same model and requests.

    make bench                            # = python -m bench.bench (the ~27M Llama, 2 threads)
    python -m bench.bench --shape small   # a smoke run on a tiny model (numbers mean nothing)
    python -m bench.bench --shape llama3-8b --quantize nf4 --kv-cache-memory 2GiB \
        --workdir /dev/shm/bench --repeat 3  # on a GPU: Llama-3-8B-shaped, random weights

Variants, each on equal (32 new tokens) and varied (8..64) output lengths:
  loraplex with no adapter, 1 adapter for all requests, N = 8, 32, 128 distinct adapters;
  HF PEFT mixed-batch generate(adapter_names=...) on the same requests (N = 1, 8, 32);
  transformers generate, no adapter (static batching).
Every request makes exactly its max_new_tokens (EOS ignored); only those useful tokens
are counted. Decoding is greedy everywhere, and each loraplex row also reports how many
of its requests got the same tokens as from PEFT (from HF generate for N=0): a check of
fidelity at the benchmark's shape and quantization, where the tests use tiny models.

Timing: every variant runs once untimed (loading, warm-up), then all of them run in
--repeat rounds (A B C ..., A B C ...). A shared CPU's speed drifts by +-20% within
minutes, more than the differences measured, so each ratio is taken within a round (both
runs in the same stretch of time) and the median over rounds is reported, with the median
tok/s of each variant. A baseline runs on a thread that exits, with the engine's step loop
stopped: two threads' OpenMP pools slow each other down (loraplex.engine.threads).
Prints a table, writes every round's figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from bench.baselines import (hf_static_batch, load_hf_model, load_peft_model, peft_static_batch,
                             warm_up)
from bench.workload import (SHAPES, TARGETS, BenchRequest, bench_adapter_names, build_bench_adapters,
                            build_bench_model, make_workload)
from loraplex.config import DTYPE_CHOICES, LORA_BACKENDS, EngineConfig, ModelConfig, parse_size
from loraplex.engine.engine import Engine, collect
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.engine.threads import run_in_fresh_thread, use_threads
from loraplex.model.loader import resolve_device, resolve_dtype

LORAPLEX_N = (0, 1, 8, 32, 128)
PEFT_N = (1, 8, 32)
WORKLOADS = {"equal": 32, "varied": (8, 64)}  # new tokens per request: all equal, or a range


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
    failed = [o.error for o in outs if o.error]
    if failed:  # e.g. the model raised in a step (the engine logged the traceback)
        raise RuntimeError(f"{len(failed)} of {len(outs)} requests failed: {failed[0]}")
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(r.max_new_tokens for r in work)
    return dict(tokens=tokens, seconds=seconds, tok_per_s=tokens / seconds,
                outputs=[list(o.token_ids) for o in outs])


def engine_variants(backends: list[str], dtypes: list[str]) -> list[tuple[str, str, str]]:
    """(system name, backend, dtype) per engine: the first pair is "loraplex", each
    other "loraplex-<backend>-<dtype>", naming only the options given several values."""
    variants = []
    for i, (backend, lora_dtype) in enumerate(itertools.product(backends, dtypes)):
        named = [value for value, several in ((backend, len(backends) > 1),
                                              (lora_dtype, len(dtypes) > 1)) if several]
        variants.append(("loraplex" if i == 0 else "-".join(["loraplex", *named]),
                         backend, lora_dtype))
    return variants


def cpu_model() -> str:
    """The CPU, as precisely as the OS tells: "AMD EPYC (AuthenticAMD family 25 model 1)" from
    /proc/cpuinfo (hosts that share a model name differ in their vector units), else
    platform.processor()."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    fields = {}  # "cpu family\t: 25" -> {"cpu family": "25"}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    name, vendor, family, model = (fields.get(k, "?") for k in
                                   ("model name", "vendor_id", "cpu family", "model"))
    return f"{name} ({vendor} family {family} model {model})"


def in_rounds(fns: dict[tuple, Callable[[], dict]], repeat: int) -> dict[tuple, list[dict]]:
    """Each fn once untimed, then `repeat` rounds of all of them; key -> its runs by round.
    Each timed run is printed as it ends (a run cut short still shows what it measured)."""
    for fn in fns.values():
        fn()
    runs = {key: [] for key in fns}
    for i in range(repeat):
        for key, fn in fns.items():
            runs[key].append(fn())
            print(f"  round {i + 1}/{repeat}: {key[0]} N={key[1]} "
                  f"{runs[key][-1]['tok_per_s']:.1f} tok/s", flush=True)
    return runs


def paired_ratio(runs: list[dict], ref: list[dict] | None) -> float | None:
    """Median over rounds of tok/s over the reference's tok/s in the same round."""
    if not ref:
        return None
    return statistics.median(a["tok_per_s"] / b["tok_per_s"] for a, b in zip(runs, ref))


def agreement(served: list[list[int]], reference: list[list[int]]) -> dict:
    """Greedy tokens against the reference's for the same requests: the share of requests
    whose tokens are all equal, and the share of tokens before each request's first
    difference (the rest follow a different prefix, so they are not compared)."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return dict(same_requests=sum(a == b for a, b in zip(served, reference)) / len(served),
                same_tokens=(sum(prefix(a, b) for a, b in zip(served, reference))
                             / sum(len(b) for b in reference)))


def summarize(system: str, n: int, outputs: str, runs: list[dict], by_key: dict) -> dict:
    """One variant's row: its median tok/s and its paired ratios to loraplex N=0, to PEFT
    with the same N (for loraplex) and to HF generate; for loraplex, its tokens against
    the same requests' from PEFT (N > 0) or HF generate (N = 0)."""
    tps = [r["tok_per_s"] for r in runs]
    row = dict(system=system, adapters=n, outputs=outputs, tok_per_s=statistics.median(tps),
               rounds=[round(t, 1) for t in tps], tokens=runs[0]["tokens"],
               vs_loraplex_n0=paired_ratio(runs, by_key.get(("loraplex", 0))),
               vs_peft=(paired_ratio(runs, by_key.get(("peft", n)))
                        if system.startswith("loraplex") else None),
               vs_hf=paired_ratio(runs, by_key.get(("hf", 0))))
    reference = by_key.get(("peft", n) if n else ("hf", 0))
    if system.startswith("loraplex") and reference:
        row["vs_reference_tokens"] = agreement(runs[0]["outputs"], reference[0]["outputs"])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--dtype", default="auto", help="as `loraplex serve --dtype`")
    parser.add_argument("--device", default="auto", help="as `loraplex serve --device`")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, nargs="+", default=list(LORAPLEX_N),
                        help="loraplex's values of N (PEFT runs those of 1, 8, 32 among them)")
    parser.add_argument("--rank", type=int, nargs="+", default=[16],
                        help="the adapters' ranks: adapter i has the i-th (cycling)")
    parser.add_argument("--targets", nargs="+", default=["all"], choices=sorted(TARGETS),
                        help="the adapters' target modules, cycling like --rank: all linear "
                             "layers, attention (q, k, v, o), or q and v (PEFT's default for Llama)")
    parser.add_argument("--kv-cache-memory", type=parse_size, default=512 * 2**20)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=DTYPE_CHOICES,
                        help="as `loraplex serve --kv-cache-dtype` (every engine)")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="as `loraplex serve --prefix-caching on`; off by default, since "
                             "every round sends the same prompts again")
    parser.add_argument("--lora-backend", nargs="+", default=["auto"], choices=LORA_BACKENDS,
                        help="as `loraplex serve --lora-backend`; several values: see --lora-dtype")
    parser.add_argument("--lora-dtype", nargs="+", default=["auto"], choices=DTYPE_CHOICES,
                        help="as `loraplex serve --lora-dtype`. Each (backend, dtype) pair after "
                             "the first adds an engine whose rows are 'loraplex-<backend>-<dtype>' "
                             "(naming only what has several values; N > 0) in the same rounds; "
                             "PEFT keeps the adapters in the model's dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    base_options = dict(quantize=args.quantize, dtype=args.dtype, device=str(device))
    peft_n = [n for n in PEFT_N if n in args.adapters]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    # a --workdir is reused across runs: one folder per model and per set of adapters
    base_dir = workdir / f"base-{args.shape}-{str(dtype).removeprefix('torch.')}"
    adapters_dir = (workdir / f"adapters-{args.shape}-{str(dtype).removeprefix('torch.')}"
                    f"-{'+'.join(args.targets)}-r{'+'.join(map(str, args.rank))}")

    # Each side runs alone. A long-lived thread's OpenMP pool next to the one running
    # slows the latter down (one 2-thread matmul on this main thread made 8 adapters with
    # varied lengths 0.58x of N=0 instead of 0.79x), so a baseline runs on a thread that
    # exits, with the engine's step loop (and its pool) stopped; the engine keeps its state.
    def baseline(fn: Callable[[], dict]) -> Callable[[], dict]:
        def run() -> dict:
            for e in engines.values():
                e.stop()
            return run_in_fresh_thread(fn, args.threads, "bench-baseline")
        return run

    def loraplex(engine: Engine, work: list[BenchRequest]) -> Callable[[], dict]:
        def run() -> dict:
            for other in engines.values():  # one step loop at a time
                if other is not engine:
                    other.stop()
            engine.start()  # no-op when running
            return run_engine(engine, work)
        return run

    def prepare():
        if not (base_dir / "config.json").exists():  # drawn on the accelerator, in its dtype
            build_bench_model(base_dir, shape=args.shape, device=str(device), dtype=dtype)
        n_max = max(args.adapters)
        if n_max and not (adapters_dir / bench_adapter_names(n_max)[-1]).exists():
            build_bench_adapters(base_dir, adapters_dir, n_max,
                                 ranks=tuple(args.rank), targets=tuple(args.targets), dtype=dtype)
        hf = load_hf_model(base_dir, **base_options)
        warm_up(hf, with_adapters=False)
        peft = None
        if peft_n:  # one PeftModel holds the adapters of every N (its cost follows the batch's)
            names = bench_adapter_names(max(peft_n))
            peft = load_peft_model(base_dir, {k: adapters_dir / k for k in names}, **base_options)
            warm_up(peft, with_adapters=True)
        return hf, peft

    hf, peft = run_in_fresh_thread(prepare, args.threads, "bench-prepare")
    vocab = AutoConfig.from_pretrained(base_dir).vocab_size
    engines = {  # system name -> engine; the first (backend, dtype) is plain "loraplex"
        name: Engine.build(
            ModelConfig(path=str(base_dir), **base_options),
            EngineConfig(max_batch_tokens=4096, max_num_seqs=args.num_requests,
                         prefill_chunk=2048, kv_cache_memory=args.kv_cache_memory,
                         kv_cache_dtype=args.kv_cache_dtype, prefix_caching=args.prefix_caching,
                         max_gpu_adapters=min(args.num_requests, max(max(args.adapters), 1)),
                         max_cpu_adapters=max(args.adapters + [args.num_requests]),
                         max_lora_rank=max(args.rank), lora_backend=backend,
                         lora_dtype=lora_dtype, threads=args.threads),
            str(adapters_dir))
        for name, backend, lora_dtype in engine_variants(args.lora_backend, args.lora_dtype)}
    engine = engines["loraplex"]
    results = []

    def write_json() -> None:  # after each workload, so a run cut short keeps the first
        if not args.out:
            return
        meta = dict(machine=platform.machine(), processor=cpu_model(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512..
                    cpus=os.cpu_count(), threads=args.threads, torch=torch.__version__,
                    **{lib: importlib.metadata.version(lib)  # (their kernels set the figures too)
                       for lib in ("transformers", "peft", "bitsandbytes")},
                    device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else str(device)),
                    shape=args.shape, quantize=args.quantize, dtype=str(dtype),
                    lora_backend=args.lora_backend, lora_dtype_options=args.lora_dtype,
                    lora_kernel={system: e.runner.lora_delta.__name__  # what "auto" chose
                                 for system, e in engines.items()},
                    lora_dtype={system: str(e.loaded.lora_dtype) for system, e in engines.items()},
                    decode_attention="sdpa" if engine.runner.decode_kernel is None else "cpu",
                    kv_cache_dtype=str(engine.kv_cache.k[0].dtype),
                    prefix_caching=args.prefix_caching,
                    num_requests=args.num_requests, rank=args.rank, targets=args.targets,
                    repeat=args.repeat,
                    load_avg=os.getloadavg(), date=time.strftime("%Y-%m-%d"))
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    try:
        for outputs, new_tokens in WORKLOADS.items():
            def work(n: int) -> list[BenchRequest]:
                return make_workload(args.num_requests, (16, 64), new_tokens, n, vocab)
            fns = {(system, n): loraplex(e, work(n)) for system, e in engines.items()
                   for n in args.adapters if n > 0 or e is engine}
            fns[("hf", 0)] = baseline(lambda w=work(0): hf_static_batch(hf, w, args.num_requests))
            for n in peft_n:
                fns[("peft", n)] = baseline(
                    lambda w=work(n): peft_static_batch(peft, w, args.num_requests))
            runs = in_rounds(fns, args.repeat)
            for (system, n), r in runs.items():
                results.append(summarize(system, n, outputs, r, runs))
                print(f"{system:28s} N={n:<4d} {outputs:7s} {results[-1]['tok_per_s']:8.1f} tok/s "
                      f"(rounds: {results[-1]['rounds']})", flush=True)
            write_json()
    finally:
        for e in engines.values():
            e.stop()

    print_table(results)
    return results


def print_table(results: list[dict]) -> None:
    def ratio(value: float | None, width: int) -> str:
        return f"{value:{width}.2f}x" if value is not None else " " * (width + 1)

    def same(r: dict) -> str:
        agree = r.get("vs_reference_tokens")
        return (f"{agree['same_requests']:8.0%} {agree['same_tokens']:7.0%}" if agree
                else "")

    print("\nmedian tok/s, and ratios taken within each round (median over rounds); greedy "
          "tokens equal to PEFT's (HF generate's for N=0): share of requests, of tokens")
    print(f"outputs  {'system':28s}   N     tok/s   vs loraplex N=0   vs PEFT same N   "
          "vs HF generate   same tokens")
    for r in results:
        print(f"{r['outputs']:8s} {r['system']:28s} {r['adapters']:4d} {r['tok_per_s']:8.1f} "
              f"{ratio(r['vs_loraplex_n0'], 15)}  {ratio(r['vs_peft'], 13)} "
              f"{ratio(r['vs_hf'], 14)}  {same(r)}")


if __name__ == "__main__":
    main()
