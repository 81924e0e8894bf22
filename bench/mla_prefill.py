"""Latent attention's prefill expanded against absorbed, one MLA layer (not a test).

    python -m bench.mla_prefill [--heads 16] [--repeat 5] [--out bench/results/mla-prefill.json]

One DeepSeek-V3-shaped attention layer (kv_lora_rank 512, rotary 64, nope 128, values 128;
--heads of its 128, random weights), its latents in a paged cache. For each prefill chunk
of q new tokens over a context of L, times loraplex's attention (model.attention
.paged_attention) three ways in one process: every chunk expanded through kv_b_proj (HF's
keys and values per head), every chunk absorbed (attention over the 576-wide latents, as
the decodes), and as served (LatentProjection.expands picks by multiply-adds). Prints the
median milliseconds and the ratio of absorbed to expanded; the served column should be
the faster of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from loraplex.engine.threads import use_threads
from loraplex.model.attention import AttentionBatch, KVCache, PrefillSeq, attention_step, paged_attention
from loraplex.model.latent_attention import LatentProjection

# (new tokens, context): whole prompts, and chunks over a cached context
CASES = ((512, 512), (2048, 2048), (16, 4096), (64, 4096), (128, 4096), (256, 4096), (512, 4096))
BLOCK = 16


def layer(heads: int) -> DeepseekV3Attention:
    config = DeepseekV3Config(hidden_size=1024, num_attention_heads=heads, q_lora_rank=None,
                              kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                              v_head_dim=128)
    torch.manual_seed(0)
    module = DeepseekV3Attention(config, layer_idx=0).eval()
    module.loraplex_latent = LatentProjection(module, torch.float32)
    return module


def time_case(module: DeepseekV3Attention, queries: int, context: int, mode: str,
              repeat: int) -> float:
    """Median milliseconds of one attention call (cache write included)."""
    latent = module.loraplex_latent
    rule = LatentProjection.expands.__get__(latent)
    latent.expands = {"expanded": lambda q, L: True, "absorbed": lambda q, L: False,
                      "served": rule}[mode]
    heads, blocks = latent.heads, -(-context // BLOCK)
    cache = KVCache(1, blocks, BLOCK, {0: (1, 576, 512)}, torch.float32, torch.device("cpu"),
                    values_in_keys=frozenset({0}))
    cache.k[0].normal_()  # the cached context's latents
    step = AttentionBatch(cache=cache, slot_mapping=torch.arange(context - queries, context),
                          decode_groups=[], prefills=[PrefillSeq(0, queries, context,
                                                                 torch.arange(blocks))])
    query = torch.randn(1, heads, queries, 192)  # [1, H, q, nope + rope]
    key = torch.randn(1, 1, queries, 576)  # the new tokens' latents and rotary keys
    times = []
    with torch.inference_mode(), attention_step(step):
        for i in range(repeat + 1):
            start = time.perf_counter()
            out, _ = paged_attention(module, query, key, key[..., :512], None,
                                     scaling=192 ** -0.5)  # [1, q, H, 128]
            if i:  # (the first untimed)
                times.append((time.perf_counter() - start) * 1e3)
    assert out.shape == (1, queries, heads, 128)
    del latent.expands
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        use_threads(args.threads)
    module = layer(args.heads)
    rows = []
    for queries, context in CASES:
        ms = {mode: time_case(module, queries, context, mode, args.repeat)
              for mode in ("expanded", "absorbed", "served")}
        rows.append(dict(queries=queries, context=context, **ms,
                         served_expands=module.loraplex_latent.expands(queries, context)))
        print(f"q {queries:5d} over L {context:5d}: expanded {ms['expanded']:8.1f} ms, "
              f"absorbed {ms['absorbed']:8.1f} ms ({ms['absorbed'] / ms['expanded']:.2f}x), "
              f"served {ms['served']:8.1f} ms "
              f"({'expanded' if rows[-1]['served_expands'] else 'absorbed'})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(heads=args.heads, threads=torch.get_num_threads(), rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
