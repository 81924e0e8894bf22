"""Load a Hugging Face causal LM, quantize its base with bitsandbytes, wrap its linears.

The model keeps its own architecture code. We swap modules: every linear inside
the decoder layers becomes a `LoraLinear` over a slot pool, and attention uses
our paged KV cache (`loraplex_paged`). The base weights never change while serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoTokenizer, BitsAndBytesConfig)
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING)
from transformers.pytorch_utils import Conv1D

from loraplex import hugepages
from loraplex.config import ModelConfig
from loraplex.lora.layer import LoraLinear, pool_size
from loraplex.lora.ops import LoraPlan
from loraplex.model.cpu_linear import PackedLinear, can_pack
from loraplex.model.attention import (ATTENTION_NAME, KVShape, LayerProbe, attention_step,
                                       register_attention)
from loraplex.model.latent_attention import patch_latent_attention
from loraplex.model.linear_attention import patch_linear_attention

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # compute dtype of activations and KV cache
    lora_dtype: torch.dtype  # of the adapters' weights in their slots
    lora_layers: dict[str, LoraLinear]  # served module name -> wrapped layer
    # the decoder layers that attend (hold keys and values): the shape of what each caches,
    # as its attention was passed it (probe_attention)
    kv_shapes: dict[int, KVShape]
    values_in_keys: frozenset[int]  # layers whose values are their keys' first (KVCache)
    linear_attention: dict[int, nn.Module]  # the others: linear_attention's patched layers
    # linears of a multimodal model's other towers (vision, audio), which text requests
    # never run: an adapter's LoRA on them changes no served output
    off_text_linears: frozenset[str]
    lora_plan: LoraPlan  # filled by the runner each step, read by every LoraLinear
    max_model_len: int
    num_layers: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    name: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def quantization_config(quantize: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantize in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_hf_model(path: str, quantize: str, dtype: torch.dtype, device: torch.device,
                  **kwargs) -> nn.Module:
    """The Hugging Face model at `path` in `dtype` on `device`, its linears quantized by
    bitsandbytes as `quantize` says (the benchmark's baselines load theirs with this too)."""
    quant = quantization_config(quantize, dtype)
    try:
        # straight to `device` (no round trip of a 16 GB bf16 model through host memory)
        model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(  # safetensors only: never a pickle
            path, dtype=dtype, quantization_config=quant, use_safetensors=True,
            device_map={"": device}, **kwargs)
    except (OSError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        # (a folder without its files, or model code that cannot take loraplex's attention:
        # GIT's looks its attention up in a table of its own)
        raise ValueError(f"transformers could not load {path} ({type(exc).__name__}: "
                         f"{str(exc)[:300]})") from exc
    if quant is not None and device.type == "cpu":
        _keep_unpackable_4bit_unpacked(model)
    return model


_BNB_CPU_BLOCK_N = 32  # (bitsandbytes.functional._convert_weight_packed_for_cpu's block_n)


def model_class(config) -> type:
    """AutoModelForCausalLM, or for an image-text-to-text model it does not take (Mistral
    Small 3.1's Mistral3, LLaVA), AutoModelForImageTextToText: served for text, the
    language model's logits are the same."""
    kind = type(config)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING and kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _keep_unpackable_4bit_unpacked(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit for its bf16 kernel at
    the first eval forward, and that repacking fails when in_features is not a multiple of
    the quantization blocksize (64; a RuntimeError from a reshape: e.g. a down_proj of 1376
    inputs) or out_features not one of its 32-row blocks (an AssertionError: e.g. Qwen3.5's
    in_proj_b of one output per value head, 48 in its 27B). Such layers stay on bnb's
    generic dequantize-and-matmul path."""
    import bitsandbytes as bnb

    kept = 0
    for module in model.modules():
        if (isinstance(module, bnb.nn.Linear4bit)
                and (module.in_features % module.weight.quant_state.blocksize
                     or module.out_features % _BNB_CPU_BLOCK_N)
                and getattr(module, "support_avx512bf16_for_cpu", False)):
            module.support_avx512bf16_for_cpu = False
            kept += 1
    if kept:
        log.info("%d 4-bit linears have in_features that are not a multiple of the "
                 "blocksize or out_features not of %d: bitsandbytes' packed CPU kernel is not "
                 "used for them", kept, _BNB_CPU_BLOCK_N)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a plain or bitsandbytes linear, or of a transformers Conv1D (GPT-2's
    linear, its weight [in, out]; quantized, bitsandbytes holds it as a linear), None for
    anything else."""
    if isinstance(module, nn.Linear):  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return None


def load_model(cfg: ModelConfig, max_slots: int, max_rank: int,
               lora_dtype: str = "auto") -> LoadedModel:
    """Load `cfg.path` and wrap every decoder linear with `max_slots` adapter slots
    (plus the zero slot) of rank up to `max_rank`, holding weights in `lora_dtype`
    ("auto": the model's dtype)."""
    register_attention()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pool_dtype = dtype if lora_dtype == "auto" else _DTYPES[lora_dtype]
    model = load_hf_model(cfg.path, cfg.quantize, dtype, device,
                          attn_implementation=ATTENTION_NAME)
    model.eval().requires_grad_(False)
    text_config = model.config.get_text_config()
    linear = patch_linear_attention(model)
    latent = patch_latent_attention(model, dtype)
    if latent:
        log.info("%d latent-attention layers cache their latent (latent_attention.py)",
                 len(latent))
    probe = probe_attention(model, text_config)
    kv_shapes = {i: probe.shapes[i] for i in sorted(probe.layers - linear.keys())}
    tokenizer = AutoTokenizer.from_pretrained(cfg.path)

    lora_plan = LoraPlan()
    vocab_size = model.get_output_embeddings().weight.shape[0]
    lora_layers = wrap_linears(model, max_slots + 1, max_rank, dtype, device, lora_plan,
                               pool_dtype)
    off_text = off_text_linears(model)
    pack_cpu_linears(model, lora_layers)
    check_wrapped(model, text_config, lora_plan, max_slots + 1)
    max_len = text_config.max_position_embeddings
    if cfg.max_model_len:
        max_len = min(max_len, cfg.max_model_len)
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype, lora_dtype=pool_dtype,
        lora_layers=lora_layers, off_text_linears=off_text, kv_shapes=kv_shapes,
        values_in_keys=latent,
        linear_attention=linear,
        lora_plan=lora_plan, max_model_len=max_len,
        num_layers=text_config.num_hidden_layers,
        vocab_size=vocab_size,
        eos_token_ids=_eos_ids(model, tokenizer), name=cfg.path)


def wrap_linears(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, lora_plan: LoraPlan,
                 lora_dtype: torch.dtype | None = None) -> dict[str, LoraLinear]:
    """Replace every linear inside the text decoder's layers (the list of them under
    model.get_decoder(): of a multimodal model, its language model's) by a LoraLinear;
    returns them by name."""
    output_layer = model.get_output_embeddings()
    layers = _decoder_layers(model)
    targets = [(name, module) for name, module in model.named_modules()
               if _linear_shape(module) and module is not output_layer
               and name.startswith(f"{layers}.")]
    sizes = [pool_size(num_slots, max_rank, *_linear_shape(module)) for _, module in targets]
    storage = None
    if device.type == "cpu":  # every layer's pool in one buffer on huge pages (hugepages.py)
        storage = hugepages.zeros(sum(sizes), lora_dtype or dtype).split(sizes)
    wrapped = {}
    for i, (name, module) in enumerate(targets):
        in_f, out_f = _linear_shape(module)
        parent_name, _, child = name.rpartition(".")
        layer = LoraLinear(module, in_f, out_f, num_slots, max_rank, dtype, device, lora_plan,
                           lora_dtype, storage[i] if storage else None)
        setattr(model.get_submodule(parent_name), child, layer)
        wrapped[name] = layer
    if not wrapped:
        raise ValueError("found no linear layers inside the model's decoder layers to apply LoRA to")
    log.info("wrapped %d linear layers with %d LoRA slots of rank <= %d", len(wrapped), num_slots,
             max_rank)
    return wrapped


_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention",
                                    "linear_attention"})


