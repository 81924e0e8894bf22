"""Benchmark model, adapters and request mix (run from the repo root).

    base = build_bench_model(tmp / "base")                     # ~27M-param random Llama
    adapters = build_bench_adapters(base, tmp / "adapters", 32)  # name -> PEFT folder
    work = make_workload(num_requests=32, num_adapters=8, new_tokens=(8, 64), seed=0)

Every function is pure given its arguments and seed. The model is written with the
fidelity tests' builder (tests/models.py) and the adapters as PEFT folders, so the
engine loads them exactly as it loads a real checkpoint and PEFT folders.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex.engine.threads import run_in_fresh_thread
from tests.models import ATTN, QV, build_base

# hidden 512, 6 layers, 8 heads (no GQA), MLP 1376, vocab 8000, untied head:
# 6 x (4 x 512^2 + 3 x 512 x 1376) + 2 x 8000 x 512 = 27.2M parameters.
BENCH_MODEL = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1376,
    vocab_size=8000,
    max_position_embeddings=2048,
    initializer_range=0.02,  # speed does not care, and 0.02 keeps a 512-wide stack finite
)

SHAPES = {
    "bench": BENCH_MODEL,  # the CPU benchmark
    # a few-second smoke version of the same shape of model (for busy machines and CI)
    "small": dict(BENCH_MODEL, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=256, vocab_size=1000),
    # Llama-3-8B's shape (random weights): the GPU benchmark
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, initializer_range=0.02),
    # Qwen3.5's layout at the bench model's width: 6 Gated DeltaNet (linear attention)
    # layers and 2 of attention, three to one; 33.3M parameters
    "qwen3_5": dict(BENCH_MODEL, num_hidden_layers=8, num_key_value_heads=2, head_dim=64,
                    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                    linear_value_head_dim=64,
                    layer_types=["linear_attention"] * 3 + ["full_attention"]
                    + ["linear_attention"] * 3 + ["full_attention"]),
    # DeepSeek-V3's latent attention at the bench model's width (its latent cached:
    # model/latent_attention.py): latent 128, rotary keys 32, nope 64, values 64, every MLP
    # dense; 26.1M parameters
    "mla": dict(BENCH_MODEL, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
                v_head_dim=64, q_lora_rank=None, first_k_dense_replace=6, n_routed_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=256, n_group=1, topk_group=1),
}
SHAPE_ARCH = {"qwen3_5": "qwen3_5", "mla": "deepseek_v3_mla"}  # tests/models.py's family
# of a shape (else llama)

# short names of the linears each --targets choice adapts (None: every linear); "latent":
# a latent attention's (the mla shape's: PEFT 0.21 drops a DeepSeek-V3 adapter's dense MLP
# LoRA, turning gate/up/down_proj into expert parameters, so "all" would differ from it)
TARGETS = {"all": None, "attn": ATTN, "qv": QV,
           "latent": ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}


def build_bench_model(out_dir: str | Path, seed: int = 0, shape: str = "bench",
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write a random model of `shape` (a key of SHAPES; a Llama unless SHAPE_ARCH says)
    + byte tokenizer padded to the vocab."""
    return build_base(SHAPE_ARCH.get(shape, "llama"), out_dir, seed=seed, dtype=dtype,
                      device=device, **SHAPES[shape])


def bench_adapter_names(n: int) -> list[str]:
    return [f"bench{i:03d}" for i in range(n)]


def llama_module_shapes(hidden: int, layers: int, kv_dim: int, intermediate: int,
                        ) -> dict[str, tuple[int, int]]:
    """Served module name -> (in_features, out_features) of every linear of a Llama."""
    per_layer = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv_dim),
                 "self_attn.v_proj": (hidden, kv_dim), "self_attn.o_proj": (hidden, hidden),
                 "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
                 "mlp.down_proj": (intermediate, hidden)}
    return {f"model.layers.{i}.{m}": shape for i in range(layers) for m, shape in per_layer.items()}


