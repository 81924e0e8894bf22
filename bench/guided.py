"""What guided decoding costs (not a test).

    python -m bench.guided                        # masks on a 128k vocabulary + serving
    python -m bench.guided --tokenizer tok.json   # masks on a tokenizer of your own
    python -m bench.guided --shape small          # a smoke run (numbers mean nothing)

1. Masks. For each pattern, the automaton states along one matching output. First, as
   served: each state's first mask in order on a new guide, which builds the lazy
   automaton's rows as the tokens' walks reach them. Then, rows built, each mask again
   twice: by loraplex's walk of every token at once through the automaton's table
   (engine.guide, over the trie of the tokens' bytes) and by the plain way, one automaton
   walk per token. Prints the mean and worst ms per state of each, the ratio of the last
   two, and the cost of a mask found before (kept, unpacked); all of it for both of
   loraplex's walks: the C loop (cpu_kernels' trie_walk, what the engine uses) and numpy
   one trie level at a time (its fallback without a C compiler). The default tokenizer is a byte-level BPE of --vocab tokens trained
   here on the Python sources of this interpreter's site-packages (no download; ~30 s).
2. Serving. The bench model, 32 requests over --adapters distinct adapters, 32 new
   tokens each: unguided, then each one guided by a pattern of exactly 32 characters
   (one token each with the bench tokenizer), one untimed round then --repeat timed;
   prints tok/s and the guided / unguided ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from bench.workload import SHAPES, build_bench_adapters, build_bench_model, make_workload
from loraplex import cpu_kernels
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.byte_regex import DEAD
from loraplex.engine.engine import Engine, collect
from loraplex.engine.guide import Guide, Vocabulary
from loraplex.engine.guide_compiler import compile_guide
from loraplex.engine.request import GenerationRequest, SamplingParams
from loraplex.engine.threads import run_in_fresh_thread, use_threads

SCHEMA = json.dumps({"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 32}, "age": {"type": "integer", "minimum": 0,
    "maximum": 150}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}}}})
PATTERNS = {  # name -> (guide key, a matching output whose states are measured)
    "json": (("regex", r'\{"name": "[^"\\]{1,32}", "age": [0-9]{1,3}, "tags": \[("[a-z]{1,12}"'
                       r'(, "[a-z]{1,12}")*)?\]\}'),
             '{"name": "Ada Lovelace", "age": 36, "tags": ["math"]}'),
    "schema": (("json", SCHEMA), '{"name": "Ada Lovelace", "age": 36, "tags": ["math"]}'),
    "json_object": (("json", '{"type": "object"}'),  # (free-form, nested 4 deep)
                    '{"name": "Ada", "tags": ["math", {"k": [1, 2.5, null]}], "ok": true}'),
    "choice": (("choice", ("positive", "negative", "neutral", "mixed", "unrelated")),
               "unrelated"),
    "date": (("regex", r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"), "2026-12-03"),
    "free text": (("regex", r"[^\n]{0,200}\n"), "Any line of text, one token after another.\n"),
}
SERVING_PATTERN = r"[a-z0-9 ,.]{32}"


def train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/**/*.py", recursive=True))

    def texts():
        for f in files[:20000]:
            yield Path(f).read_text(encoding="utf-8", errors="ignore")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    return AutoTokenizer.from_pretrained(path)


def bench_masks(tokenizer) -> None:
    t = time.perf_counter()
    vocab = Vocabulary.of(tokenizer, len(tokenizer))
    print(f"vocabulary: {len(vocab.by_id)} tokens read as bytes in "
          f"{time.perf_counter() - t:.2f} s (once per server)")
    walks = {"C": cpu_kernels.load(), "numpy": None}  # (the engine's, and its fallback)
    if walks["C"] is None:
        del walks["C"]
        print("no C compiler here: the numpy walk only")
    print(f"{'pattern':<11} {'walk':<6} {'states':>6} {'first ms':>12} {'table walk ms':>16} "
          f"{'per-token ms':>14} {'ratio':>6} {'kept ms':>8} {'allowed':>9}")
    for name, (key, sample) in PATTERNS.items():
        plain: list[float] = []  # one walk per token, timed once per pattern
        for walk, kernels in walks.items():
            guide = Guide(compile_guide(key), vocab, kernels)
            dfa = guide.dfa
            data = sample.encode()
            states = list(dict.fromkeys(dfa.walk(dfa.start, data[:n]) for n in range(len(data))))
            assert DEAD not in states
            first = []
            for state in states:  # as served: the automaton's rows built as the walks reach them
                t = time.perf_counter()
                guide.mask(state, ())
                first.append(time.perf_counter() - t)
            ours, kept, allowed = [], [], []
            for i, state in enumerate(states):
                guide._masks.clear()
                t = time.perf_counter()
                mask = guide.mask(state, ())
                ours.append(time.perf_counter() - t)
                if len(plain) == i:
                    t = time.perf_counter()
                    want = [dfa.walk(state, b) != DEAD for b in vocab.by_id.values()]
                    plain.append(time.perf_counter() - t)
                    assert sum(want) == int(mask.sum())
                t = time.perf_counter()
                guide.mask(state, ())
                kept.append(time.perf_counter() - t)
                allowed.append(int(mask.sum()))
            print(f"{name:<11} {walk:<6} {len(states):>6} {1e3 * statistics.mean(first):>6.2f} / "
                  f"{1e3 * max(first):<4.1f} {1e3 * statistics.mean(ours):>8.2f} / "
                  f"{1e3 * max(ours):<5.1f} {1e3 * statistics.mean(plain):>7.1f} / "
                  f"{1e3 * max(plain):<4.0f} {sum(plain) / sum(ours):>5.0f}x "
                  f"{1e3 * statistics.mean(kept):>8.2f} {statistics.mean(allowed):>9.0f}")


def run_round(engine: Engine, work, pattern: str | None) -> float:
    async def main():
        streams = [engine.submit(GenerationRequest(
            r.prompt_ids, SamplingParams(max_new_tokens=32, ignore_eos=True,
                                         guided_regex=pattern or ""),
            adapter=r.adapter or "")) for r in work]
        start = time.perf_counter()
        outs = await asyncio.gather(*[collect(s) for s in streams])
        return outs, time.perf_counter() - start
    outs, seconds = asyncio.run(main())
    assert all(len(o.token_ids) == 32 and not o.error for o in outs), outs[0]
    return 32 * len(work) / seconds


def bench_serving(shape: str, num_adapters: int, repeat: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, root = Path(tmp) / "base", Path(tmp) / "adapters"

        def prepare() -> None:  # (the model is drawn on a thread that exits: see bench.bench)
            build_bench_model(base, shape=shape)
            build_bench_adapters(base, root, num_adapters)
        run_in_fresh_thread(prepare, threads, "guided-prepare")
        engine = Engine.build(ModelConfig(path=str(base)), EngineConfig(
            max_batch_tokens=4096, max_num_seqs=32, prefill_chunk=2048, kv_cache_memory=2**30,
            max_gpu_adapters=max(num_adapters, 1), max_cpu_adapters=max(num_adapters, 1),
            max_lora_rank=16, threads=threads, prefix_caching=False), str(root))
        engine.start()
        try:
            work = make_workload(32, new_tokens=32, num_adapters=num_adapters,
                                 vocab_size=engine.loaded.vocab_size)
            rates: dict[str | None, list[float]] = {None: [], SERVING_PATTERN: []}
            for pattern in rates:
                run_round(engine, work, pattern)  # untimed: masks found, kernels warm
            for _ in range(repeat):
                for pattern, tps in rates.items():
                    tps.append(run_round(engine, work, pattern))
        finally:
            engine.stop()
    plain, guided = (statistics.median(r) for r in rates.values())
    ratios = [g / p for p, g in zip(*rates.values())]
    print(f"serving, {num_adapters} adapters, 32 requests x 32 tokens: unguided "
          f"{plain:.0f} tok/s, guided {guided:.0f} tok/s, ratio {statistics.median(ratios):.2f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or a model folder")
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    small = args.shape != "bench"
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        t = time.perf_counter()
        tokenizer = train_tokenizer(2000 if small else args.vocab)
        print(f"trained a byte-level BPE of {len(tokenizer)} tokens in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
    bench_masks(tokenizer)
    bench_serving(args.shape, 4 if small else args.adapters, 1 if small else args.repeat,
                  args.threads)


if __name__ == "__main__":
    main()
