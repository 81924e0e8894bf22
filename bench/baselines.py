"""Speed baselines for loraplex: static batching with HF transformers and HF PEFT.

    python -m bench.baselines                       # N = 0, 8, 32 on the ~27M Llama, 2 threads
    python -m bench.baselines --small --adapters 0 2 --num-requests 8   # smoke run

(a) peft_static_batch: all N adapters loaded in one PeftModel; requests go in arrival order
    in static batches of `batch_size`, each batch one left-padded
    `generate(..., adapter_names=[...])` (PEFT's mixed-adapter batching).
(b) hf_static_batch: plain transformers `generate`, no adapters, same batching.

Static batching runs each batch until its longest request is done, so with varied
output lengths the short requests' slots idle; only useful tokens are counted (each
request's own max_new_tokens), which is what a continuous-batching engine is compared on.
EOS never stops generation (the models are random; every request makes exactly its
max_new_tokens tokens in the count).

Numbers only mean something on a quiet machine: check `uptime` (load < 1.5 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.workload import (BenchRequest, bench_adapter_names, build_bench_adapters, build_bench_model,
                            make_workload)

PAD_ID = 0


def load_hf_model(base_dir: str | Path) -> torch.nn.Module:
    """The base model for baseline (b), fp32, eval, EOS cleared so generate never stops early."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def load_peft_model(base_dir: str | Path, adapter_dirs: dict[str, Path]) -> torch.nn.Module:
    """Baseline (a)'s model: one PeftModel holding every adapter under its own name."""
    from peft import PeftModel

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(load_hf_model(base_dir), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [batch, width], attention_mask [batch, width] (padding on the left)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def _static_batches(model, requests: list[BenchRequest], batch_size: int, with_adapters: bool) -> dict:
    """Run requests in arrival order, batch_size at a time; time only the generate calls."""
    seconds, useful = 0.0, 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        input_ids, attention_mask = _left_pad([r.prompt_ids for r in batch])
        longest = max(r.max_new_tokens for r in batch)  # the whole batch runs this long
        config = GenerationConfig(do_sample=False, max_new_tokens=longest, min_new_tokens=longest,
                                  eos_token_id=None, pad_token_id=PAD_ID, use_cache=True)
        kwargs = {}
        if with_adapters:
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in batch]
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=config, **kwargs)
        seconds += time.perf_counter() - t0
        assert out.shape[1] == input_ids.shape[1] + longest
        useful += sum(r.max_new_tokens for r in batch)
    return dict(tokens=useful, seconds=seconds, tok_per_s=useful / seconds)


def peft_static_batch(model, requests: list[BenchRequest], batch_size: int = 32) -> dict:
    """(a) HF PEFT mixed-adapter static batching. model: from load_peft_model."""
    return _static_batches(model, requests, batch_size, with_adapters=True)


def hf_static_batch(model, requests: list[BenchRequest], batch_size: int = 32) -> dict:
    """(b) plain transformers static batching, no adapter (requests' adapters are ignored)."""
    return _static_batches(model, requests, batch_size, with_adapters=False)


def warm_up(model, with_adapters: bool) -> None:
    """One tiny generate so lazy initialisation is not timed."""
    _static_batches(model, [BenchRequest([5, 6, 7, 8], 2, None)], 1, with_adapters)


def _load_avg() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 8, 32], help="values of N")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32],
                        help="one value (all equal) or two (uniform range, e.g. 8 64)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", choices=["all", "attn"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="tiny model: a smoke run, not a measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens[0] if len(args.new_tokens) == 1 else tuple(args.new_tokens)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    base_dir = build_bench_model(workdir / "base", seed=args.seed, small=args.small)
    vocab = AutoModelForCausalLM.from_pretrained(base_dir).config.vocab_size
    adapter_dirs = build_bench_adapters(base_dir, workdir / "adapters", max(args.adapters),
                                        rank=args.rank, targets=args.targets, seed=args.seed)
    load_before = _load_avg()

    results = []
    for n in args.adapters:
        work = make_workload(args.num_requests, tuple(args.prompt_len), new_tokens, n, vocab, args.seed)
        if n == 0:
            name, model = "hf_static", load_hf_model(base_dir)
            warm_up(model, with_adapters=False)
            result = hf_static_batch(model, work, args.batch_size)
        else:
            name = "peft_static"
            # all N adapters resident (as in the server), also those the workload leaves idle
            model = load_peft_model(base_dir, {k: adapter_dirs[k] for k in bench_adapter_names(n)})
            warm_up(model, with_adapters=True)
            result = peft_static_batch(model, work, args.batch_size)
        result.update(baseline=name, num_adapters=n, num_requests=args.num_requests,
                      batch_size=args.batch_size, new_tokens=new_tokens, threads=args.threads,
                      small=args.small)
        results.append(result)
        print(f"{name:12s} N={n:4d}  {result['tokens']:6d} tokens  {result['seconds']:8.2f} s  "
              f"{result['tok_per_s']:8.1f} tok/s", flush=True)
        del model
    load_after = _load_avg()
    quiet = max(load_before, load_after) < 1.5
    print(f"load average before/after: {load_before:.2f} / {load_after:.2f}"
          + ("" if quiet else "  -- machine was busy: take numbers on a quiet machine"))
    print(json.dumps(dict(results=results, load_avg=[load_before, load_after], quiet=quiet)))
    return results


if __name__ == "__main__":
    main()