def decoder_linears(base_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every linear in the decoder layers of
    the model in base_dir (built on the meta device: no weight is read or allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name}


def write_adapter(folder: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int,
                  base_model: str = "", dtype: torch.dtype = torch.float32) -> None:
    """A PEFT-format folder (config + safetensors) with random factors (no PEFT model
    needed, so an 8B-shaped adapter takes a second)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({m.rsplit(".", 1)[-1] for m in shapes})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
        "bias": "none", "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM"}))
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def build_bench_adapters(base_dir: str | Path, root_dir: str | Path, n: int,
                         ranks: tuple[int, ...] = (16,), targets: tuple[str, ...] = ("all",),
                         seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """n random PEFT adapters of the model in base_dir, saved in `dtype`; adapter i has rank
    ranks[i % len(ranks)] on targets[i % len(targets)] (keys of TARGETS). Returns name ->
    folder."""
    shapes = decoder_linears(base_dir)
    paths = {}
    for i, name in enumerate(bench_adapter_names(n)):
        modules = TARGETS[targets[i % len(targets)]]
        paths[name] = Path(root_dir) / name
        write_adapter(paths[name], {m: s for m, s in shapes.items()
                                    if modules is None or m.rsplit(".", 1)[-1] in modules},
                      ranks[i % len(ranks)], seed * 10_000 + i, str(base_dir), dtype)
    return paths


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None  # None = base model


def make_workload(num_requests: int = 32, prompt_len: tuple[int, int] = (16, 64),
                  new_tokens: int | tuple[int, int] = 32, num_adapters: int = 0,
                  vocab_size: int = BENCH_MODEL["vocab_size"], seed: int = 0) -> list[BenchRequest]:
    """num_requests requests; the order is the arrival order. Prompts and output lengths
    depend only on the seed, so workloads with different num_adapters differ only in
    which adapter each request names.

    prompt_len: inclusive range of prompt lengths (uniform).
    new_tokens: an int (every request generates exactly that many, EOS ignored) or an
        inclusive (lo, hi) range, uniform per request.
    num_adapters: N = 0 means base model only. Otherwise adapters bench000..bench{N-1} are
        dealt round-robin over a shuffled request order, so every adapter is used
        max(1, num_requests // N) times when N <= num_requests, and when N > num_requests
        each request gets a distinct adapter drawn from the N (the rest stay idle: that
        is the "many adapters loaded, few active" case).
    """
    rng = random.Random(seed)  # prompts and lengths: the same whatever num_adapters is
    shapes = []
    for _ in range(num_requests):
        length = rng.randint(*prompt_len)
        prompt = [rng.randrange(4, vocab_size) for _ in range(length)]  # ids 0..3 are specials
        n_new = new_tokens if isinstance(new_tokens, int) else rng.randint(*new_tokens)
        shapes.append((prompt, n_new))
    pick = random.Random(seed + 1)  # adapter assignment
    names = bench_adapter_names(num_adapters)
    if num_adapters > num_requests:
        names = pick.sample(names, num_requests)
    order = list(range(num_requests))
    pick.shuffle(order)
    adapter_of = {req: (names[k % len(names)] if names else None) for k, req in enumerate(order)}
    requests = [BenchRequest(prompt, n_new, adapter_of[i]) for i, (prompt, n_new) in enumerate(shapes)]
    return requests


def prepare_fp32_bench(workdir: Path, shape: str, num_adapters: int,
                       threads: int) -> tuple[Path, Path]:
    """(model dir, adapter root): the fp32 bench model of `shape` and `num_adapters`
    all-linear rank-16 adapters under `workdir`, in bench.bench's folders (a --workdir is
    shared with it), each built unless there already; drawn on a thread that exits (its
    OpenMP pool would slow the engine's: see bench.bench)."""
    base = workdir / f"base-{shape}-float32"
    adapters = workdir / f"adapters-{shape}-float32-all-r16"

    def prepare() -> None:
        if not (base / "config.json").exists():
            build_bench_model(base, shape=shape, dtype=torch.float32)
        if not (adapters / bench_adapter_names(num_adapters)[-1]).exists():
            build_bench_adapters(base, adapters, num_adapters)
    run_in_fresh_thread(prepare, threads, "bench-prepare")
    return base, adapters