def probe_attention(model: nn.Module, text_config) -> LayerProbe:
    """The decoder layers that reach loraplex's attention, paged or linear
    (linear_attention.py), and the shapes of the keys and values the paged ones cache.
    ValueError for a model with other layers: state-space or convolution layers (Jamba's
    and Falcon-H1's Mamba, LFM2's short convolutions) carry a recurrent state nothing here
    keeps, so the packed batch would run through them as one sequence and every answer
    would be wrong. One forward pass of one token (before any wrapping) finds them, and
    any attention option not implemented (paged_attention refuses it)."""
    if getattr(text_config, "alibi", False):  # (Falcon-RW's: HF adds them to the mask)
        raise ValueError(f"{text_config.model_type}: ALiBi position biases are not implemented "
                         "by loraplex's attention")
    probe = _probe_forward(model, text_config, "through loraplex's attention",
                           "its attention is not one loraplex implements")
    types = getattr(text_config, "layer_types", None) or []
    # a kind of layer whose attention lives in HF's mask alone, which this attention does not
    # read (it builds its own masks, for the kinds above)
    unknown = sorted({types[i] for i in probe.layers if i < len(types)} - _ATTENTION_LAYER_TYPES)
    if unknown:
        raise ValueError(f"{text_config.model_type}: layers of type {', '.join(unknown)} are "
                         "not implemented by loraplex's attention (full_attention, "
                         "sliding_attention, chunked_attention and linear_attention are)")
    if not probe.layers:
        raise ValueError(f"{text_config.model_type}: none of its decoder layers calls "
                         "transformers' attention functions (their attention, or recurrence, is "
                         "the model's own code, as Bloom's or RWKV's), which loraplex's "
                         "attention replaces: it cannot be served")
    missing = sorted(set(range(text_config.num_hidden_layers)) - probe.layers)
    if missing:
        kinds = sorted({types[i] for i in missing}) if types else ["not attention"]
        raise ValueError(
            f"{text_config.model_type}: {len(missing)} of {text_config.num_hidden_layers} "
            f"decoder layers ({', '.join(kinds)}) do not attend through attention; loraplex's "
            "paged KV cache serves attention layers (and Qwen3.5's and Qwen3-Next's Gated "
            "DeltaNet) only, so other recurrent hybrids are refused rather than served wrong")
    return probe


