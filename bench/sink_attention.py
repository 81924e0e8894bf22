"""Attention with sinks (GPT-OSS's) through SDPA against the math form, one prefill chunk
(not a test).

    python -m bench.sink_attention [--context 4096] [--chunk 512] [--heads 64 --kv-heads 8]

GPT-OSS's shapes by default (64 query heads over 8 kv heads of 64; random values): one
prefill chunk of --chunk new tokens over a context of --context (the chunk its last
positions), attended by model.attention.sdpa_with_sinks and by math_attention with the
sinks, in one process. Prints the median milliseconds of each and how much the process's
peak memory grew (sdpa_with_sinks runs first: the peak only grows).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from loraplex.engine.threads import use_threads
from loraplex.model.attention import math_attention, sdpa_with_sinks


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (Linux: KiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    if args.threads:
        use_threads(args.threads)
    torch.manual_seed(0)
    q = torch.randn(1, args.heads, args.chunk, args.head_dim)  # [1, H, q, d]
    k, v = (torch.randn(1, args.kv_heads, args.context, args.head_dim) for _ in range(2))
    positions = torch.arange(args.context)
    mask = positions <= positions[-args.chunk:].unsqueeze(1)  # [q, L]: causal, the last q
    sinks = torch.linspace(-1, 3, args.heads)  # [H]
    forms = {"sdpa_with_sinks": lambda: sdpa_with_sinks(q, k, v, mask, None, sinks, False),
             "math_attention": lambda: math_attention(q, k, v, mask, None, sinks=sinks)}
    results, outs = {}, {}
    with torch.inference_mode():
        for name, form in forms.items():
            before = peak_mib()
            outs[name] = form()
            grown = peak_mib() - before
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                form()
                times.append((time.perf_counter() - start) * 1e3)
            results[name] = (statistics.median(times), grown)
    gap = (outs["sdpa_with_sinks"] - outs["math_attention"]).abs().max().item()
    print(f"{args.chunk} queries over {args.context} positions, {args.heads} heads over "
          f"{args.kv_heads} of {args.head_dim}, {torch.get_num_threads()} threads "
          f"(max |difference| {gap:.1e}):")
    for name, (ms, grown) in results.items():
        print(f"  {name:16s} {ms:8.1f} ms   peak memory +{grown:7.0f} MiB")
    fast, slow = results["sdpa_with_sinks"][0], results["math_attention"][0]
    print(f"  math / sdpa: {slow / fast:.2f}x the time")


if __name__ == "__main__":
    main()
