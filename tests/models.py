"""Tiny random models and PEFT adapters for fidelity tests (no downloads, no pytest).

Everything here is a pure function of its arguments (and a seed): call it with an
output directory and it writes a standard HF / PEFT folder there.

    base = build_base("llama", tmp / "llama")              # model + tokenizer
    adapters = build_adapters(base, tmp / "adapters", ADAPTER_SPECS)
    adapters["r8_attn"]  -> tmp / "adapters" / "r8_attn"   # adapter_config.json + safetensors

Weights are drawn with a large std (see INIT_STD) so that greedy decoding is not
knife-edge: the top-1 / top-2 logit gap is typically > 0.1 (see `logit_gap_stats`),
so fp32 vs. fp32 differences in summation order do not flip tokens.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from loraplex.engine.guide import gpt2_byte_chars
from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GPTJConfig,
    GPTNeoXConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GptOssConfig,
    Llama4TextConfig,
    LlamaConfig,
    MistralConfig,
    Lfm2Config,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3NextConfig,
    StableLmConfig,
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")

# Special token ids shared by every tiny model (prompts should use ids >= FIRST_TEXT_ID).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_TEXT_ID = 4

VOCAB_SIZE = 256
# std of every Linear / Embedding weight except the output head. 0.02 (the HF default)
# leaves the layers nearly an identity on a 64-wide model; 0.1 makes them matter.
INIT_STD = 0.1
# The output head is drawn so the logits have std ~LOGIT_STD: near-uniform logits would
# make greedy argmax knife-edge.
LOGIT_STD = 3.0

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per kv head
    max_position_embeddings=256,
    initializer_range=INIT_STD,
    tie_word_embeddings=False,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

def _gemma3_vision(**text_fields) -> Gemma3Config:
    """Gemma 3 as its 4B-27B checkpoints are: Gemma3ForConditionalGeneration, a language
    model beside a (here one-layer) SigLIP vision tower, whose image tokens sit at the top
    of the vocabulary (text never produces them)."""
    shared = {k: text_fields.pop(k) for k in ("initializer_range", "tie_word_embeddings")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    top = VOCAB_SIZE - 1
    return Gemma3Config(text_config=text_fields, vision_config=vision, mm_tokens_per_image=4,
                        image_token_index=top, boi_token_index=top - 2, eoi_token_index=top - 1,
                        **shared)


_QWEN3_5_TEXT = dict(head_dim=16, num_hidden_layers=4, linear_num_key_heads=2,
                     linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                     layer_types=["linear_attention", "full_attention"] * 2)


def _qwen3_5_vision(**text_fields) -> Qwen3_5Config:
    """Qwen3.5 as its checkpoints are: Qwen3_5ForConditionalGeneration, the language model
    beside a (here one-block) vision encoder, model.visual."""
    shared = {k: text_fields.pop(k) for k in ("initializer_range", "tie_word_embeddings")}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=text_fields["hidden_size"], patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    return Qwen3_5Config(text_config=text_fields, vision_config=vision, **shared)


def _mistral3_vision(**text_fields) -> Mistral3Config:
    """Mistral Small 3.1's layout: Mistral3ForConditionalGeneration, a Mistral language model
    beside a (here one-layer) Pixtral vision tower; AutoModelForCausalLM does not take it."""
    shared = {k: text_fields.pop(k) for k in ("initializer_range", "tie_word_embeddings")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)
    return Mistral3Config(text_config=dict(text_fields, model_type="mistral"),
                          vision_config=vision, image_token_index=VOCAB_SIZE - 1, **shared)


# models built from their own class, not AutoModelForCausalLM's (which loads Qwen3.5's
# text model alone, and does not take Mistral3)
_MODEL_CLASSES = {"qwen3_5_vision": Qwen3_5ForConditionalGeneration,
                  "mistral3_vision": Mistral3ForConditionalGeneration}

# arch -> (config class, fields beyond _COMMON). Overrides go into the constructor, so
# derived fields (head_dim = hidden / heads for llama) follow them. An arch's place here
# seeds its weights (build_base): add new archs at the end, or every later one is redrawn
# (and the figures the tests print and the README quotes change).
_CONFIGS = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, dict(use_sliding_window=False)),  # q/k/v have biases
    "qwen3": (Qwen3Config, dict(head_dim=16)),  # q_norm / k_norm per head
    "gemma": (GemmaConfig, dict(head_dim=16)),  # embeddings * sqrt(hidden), (1 + w) norms
    # layer 0 attends to a sliding window of 8 positions, layer 1 to all; attention scores
    # soft-capped at 2 (cap * tanh(score / cap)), the logits at 10: caps small enough to
    # move these random models' outputs (Gemma 2's own: 50 and 30)
    "gemma2": (Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                  attn_logit_softcapping=2.0, final_logit_softcapping=10.0)),
    # the same window, q_norm / k_norm per head, no caps
    "gemma3": (Gemma3TextConfig, dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"])),
    # beyond ARCHS (their adapters need other module names, see FAMILY_SPECS): one fused
    # qkv_proj and gate_up_proj linear each; an MLP of 4 experts, 2 per token
    "phi3": (Phi3Config, {}),
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=None)),
    "gemma3_vision": (_gemma3_vision, dict(head_dim=16, query_pre_attn_scalar=16,
                                           sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"])),
    # Gated DeltaNet (linear attention) layers between (gated) attention ones, served by
    # loraplex.model.linear_attention; 2 value heads per key head
    "qwen3_5": (Qwen3_5TextConfig, _QWEN3_5_TEXT),
    "qwen3_5_vision": (_qwen3_5_vision, _QWEN3_5_TEXT),
    "mistral3_vision": (_mistral3_vision, dict(head_dim=16, sliding_window=None)),
    "qwen3_5_moe": (Qwen3_5MoeTextConfig, dict(_QWEN3_5_TEXT, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32)),
    # the same with fused in_proj_qkvz / in_proj_ba and a MoE MLP
    "qwen3_next": (Qwen3NextConfig, dict(head_dim=16, num_hidden_layers=4, linear_num_key_heads=2,
                                         linear_num_value_heads=4, linear_key_head_dim=16,
                                         linear_value_head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32,
                                         layer_types=["linear_attention", "full_attention"] * 2)),
    # attention sinks (a learned logit per head), a window of 8 in layer 0, 4 experts
    "gpt_oss": (GptOssConfig, dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                   sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])),
    # one fused query_key_value linear; _COMMON's num_key_value_heads, which GPT-NeoX does
    # not read (it has no grouped-query attention), must not size the KV cache
    "gpt_neox": (GPTNeoXConfig, {}),
    # multi-head latent attention: keys from a compressed kv_a_proj_with_mqa / kv_b_proj,
    # 8 + 8 wide as the values; experts after a dense first layer
    "deepseek_v3": (DeepseekV3Config, dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                           qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=32,
                                           first_k_dense_replace=1, n_group=1, topk_group=1)),
    # as DeepSeek-V3 ships: values narrower than keys (here 8 and 16 + 8 rotary; its own
    # 128 and 192), as many kv heads as heads, twice the latent wider than the keys' nope
    # and values together (its 1,024 and 256: a long prefill attends expanded, cheaper)
    "deepseek_v3_mla": (DeepseekV3Config, dict(
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)),
    # DeepSeek-V2's latent attention (its query compressed too, as V2's full model), and
    # GLM-4.7-Flash's (Glm4MoeLite): their latents cached (latent_attention.py)
    "deepseek_v2": (transformers.DeepseekV2Config, dict(
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)),
    "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, dict(
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)),
    # Gemma 4: global layers with heads twice as wide as the sliding ones' (its own 512 and
    # 256); as E2B / E4B, per-layer inputs, the last two layers reusing the keys and values
    # of earlier ones, capped logits...
    "gemma4": (transformers.Gemma4TextConfig, dict(
        head_dim=16, global_head_dim=32, sliding_window=8, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=256,
        final_logit_softcapping=30.0)),
    # ...and as 26B-A4B, global layers with one kv head whose keys are its values, and a
    # mixture of experts beside each MLP
    "gemma4_moe": (transformers.Gemma4TextConfig, dict(
        head_dim=16, global_head_dim=32, sliding_window=8, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=0,
        attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=32)),
    # Llama 4's text model (the decoder is the model itself, by its get_decoder), experts
    # and a shared expert, with full attention in both layers...
    "llama4": (Llama4TextConfig, dict(head_dim=16, num_local_experts=4, intermediate_size_mlp=128,
                                      layer_types=["full_attention"] * 2)),
    # ...and as it ships, chunked attention (here chunks of 8), which HF's code says in
    # its mask alone (attention._chunk_of reads the config)
    "llama4_chunked": (Llama4TextConfig, dict(head_dim=16, num_local_experts=4,
                                              intermediate_size_mlp=128, attention_chunk_size=8)),
    # more families, each with something of its own: q/k norms after the projections;
    # sliding and global layers with parallel attention and MLP; a post-MLP norm; scaled
    # embeddings, residuals and logits; KV shared across layers, AltUp and per-layer
    # inputs; routed experts; layers without rotary positions; biases and a GELU MLP
    "olmo2": (transformers.Olmo2Config, {}),
    "cohere2": (transformers.Cohere2Config, dict(head_dim=16, sliding_window=8)),
    "glm4": (transformers.Glm4Config, dict(head_dim=16)),
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                 logits_scaling=2.0, attention_multiplier=0.2)),
    "gemma3n": (transformers.Gemma3nTextConfig, dict(
        head_dim=16, num_hidden_layers=4, num_kv_shared_layers=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=16,
        laurel_rank=8, activation_sparsity_pattern=[0.0] * 4, vocab_size_per_layer_input=256)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(head_dim=16, num_experts=4,
                                                    num_experts_per_tok=2, moe_intermediate_size=32)),
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layers=[1, 0])),
    "starcoder2": (transformers.Starcoder2Config, dict(sliding_window=None)),
    # its layers are transformer.h (not a `layers` list), rotary on 8 of each head's 16
    "gptj": (GPTJConfig, dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8)),
    # decoder layers that do not pass the model's keyword arguments on to attention
    # (loraplex's batch reaches it through attention.attention_step): StableLM with
    # per-head q/k norms and a parallel residual; Falcon 40B/180B's grouped fused QKV, and
    # Falcon 7B's multi-query one with parallel attention; Nemotron (partial rotary, ReLU^2)
    "stablelm": (StableLmConfig, dict(qk_layernorm=True, use_parallel_residual=True)),
    "falcon": (transformers.FalconConfig, dict(alibi=False, new_decoder_architecture=True,
                                               num_kv_heads=2)),
    "falcon_mqa": (transformers.FalconConfig, dict(alibi=False, new_decoder_architecture=False,
                                                   multi_query=True, parallel_attn=True)),
    "nemotron": (transformers.NemotronConfig, {}),
    # GPT-2: its linears are transformers Conv1D (weight [in, out]), one fused c_attn;
    # learned absolute positions
    "gpt2": (transformers.GPT2Config, dict(n_inner=128)),
    # Phi-3.5-MoE: a sliding window as long as its context (131,072 both, here 256), which
    # its attention does not pass (HF applies it in its mask): it never binds, so served
    "phimoe": (transformers.PhimoeConfig, dict(sliding_window=256, num_local_experts=4,
                                               num_experts_per_tok=2)),
    # an attention block shared by layers, without a layer index (Zamba's): refused
    "zamba": (transformers.ZambaConfig, dict(attn_layer_period=2, attn_layer_offset=1,
                                             layer_types=["mamba", "hybrid"],
                                             mamba_d_state=8, mamba_dt_rank=8,
                                             attention_head_dim=16)),
    # attention that loraplex's does not build, each refused at load: an encoder's, both
    # ways (BERT's as a language model, is_decoder unset); a learned dynamic mask (Doge's);
    # two attention calls a layer (DiffLlama's differential attention)
    "bert": (transformers.BertConfig, dict(is_decoder=False)),
    "doge": (transformers.DogeConfig, dict(keep_window_size=4)),
    "diffllama": (transformers.DiffLlamaConfig, {}),
    # model code that does not load with loraplex's attention at all (GIT looks attention
    # up in a table of its own): refused
    "git": (transformers.GitConfig, dict(vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16))),
    # a sliding window its config sets and its attention does not pass on (HF applies it in
    # its mask alone): refused
    "moshi": (transformers.MoshiConfig, dict(sliding_window=8)),
    # attention code of its own (not transformers' attention functions), with ALiBi: refused
    "bloom": (transformers.BloomConfig, dict(n_head=4, n_layer=2)),
    # model code that reads a linear's weight (its dtype) beside calling it: HunYuan-MoE's
    # router, Ergo's layers (LoraLinear.weight, PackedLinear.weight)
    "hunyuan_moe": (transformers.HunYuanMoEV1Config, dict(head_dim=16, num_experts=4, moe_topk=2)),
    "ergo": (transformers.ErgoConfig, dict(
        head_dim=16, first_dense_intermediate_size=128, moe_intermediate_size=32,
        shared_intermediate_size=64, num_experts=4, num_experts_per_tok=2, sliding_window=8,
        global_attention_every_n_layers=2)),
    # ALiBi position biases (Falcon-RW's), which HF puts in the attention mask: refused
    "falcon_alibi": (transformers.FalconConfig, dict(alibi=True, new_decoder_architecture=False,
                                                     multi_query=False)),
    # short-convolution layers between attention ones: refused (see
    # loader.probe_attention)
    "lfm2": (Lfm2Config, dict(num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2,
                              block_ff_dim=128, block_auto_adjust_ff_dim=False)),
}


def char_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level fast tokenizer with no merges: one id per byte, `vocab_size` ids in all.

    ids 0..3 are <pad> <s> </s> <unk>; id i >= 4 is the byte (i - 4 + 32) % 256, so printable
    ASCII is ids 4..98 (space = 4). Bytes are spelled GPT-2 style (space = "Ġ"), which keeps
    the tokenizer the same when AutoTokenizer loads it as a model-specific class that rebuilds
    a byte-level pipeline (transformers 5 does that for qwen2). Built with the `tokenizers`
    library, so AutoTokenizer.from_pretrained loads it offline. Ids past 259 (bigger vocabs)
    are filler tokens "<extra_N>" that text never produces.
    """
    gpt2_bytes = gpt2_byte_chars()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(FIRST_TEXT_ID, vocab_size):
        n = i - FIRST_TEXT_ID
        vocab[gpt2_bytes[(n + 32) % 256] if n < 256 else f"<extra_{n - 256}>"] = i
    backend = Tokenizer(tk_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def _init_weights(model: torch.nn.Module, std: float, logit_std: float) -> None:
    """Normal(0, std) for Linear / Embedding weights and biases; norms untouched.

    The lm_head gets std logit_std / sqrt(hidden): its input is RMS-normalised (rms ~1),
    so each logit then has std ~logit_std.
    """
    lm_head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w_std = logit_std / math.sqrt(module.weight.shape[1]) if module is lm_head else std
            torch.nn.init.normal_(module.weight, mean=0.0, std=w_std)
            if getattr(module, "bias", None) is not None:
                # Non-zero biases (qwen2 q/k/v) so a bias bug in the engine would show.
                torch.nn.init.normal_(module.bias, mean=0.0, std=std)


def build_base(arch: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str = "cpu", **config_overrides) -> Path:
    """Write a tiny random causal LM of family `arch` (one of ARCHS) plus its tokenizer.

    The result loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir).
    `config_overrides` replace fields of the config (e.g. hidden_size=512 for a bigger model).
    The weights are drawn on `device` and saved in `dtype` (a GPU draws an 8B model fast).
    """
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose from {tuple(_CONFIGS)}")
    out_dir = Path(out_dir)
    config_class, extra = _CONFIGS[arch]
    config = config_class(**{**_COMMON, **extra, **config_overrides})
    # Different archs get different weights for the same seed (by their place in _CONFIGS).
    torch.manual_seed(seed * 1000 + list(_CONFIGS).index(arch))
    with torch.device(device):
        if arch in _MODEL_CLASSES:
            model = _MODEL_CLASSES[arch]._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _init_weights(model, std=config.initializer_range, logit_std=LOGIT_STD)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    char_tokenizer(config.get_text_config().vocab_size).save_pretrained(out_dir)  # (multimodal: its text model's)
    return out_dir


@torch.no_grad()
def logit_gap_stats(model: torch.nn.Module, prompts: list[list[int]]) -> dict[str, float]:
    """top-1 minus top-2 logit at every position of every prompt: min / median / std of logits."""
    gaps, stds = [], []
    for ids in prompts:
        logits = model(torch.tensor([ids])).logits[0]  # [seq, vocab]
        top2 = logits.topk(2, dim=-1).values  # [seq, 2]
        gaps.append(top2[:, 0] - top2[:, 1])
        stds.append(logits.std(dim=-1))
    gap = torch.cat(gaps)
    return {
        "gap_min": gap.min().item(),
        "gap_p10": gap.quantile(0.1).item(),
        "gap_median": gap.median().item(),
        "logit_std": torch.cat(stds).mean().item(),
    }


# ---------------------------------------------------------------------------------------
# Adapters

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTN + MLP
QV = ("q_proj", "v_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """One PEFT LoraConfig, plus how strongly its random weights perturb the base.

    `delta_ratio`: after random init, every LoRA pair in the adapter is rescaled so that
    ||scaling * B @ A||_F == delta_ratio * ||W_base||_F for that layer. The adapter's
    alpha / r / rsLoRA scaling stays what the config says (so an engine that gets the
    scaling wrong produces visibly wrong outputs), but the *effective* delta is
    comparable across adapters, whatever their alpha and rank.
    """

    name: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # a str is a regex over full module names
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    delta_ratio: float = 0.2
    seed: int = 0

    def lora_config(self):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=targets,
            use_rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,  # random A and B (then rescaled, see delta_ratio)
        )


ADAPTER_SPECS: tuple[AdapterSpec, ...] = (
    # rank sweep, attention only (q, k, v, o)
    AdapterSpec("r1_attn", r=1, lora_alpha=1, target_modules=ATTN, seed=1),
    AdapterSpec("r2_attn", r=2, lora_alpha=16, target_modules=ATTN, seed=2),
    AdapterSpec("r4_attn", r=4, lora_alpha=8, target_modules=ATTN, seed=3),
    AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=4),
    AdapterSpec("r16_attn", r=16, lora_alpha=32, target_modules=ATTN, seed=5),
    AdapterSpec("r32_attn", r=32, lora_alpha=32, target_modules=ATTN, seed=6),
    AdapterSpec("r64_attn", r=64, lora_alpha=128, target_modules=ATTN, seed=7),
    # MLP only (gate, up, down)
    AdapterSpec("r4_mlp", r=4, lora_alpha=4, target_modules=MLP, seed=8),
    AdapterSpec("r16_mlp", r=16, lora_alpha=16, target_modules=MLP, seed=9),
    AdapterSpec("r64_mlp", r=64, lora_alpha=8, target_modules=MLP, seed=10),
    # all linear layers
    AdapterSpec("r2_all", r=2, lora_alpha=128, target_modules=ALL_LINEAR, seed=11),
    AdapterSpec("r8_all", r=8, lora_alpha=8, target_modules=ALL_LINEAR, seed=12),
    AdapterSpec("r32_all", r=32, lora_alpha=64, target_modules=ALL_LINEAR, seed=13),
    # q + v only (the classic LoRA paper setting)
    AdapterSpec("r1_qv", r=1, lora_alpha=8, target_modules=QV, seed=14),
    AdapterSpec("r8_qv", r=8, lora_alpha=32, target_modules=QV, seed=15),
    # rsLoRA: scaling = alpha / sqrt(r)
    AdapterSpec("r16_all_rslora", r=16, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True, seed=16),
    AdapterSpec("r64_qv_rslora", r=64, lora_alpha=8, target_modules=QV, use_rslora=True, seed=17),
    # per-module ranks / alphas (keys are module-name suffixes, as PEFT matches them)
    AdapterSpec("pattern_all", r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                rank_pattern={"q_proj": 2, "down_proj": 32}, alpha_pattern={"v_proj": 128, "down_proj": 4},
                seed=18),
    AdapterSpec("pattern_attn_rslora", r=4, lora_alpha=8, target_modules=ATTN, use_rslora=True,
                rank_pattern={"o_proj": 16}, alpha_pattern={"k_proj": 1}, seed=19),
    # target_modules as a regex over full names: q and down projections of layer 1 only
    AdapterSpec("regex_l1_q_down", r=8, lora_alpha=16,
                target_modules=r".*layers\.1\.(self_attn\.q_proj|mlp\.down_proj)", delta_ratio=0.4, seed=20),
)

# The smaller set used for the non-llama families: one of each kind.
SMALL_SPEC_NAMES = ("r1_qv", "r8_attn", "r16_mlp", "r32_all", "r16_all_rslora", "pattern_all")


def small_specs() -> tuple[AdapterSpec, ...]:
    return tuple(s for s in ADAPTER_SPECS if s.name in SMALL_SPEC_NAMES)


# Adapters of the families outside ARCHS, by their own module names. (Mixtral's experts
# are raw parameters, which adapters cannot target here: see store.py's target_parameters.)
FAMILY_SPECS: dict[str, tuple[AdapterSpec, ...]] = {
    "phi3": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=("qkv_proj", "o_proj"),
                         seed=1),
             AdapterSpec("r4_mlp", r=4, lora_alpha=8, target_modules=("gate_up_proj", "down_proj"),
                         seed=2),
             AdapterSpec("r16_all_rslora", r=16, lora_alpha=16, target_modules="all-linear",
                         use_rslora=True, seed=3)),
    "mixtral": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=1),
                AdapterSpec("r2_qv", r=2, lora_alpha=16, target_modules=QV, seed=2),
                AdapterSpec("r32_kv_rslora", r=32, lora_alpha=8, target_modules=("k_proj", "v_proj"),
                            use_rslora=True, seed=3)),
    # the linear-attention layers' projections; the (gated) attention's; every linear
    "qwen3_5": (AdapterSpec("r8_linear_attn", r=8, lora_alpha=16,
                            target_modules=("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                                            "out_proj"), seed=1),
                AdapterSpec("r16_attn", r=16, lora_alpha=16, target_modules=ATTN, seed=2),
                AdapterSpec("r4_all_rslora", r=4, lora_alpha=8, target_modules="all-linear",
                            use_rslora=True, seed=3)),
    # (the same, but for the router and experts' MLP: attention and linear attention)
    "qwen3_5_moe": (AdapterSpec("r8_linear_attn", r=8, lora_alpha=16,
                                target_modules=("in_proj_qkv", "in_proj_z", "out_proj"), seed=1),
                    AdapterSpec("r16_attn", r=16, lora_alpha=16, target_modules=ATTN, seed=2)),
    "gpt_neox": (AdapterSpec("r8_all_linear", r=8, lora_alpha=16, target_modules="all-linear",
                             seed=1),
                 AdapterSpec("r4_qkv", r=4, lora_alpha=8, target_modules=("query_key_value",),
                             seed=2)),
    # the latent attention's projections (its experts are raw parameters)
    "deepseek_v3": (AdapterSpec("r8_attn", r=8, lora_alpha=16, seed=1, target_modules=(
        "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
                    AdapterSpec("r4_kv", r=4, lora_alpha=8,
                                target_modules=("kv_a_proj_with_mqa", "kv_b_proj"), seed=2)),
    "deepseek_v3_mla": (AdapterSpec("r8_attn", r=8, lora_alpha=16, seed=1, target_modules=(
        "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),),
    "deepseek_v2": (AdapterSpec("r8_attn", r=8, lora_alpha=16, seed=1, target_modules=(
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
                    AdapterSpec("r16_kv_rslora", r=16, lora_alpha=16, use_rslora=True, seed=2,
                                target_modules=("kv_b_proj",))),
    "glm4_moe_lite": (AdapterSpec("r8_attn", r=8, lora_alpha=16, seed=1, target_modules=(
        "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),),
    # (the per-layer input projections outside the layers, which all-linear would adapt,
    # are not served, as Gemma 3n's AltUp ones)
    "gemma4": (AdapterSpec("r8_attn_mlp", r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=1),
               AdapterSpec("r4_qv", r=4, lora_alpha=8, target_modules=QV, seed=2)),
    "gemma4_moe": (AdapterSpec("r8_attn_mlp", r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                               seed=1),),
    "llama4": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=1),
               AdapterSpec("r4_shared_expert", r=4, lora_alpha=8, seed=2,
                           target_modules=r".*shared_expert\.(gate_proj|up_proj|down_proj)")),
    **{arch: (AdapterSpec("r8_all_linear", r=8, lora_alpha=16, target_modules="all-linear",
                          seed=1),)
       for arch in ("olmo2", "cohere2", "glm4", "granite", "smollm3", "starcoder2", "stablelm",
                    "falcon", "falcon_mqa", "nemotron", "ergo")},
    "phimoe": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=1),),
    # (PEFT's target names: c_attn, the attention's c_proj, c_fc and the MLP's c_proj)
    "gpt2": (AdapterSpec("r8_all_linear", r=8, lora_alpha=16, target_modules="all-linear", seed=1),
             AdapterSpec("r4_attn", r=4, lora_alpha=8, target_modules=r".*attn\.(c_attn|c_proj)",
                         seed=2),
             AdapterSpec("r16_mlp_rslora", r=16, lora_alpha=16, target_modules=("c_fc",),
                         use_rslora=True, seed=3)),
    # attention and the router, whose weight's dtype the model reads
    "hunyuan_moe": (AdapterSpec("r8_attn_router", r=8, lora_alpha=16, seed=1,
                                target_modules=ATTN + ("wg",)),),
    # (its AltUp projections outside the layers, which all-linear would adapt, are not
    # served: an adapter of them is refused)
    "gemma3n": (AdapterSpec("r8_attn_mlp", r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=1),),
    "qwen3_moe": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=1),),
    "gptj": (AdapterSpec("r8_all_linear", r=8, lora_alpha=16, target_modules="all-linear", seed=1),
             AdapterSpec("r4_qv", r=4, lora_alpha=8, target_modules=QV, seed=2)),
    "llama4_chunked": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=1),),
    # attention only: its experts are raw parameters (see the note on Mixtral above)
    "gpt_oss": (AdapterSpec("r8_attn", r=8, lora_alpha=16, target_modules=ATTN, seed=1),
                AdapterSpec("r2_qv", r=2, lora_alpha=16, target_modules=QV, seed=2),
                AdapterSpec("r32_kv_rslora", r=32, lora_alpha=8, target_modules=("k_proj", "v_proj"),
                            use_rslora=True, seed=3)),
    "qwen3_next": (AdapterSpec("r8_linear_attn", r=8, lora_alpha=16,
                               target_modules=("in_proj_qkvz", "in_proj_ba", "out_proj"), seed=1),
                   AdapterSpec("r16_attn", r=16, lora_alpha=16, target_modules=ATTN, seed=2)),
    # every linear of the multimodal model (the vision encoder's too) as PEFT names them
    # there: model.language_model.<...>, model.visual.<...>
    "qwen3_5_vision": (AdapterSpec("r8_all_linear", r=8, lora_alpha=16, target_modules="all-linear",
                                   seed=1),),
    "mistral3_vision": (AdapterSpec("r8_all_linear", r=8, lora_alpha=16,
                                    target_modules="all-linear", seed=1),),
    # the language model's linears only, and every linear: the vision tower's too
    "gemma3_vision": (AdapterSpec("r8_text_qv", r=8, lora_alpha=16,
                                  target_modules=r".*language_model.*\.(q_proj|v_proj)", seed=1),
                      AdapterSpec("r4_all_linear", r=4, lora_alpha=8, target_modules="all-linear",
                                  seed=2)),
}


@torch.no_grad()
def _rescale_lora(peft_model, adapter_name: str, delta_ratio: float) -> None:
    """Scale A and B of every LoRA pair so ||scaling * B @ A|| = delta_ratio * ||W||."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        a = module.lora_A[adapter_name].weight  # [r, in]
        b = module.lora_B[adapter_name].weight  # [out, r]
        scaling = module.scaling[adapter_name]
        delta_norm = (scaling * b @ a).norm()
        base_norm = module.get_base_layer().weight.norm()
        factor = math.sqrt(delta_ratio * base_norm / delta_norm)
        a.mul_(factor)
        b.mul_(factor)


def model_class(base_dir: str | Path) -> type:
    """The class the checkpoint was saved from (its config's architectures), so adapters
    are trained, and references run, on the model as saved (a multimodal one whole)."""
    import transformers

    arch = json.loads((Path(base_dir) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


def build_adapters(base_dir: str | Path, root_dir: str | Path,
                   specs: tuple[AdapterSpec, ...] | list[AdapterSpec] = ADAPTER_SPECS) -> dict[str, Path]:
    """Write one PEFT adapter folder per spec under root_dir/<spec.name>; return name -> path."""
    from peft import get_peft_model

    root_dir = Path(root_dir)
    base = model_class(base_dir).from_pretrained(base_dir, dtype=torch.float32)
    paths = {}
    for spec in specs:
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(copy.deepcopy(base), spec.lora_config())
        _rescale_lora(peft_model, "default", spec.delta_ratio)
        path = root_dir / spec.name
        peft_model.save_pretrained(path, safe_serialization=True)
        paths[spec.name] = path
    return paths


def make_prompts(n: int = 24, min_len: int = 3, max_len: int = 40, seed: int = 0) -> list[list[int]]:
    """n prompts of text ids (no special tokens), lengths spread over [min_len, max_len].

    The first two are exactly min_len and max_len long, so both ends are always covered
    (n = 1 gives one of min_len).
    """
    gen = torch.Generator().manual_seed(seed)
    random = torch.randint(min_len, max_len + 1, (max(n - 2, 0),), generator=gen).tolist()
    lengths = [min_len, max_len] + random
    return [torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (length,), generator=gen).tolist() for length in lengths[:n]]
