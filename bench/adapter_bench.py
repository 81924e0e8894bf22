"""Adapter lifecycle benchmark (not a test). Two figures:

1. Cold load, disk -> ready, of a rank-16 all-linear adapter shaped for Llama-3-8B
   (hidden 4096, 32 layers, GQA with 8 kv heads, intermediate 14336: ~42M LoRA
   parameters, ~168 MB fp32), as a ratio to the time of just reading its file.
   "Ready" = read, hashed, validated and scaled in CPU memory (AdapterCache.acquire)
   and copied into a slot of every wrapped layer (AdapterCache.pin). Only the adapter
   and the wrapped layers' slot pools exist; the 8B base model is not needed.
2. Throughput (generated tokens/s) of one workload over 1,000 adapters with Zipf
   popularity, as a ratio to the same workload on one adapter, on the tiny test model.

    python -m bench.adapter_bench [--requests 300] [--tokens 16] [--slots 16]

Both file reads run with the file in the page cache (each is read once before timing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from engine_helpers import build_engine, greedy  # noqa: E402
from loraplex.engine.engine import collect  # noqa: E402
from loraplex.engine.request import GenerationRequest  # noqa: E402
from loraplex.engine.threads import use_threads  # noqa: E402
from loraplex.lora.cache import AdapterCache  # noqa: E402
from loraplex.lora.layer import LoraLinear  # noqa: E402
from loraplex.lora.ops import LoraPlan  # noqa: E402
from loraplex.lora.store import AdapterStore  # noqa: E402
from loraplex.metrics import Metrics  # noqa: E402
from models import build_base, make_prompts  # noqa: E402

from bench.workload import llama_module_shapes, write_adapter  # noqa: E402

LLAMA3_8B = dict(hidden=4096, layers=32, kv_dim=8 * 128, intermediate=14336)


def bench_cold_load(workdir: Path, repeats: int) -> dict:
    shapes = llama_module_shapes(**LLAMA3_8B)
    write_adapter(workdir / "llama3_8b_r16", shapes, rank=16, seed=0)
    path = workdir / "llama3_8b_r16" / "adapter_model.safetensors"
    layers = {name: LoraLinear(nn.Identity(), fan_in, fan_out, num_slots=2, max_rank=16,
                               dtype=torch.float32, device=torch.device("cpu"), plan=LoraPlan())
              for name, (fan_in, fan_out) in shapes.items()}
    params = sum(16 * (i + o) for i, o in shapes.values())
    read_s, ready_s = [], []
    for _ in range(repeats):
        path.read_bytes()  # page cache warm for both timings
        start = time.perf_counter()
        with open(path, "rb") as f:
            f.read()
        read_s.append(time.perf_counter() - start)
        cache = AdapterCache(AdapterStore(str(workdir), 16), layers, max_gpu=1, max_cpu=1,
                             metrics=Metrics())
        start = time.perf_counter()
        av = cache.acquire("llama3_8b_r16")
        cache.pin(av)
        ready_s.append(time.perf_counter() - start)
        cache.unpin(av)
        cache.release(av)
    read, ready = min(read_s), min(ready_s)
    return {"params": params, "file_mb": path.stat().st_size / 1e6, "read_s": read,
            "ready_s": ready, "ratio": ready / read}


def zipf_choices(n_adapters: int, n_requests: int, s: float, seed: int) -> list[int]:
    weights = torch.tensor([1.0 / (k + 1) ** s for k in range(n_adapters)])
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, n_requests, replacement=True, generator=gen).tolist()


def run_workload(engine, refs: list[str], prompts: list[list[int]], tokens: int) -> float:
    work = [GenerationRequest(prompts[i % len(prompts)], greedy(tokens), adapter=ref)
            for i, ref in enumerate(refs)]

    async def main():
        return await asyncio.gather(*[collect(engine.submit(r)) for r in work])
    start = time.perf_counter()
    outs = asyncio.run(main())
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / seconds


def bench_zipf(workdir: Path, n_adapters: int, n_requests: int, tokens: int, slots: int,
               s: float) -> dict:
    base = build_base("llama", workdir / "tiny")
    shapes = llama_module_shapes(hidden=64, layers=2, kv_dim=32, intermediate=128)
    for k in range(n_adapters):
        write_adapter(workdir / "zipf" / f"a{k:04d}", shapes, rank=8, seed=k)
    picks = zipf_choices(n_adapters, n_requests, s, seed=0)
    prompts = make_prompts(64, min_len=8, max_len=32, seed=1)
    kwargs = dict(max_gpu_adapters=slots, max_cpu_adapters=4 * slots, max_lora_rank=8,
                  max_num_seqs=32, max_queue=4 * n_requests)
    engine = build_engine(base, workdir / "zipf", **kwargs)
    try:
        run_workload(engine, ["a0000"] * 32, prompts, tokens)  # warm-up
        one = run_workload(engine, ["a0000"] * n_requests, prompts, tokens)
    finally:
        engine.stop()
    engine = build_engine(base, workdir / "zipf", **kwargs)  # cold: every adapter on disk
    try:
        many = run_workload(engine, [f"a{k:04d}" for k in picks], prompts, tokens)
        loads = engine.metrics.adapter_loads
        disk_loads, slot_loads = loads.labels("cpu")._value.get(), loads.labels("gpu")._value.get()
    finally:
        engine.stop()
    return {"distinct": len(set(picks)), "one_tok_s": one, "many_tok_s": many,
            "ratio": many / one, "disk_loads": disk_loads, "slot_loads": slot_loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    use_threads(args.threads)
    print(f"load average before: {os.getloadavg()}, torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        cold = bench_cold_load(Path(tmp), args.repeats)
        print(f"cold load: {cold['params'] / 1e6:.1f}M params, {cold['file_mb']:.0f} MB file; "
              f"read {cold['read_s'] * 1e3:.0f} ms, disk->ready {cold['ready_s'] * 1e3:.0f} ms, "
              f"ratio {cold['ratio']:.2f} (best of {args.repeats})")
        z = bench_zipf(Path(tmp), args.adapters, args.requests, args.tokens, args.slots,
                       args.zipf_s)
        print(f"zipf s={args.zipf_s}: {args.requests} requests x {args.tokens} tokens over "
              f"{args.adapters} adapters ({z['distinct']} distinct used), {args.slots} slots: "
              f"{z['many_tok_s']:.0f} tok/s vs one adapter {z['one_tok_s']:.0f} tok/s, "
              f"ratio {z['ratio']:.2f}; disk reads {z['disk_loads']:.0f}, "
              f"slot fills {z['slot_loads']:.0f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
