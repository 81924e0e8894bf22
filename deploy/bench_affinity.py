"""Adapter affinity vs round robin behind nginx: throughput and adapter cache churn.

Same replicas and workload twice, each time on fresh replicas (cold caches):
  1. nginx `hash <adapter name> consistent` (deploy/nginx/loraplex.conf.template)
  2. nginx round robin (the same config without the hash line)
The workload uses more adapters than one replica's --max-gpu-adapters (and
--max-cpu-adapters), so without affinity every replica cycles all adapters through
its slots; with affinity each replica only sees its share.

    python deploy/bench_affinity.py                      # 2 replicas, 12 adapters
    python deploy/bench_affinity.py --replicas 3 --requests 600 --json out.json

Prints tokens/s per mode, the ratio, and adapter loads/evictions per tier summed
over the replicas (from their Prometheus metrics). Not a test: numbers depend on
the machine (CPU replicas on shared cores contend with each other).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
sys.path.insert(0, str(ROOT / "tests"))

from local_cluster import LocalCluster  # noqa: E402


def build_assets(root: Path, n_adapters: int, hidden: int) -> tuple[Path, Path]:
    from models import ADAPTER_SPECS, build_adapters, build_base

    specs = {s.name: s for s in ADAPTER_SPECS}
    model = build_base("llama", root / "model", seed=7, hidden_size=hidden,
                       intermediate_size=2 * hidden, max_position_embeddings=512)
    kinds = ["r16_attn", "r16_mlp", "r32_attn", "r64_mlp"]
    build_adapters(model, root / "adapters",
                   [dataclasses.replace(specs[kinds[i % len(kinds)]], name=f"t{i:02d}",
                                        seed=200 + i) for i in range(n_adapters)])
    return model, root / "adapters"


def workload(n_requests: int, n_adapters: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"t{rng.randrange(n_adapters):02d}" for _ in range(n_requests)]


def totals(cluster: LocalCluster) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in cluster.replica_list:
        for (name, labels), v in r.scrape().items():
            if name in ("loraplex_adapter_loads_total", "loraplex_adapter_evictions_total",
                        "loraplex_adapter_cache_misses_total"):
                key = f"{name.removeprefix('loraplex_').removesuffix('_total')}[{dict(labels)['tier']}]"
            elif name in ("loraplex_adapter_cache_hits_total", "loraplex_generated_tokens_total"):
                key = name.removeprefix("loraplex_").removesuffix("_total")
            else:
                continue
            out[key] = out.get(key, 0) + v
    return out


def run_mode(balance: str, args, model: Path, adapters: Path, work: Path) -> dict:
    from loraplex_client import Client

    serve_args = ("--max-gpu-adapters", str(args.max_gpu_adapters),
                  "--max-cpu-adapters", str(args.max_cpu_adapters),
                  "--kv-cache-memory", "64MiB", "--max-num-seqs", "32")
    cluster = LocalCluster(model, adapters, work / balance, replicas=args.replicas,
                           serve_args=serve_args, balance=balance)
    (work / balance).mkdir(parents=True, exist_ok=True)
    with cluster:
        jobs = workload(args.requests, args.adapters, args.seed)
        before = totals(cluster)
        lock, errors, tokens = threading.Lock(), [], [0]
        it = iter(jobs)

        def worker():
            with Client(cluster.target, timeout=120) as c:
                while True:
                    with lock:
                        a = next(it, None)
                    if a is None:
                        return
                    try:
                        r = c.generate(input_ids=[5, 6, 7, 8, 9, 10], adapter=a,
                                       max_new_tokens=args.max_new_tokens, ignore_eos=True)
                        with lock:
                            tokens[0] += len(r.token_ids)
                    except Exception as exc:  # noqa: BLE001  (counted, reported)
                        with lock:
                            errors.append(f"{a}: {exc}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = totals(cluster)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}
    return {"balance": balance, "wall_s": round(wall, 2), "tokens": tokens[0],
            "tokens_per_s": round(tokens[0] / wall, 1), "errors": len(errors),
            "error_examples": errors[:3], "metrics_delta": delta}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--adapters", type=int, default=12)
    p.add_argument("--max-gpu-adapters", type=int, default=2)
    p.add_argument("--max-cpu-adapters", type=int, default=12)
    p.add_argument("--requests", type=int, default=360)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--workdir", help="keep models, configs and replica logs here "
                                     "(default: a temporary folder, removed)")
    args = p.parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the replicas and nginx are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="bench_affinity_") as tmp:
        work = Path(args.workdir or tmp)
        model, adapters = build_assets(work / "assets", args.adapters, args.hidden)
        load = os.getloadavg()
        results = [run_mode(b, args, model, adapters, work) for b in ("hash", "round_robin")]
    h, rr = results
    report = {"config": vars(args), "loadavg_at_start": [round(x, 2) for x in load],
              "cpus": os.cpu_count(), "results": results,
              "hash_over_round_robin": (round(h["tokens_per_s"] / rr["tokens_per_s"], 3)
                                        if rr["tokens_per_s"] else None)}
    for r in results:
        m = r["metrics_delta"]
        print(f"{r['balance']:>12}: {r['tokens_per_s']:8.1f} tok/s  ({r['tokens']} tokens in "
              f"{r['wall_s']} s, {r['errors']} errors)  loads gpu/cpu "
              f"{m.get('adapter_loads[gpu]', 0):.0f}/{m.get('adapter_loads[cpu]', 0):.0f}  "
              f"evictions gpu/cpu {m.get('adapter_evictions[gpu]', 0):.0f}/"
              f"{m.get('adapter_evictions[cpu]', 0):.0f}  gpu-slot hits "
              f"{m.get('adapter_cache_hits', 0):.0f}")
    print(f"hash / round robin tokens/s: {report['hash_over_round_robin']}  "
          f"(load average at start {report['loadavg_at_start']}, {report['cpus']} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
