"""Running the real engine from synchronous tests."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine.engine import Engine, collect
from loraplex.engine.request import GenerationRequest, RequestOutput, SamplingParams
from loraplex.model.attention import KVCache


def build_engine(base_dir, adapter_root, quantize="none", dtype="float32",
                 **engine_kwargs) -> Engine:
    defaults = dict(max_gpu_adapters=24, max_cpu_adapters=32, max_lora_rank=64,
                    kv_cache_memory=16 * 2**20, block_size=8, max_batch_tokens=256,
                    prefill_chunk=32, max_num_seqs=64)
    defaults.update(engine_kwargs)
    # fp32 by default, as the reference: "auto" would be bf16 on a CUDA machine
    engine = Engine.build(ModelConfig(path=str(base_dir), quantize=quantize, dtype=dtype),
                          EngineConfig(**defaults), str(adapter_root))
    engine.start()
    return engine


def tiny_llama_blocks(num_blocks: int, block_size: int) -> int:
    """The kv_cache_memory that holds exactly `num_blocks` KV blocks of the tiny llama
    (tests/models.py: 2 layers, 2 KV heads of 16, fp32)."""
    return num_blocks * KVCache.bytes_per_block(block_size, {0: (2, 16, 16), 1: (2, 16, 16)},
                                                torch.float32)


def greedy(max_new_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kwargs)


def run_all(engine: Engine, requests: list[GenerationRequest]) -> list[RequestOutput]:
    """Submit every request at once and wait for all of them."""
    async def main():
        return await asyncio.gather(*[collect(engine.submit(r)) for r in requests])
    return asyncio.run(main())


def run_staggered(engine: Engine, first: list[GenerationRequest], later: list[GenerationRequest],
                  after_tokens: int) -> tuple[list[RequestOutput], int]:
    """Submit `first`; once the first of them has streamed `after_tokens` tokens (so the
    batch is mid-decode), submit `later`. Returns the outputs (first + later, in order)
    and the engine's step count when `later` joined."""
    async def main():
        started = asyncio.Event()
        streams = [engine.submit(r) for r in first]
        outs = {}

        async def consume(i, stream):
            tokens, last, lps, prompt_lps, text = [], None, [], [], []
            try:
                async for out in stream:
                    tokens.extend(out.token_ids)
                    text.append(out.text)
                    lps.extend(out.logprobs)
                    prompt_lps.extend(out.prompt_logprobs)
                    last = out
                    if i == 0 and len(tokens) >= after_tokens:
                        started.set()
            finally:
                if i == 0:  # (also when it ended early or raised, e.g. refused: no hang)
                    started.set()
            outs[i] = (tokens, last, lps, prompt_lps, "".join(text))

        tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(streams)]
        await started.wait()
        steps_at_join = engine.steps
        late = [engine.submit(r) for r in later]
        tasks += [asyncio.create_task(consume(len(first) + i, s)) for i, s in enumerate(late)]
        await asyncio.gather(*tasks)
        results = [replace(outs[i][1], token_ids=tuple(outs[i][0]), logprobs=tuple(outs[i][2]),
                           prompt_logprobs=tuple(outs[i][3]), text=outs[i][4])
                   for i in range(len(tasks))]
        return results, steps_at_join
    return asyncio.run(main())