def _probe_forward(model: nn.Module, text_config, through: str, cause: str) -> LayerProbe:
    """One forward pass of one token with a LayerProbe for attention; ValueError, naming
    `cause`, for any failure (a refusal of paged_attention's as it is)."""
    window = getattr(text_config, "sliding_window", None)
    if isinstance(window, int) and window >= text_config.max_position_embeddings:
        window = None  # as long as the model's context, it never binds (Phi-3.5-MoE's)
    probe = LayerProbe(config_window=window)
    device = model.get_input_embeddings().weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
    try:
        with torch.inference_mode(), attention_step(probe):
            model(input_ids=token, position_ids=token, use_cache=False, logits_to_keep=1)
    except ValueError:  # (paged_attention's refusal of an option)
        raise
    except Exception as exc:  # noqa: BLE001  (any failure: this model cannot be served)
        raise ValueError(
            f"{text_config.model_type}: a one-token forward pass {through} failed "
            f"({type(exc).__name__}: {str(exc)[:200]}); {cause}") from exc
    return probe


def check_wrapped(model: nn.Module, text_config, lora_plan: LoraPlan, num_slots: int) -> None:
    """The probe's forward pass again, through the wrapped (and packed) linears with no
    adapter: ValueError where the model's own code fails on them (code that reads what a
    LoraLinear does not have), at load rather than at every step."""
    lora_plan.start_step(torch.zeros(1, dtype=torch.long), [0] * num_slots, None,
                         model.get_input_embeddings().weight.device)
    _probe_forward(model, text_config, "through loraplex's LoRA layers",
                   "the model's code uses its linear layers in a way loraplex's do not serve")


def _decoder_layers(model: nn.Module) -> str:
    """The name of the decoder's list of layers: model.layers, model.language_model.layers,
    GPT-J's transformer.h (the module list under model.get_decoder() that is as long as
    the text model has layers); "" when there is none."""
    decoder = _module_name(model, model.get_decoder())
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.get_decoder().named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return ".".join(filter(None, (decoder, name)))
    return ""


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def off_text_linears(model: nn.Module) -> frozenset[str]:
    """The linears under the text decoder's siblings (a multimodal model's vision or audio
    tower and projector: Gemma 3's model.vision_tower, model.multi_modal_projector), other
    than the embeddings and the output head; empty for a text-only model, whose decoder's
    only sibling is the head, or whose decoder is the model itself (Llama 4's text model)."""
    decoder = _module_name(model, model.get_decoder())
    if not decoder:
        return frozenset()
    parent = model.get_submodule(decoder.rpartition(".")[0])
    text = {id(model.get_decoder()), id(model.get_input_embeddings()),
            id(model.get_output_embeddings())}
    prefix = decoder.rpartition(".")[0]
    names = set()
    for child_name, child in parent.named_children():
        if id(child) in text:
            continue
        for name, module in child.named_modules():
            if _linear_shape(module):
                names.add(".".join(filter(None, (prefix, child_name, name))))
    return frozenset(names)


def pack_cpu_linears(model: nn.Module, lora_layers: dict[str, LoraLinear]) -> None:
    """On the CPU, the plain linears (the wrapped layers' bases and the output head) run
    from oneDNN-packed weights (loraplex.model.cpu_linear); quantized ones stay as they are.
    A head tied to the input embeddings stays too: packing would keep a second copy."""
    for layer in lora_layers.values():
        if can_pack(layer.base_layer):
            layer.base_layer = PackedLinear(layer.base_layer)
    head = model.get_output_embeddings()
    if can_pack(head) and head.weight is not model.get_input_embeddings().weight:
        model.set_output_embeddings(PackedLinear(head))


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)
