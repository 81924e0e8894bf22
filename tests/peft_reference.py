"""The correctness reference: HF PEFT, one adapter active, one request alone, greedy.

    ids, logprobs = peft_greedy(base_dir, adapter_dir, prompt_ids, max_new_tokens=16)
    ids, logprobs = peft_greedy(base_dir, None, prompt_ids, 16, quantize="nf4")  # base model

What "reference" means, precisely:
  * batch of 1 (no padding, no other requests), fp32 activations on the CPU;
  * greedy: argmax of the raw model logits at every step (no logits processors);
  * EOS is neither a stop nor suppressed: exactly max_new_tokens tokens come back
    (the engine's SamplingParams(ignore_eos=True) semantics);
  * logprobs[i] = log_softmax(raw logits at step i)[ids[i]].
  * quantize: "none" (fp32 weights), "nf4" / "fp4" (bnb Linear4bit, double quant,
    compute dtype fp32), "int8" (bnb Linear8bitLt, LLM.int8 with the default threshold).

Loaded models are cached per process (see `_reference`): the base is loaded once per
(base_dir, quantize) and every adapter asked for is loaded into the same PeftModel and
activated with set_adapter, so a test over 20 adapters loads the base once.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, GenerationConfig

from models import model_class

QUANTIZE_CHOICES = ("none", "nf4", "fp4", "int8")


def quantization_config(quantize: str) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig that the reference (and the engine, to match) loads the base with."""
    if quantize == "none":
        return None
    if quantize in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")


def load_base(base_dir: str | Path, quantize: str = "none",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base model exactly as the reference uses it (fp32 compute unless `dtype` says
    otherwise, eval mode, CPU), of the class it was saved from (a multimodal model whole,
    where the engine loads its text model)."""
    qconfig = quantization_config(quantize)
    kwargs = {"quantization_config": qconfig, "device_map": "cpu"} if qconfig else {}
    model = model_class(base_dir).from_pretrained(base_dir, dtype=dtype, **kwargs)
    for module in model.modules():  # bitsandbytes' packed CPU 4-bit kernel raises for a layer
        # whose height is not a multiple of 32 (Qwen3.5's in_proj_b / in_proj_a) or width not
        # one of the blocksize (a latent attention's kv_b_proj of 16 inputs): its generic one
        if getattr(module, "support_avx512bf16_for_cpu", False) and (
                module.out_features % 32
                or module.in_features % module.weight.quant_state.blocksize):
            module.support_avx512bf16_for_cpu = False
    # generate() fills an unset eos_token_id from the model's generation_config; clear it
    # there too, or generation would stop at EOS.
    model.generation_config.eos_token_id = None
    return model.eval()


def greedy_config(max_new_tokens: int, pad_token_id: int) -> GenerationConfig:
    """Greedy, exactly max_new_tokens tokens, EOS ignored (not suppressed), raw logits returned."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,  # a MinNewTokens processor would *suppress* EOS; we only ignore it
        eos_token_id=None,  # so generation never stops early
        pad_token_id=pad_token_id,
        bos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
    )


class PeftReference:
    """One base model (per quantization) with any number of adapters loaded by path."""

    def __init__(self, base_dir: str | Path, quantize: str = "none"):
        self.base_dir = Path(base_dir)
        self.quantize = quantize
        self.base = load_base(base_dir, quantize)
        self.model = None  # PeftModel once the first adapter is loaded
        self._names: dict[tuple, str] = {}  # (adapter dir, mtime, size) -> adapter name in self.model

    def adapter_name(self, adapter_dir: str | Path) -> str:
        """Load the adapter at adapter_dir (once) and return its name inside the PeftModel.

        Keyed by the folder and its weights file's mtime and size, so a folder rewritten
        in place (a swap test) is loaded again rather than served stale.
        """
        from peft import PeftModel

        adapter_dir = Path(adapter_dir).resolve()
        stat = (adapter_dir / "adapter_model.safetensors").stat()
        key = (adapter_dir, stat.st_mtime_ns, stat.st_size)
        if key not in self._names:
            name = f"a{len(self._names)}"  # PEFT adapter names cannot contain '.'
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name)
            else:
                self.model.load_adapter(adapter_dir, adapter_name=name)
            self.model.eval()
            self._names[key] = name
        return self._names[key]

    @torch.no_grad()
    def greedy(self, adapter_dir: str | Path | None, prompt_ids: list[int],
               max_new_tokens: int) -> tuple[list[int], list[float]]:
        with warnings.catch_warnings():
            # bnb int8 warns on every matmul that it casts fp32 inputs to fp16 (expected).
            warnings.filterwarnings("ignore", message="MatMul8bitLt")
            return self._greedy(adapter_dir, prompt_ids, max_new_tokens)

    def _greedy(self, adapter_dir, prompt_ids, max_new_tokens):
        input_ids = torch.tensor([prompt_ids])  # [1, prompt_len]
        config = greedy_config(max_new_tokens, pad_token_id=self.base.config.get_text_config().pad_token_id or 0)
        if adapter_dir is None:
            out = self._generate_base(input_ids, config)
        else:
            name = self.adapter_name(adapter_dir)  # loads it (and creates self.model) if new
            self.model.set_adapter(name)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=config)
        new_ids = out.sequences[0, input_ids.shape[1]:]  # [max_new_tokens]
        logits = torch.stack(out.logits, dim=1)[0].float()  # [max_new_tokens, vocab]
        logprobs = logits.log_softmax(-1).gather(-1, new_ids[:, None])[:, 0]  # [max_new_tokens]
        assert new_ids.shape[0] == max_new_tokens, "generation stopped early"
        return new_ids.tolist(), logprobs.tolist()

    @torch.no_grad()
    def prompt_logprobs(self, adapter_dir: str | Path | None, prompt_ids: list[int]) -> torch.Tensor:
        """[len(prompt_ids) - 1, vocab]: row i = log_softmax of the raw logits after prompt
        tokens 0..i, one forward pass of the prompt alone (it scores token i + 1)."""
        input_ids = torch.tensor([prompt_ids])  # [1, P]
        if adapter_dir is None:
            model = self.base if self.model is None else self.model
            context = (contextlib.nullcontext() if self.model is None
                       else self.model.disable_adapter())
        else:
            name = self.adapter_name(adapter_dir)  # loads it (and creates self.model) if new
            self.model.set_adapter(name)
            model, context = self.model, contextlib.nullcontext()
        with context:
            logits = model(input_ids=input_ids).logits[0].float()  # [P, vocab]
        return logits[:-1].log_softmax(-1)

    @torch.no_grad()
    def mixed_batch_greedy(self, adapter_dirs: list[str | Path | None], prompts: list[list[int]],
                           max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        """PEFT's own mixed-adapter batching: one left-padded generate() with adapter_names.

        Not the reference (padding and batching change the arithmetic a little); used to
        check that the single-request reference agrees with what PEFT does in a batch.
        """
        names = ["__base__" if d is None else self.adapter_name(d) for d in adapter_dirs]
        if self.model is None:
            raise ValueError("mixed_batch_greedy needs at least one adapter")
        pad = self.base.config.pad_token_id or 0
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # [batch, width]
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=names,
                                  generation_config=greedy_config(max_new_tokens, pad_token_id=pad))
        new_ids = out.sequences[:, width:]  # [batch, max_new_tokens]
        logits = torch.stack(out.logits, dim=1).float()  # [batch, max_new_tokens, vocab]
        logprobs = logits.log_softmax(-1).gather(-1, new_ids[..., None])[..., 0]  # [batch, max_new_tokens]
        return new_ids.tolist(), logprobs.tolist()

    def _generate_base(self, input_ids: torch.Tensor, config: GenerationConfig):
        """The base model alone: through the PeftModel with adapters disabled if one exists."""
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        if self.model is None:
            return self.base.generate(**kwargs)
        with self.model.disable_adapter():
            return self.model.generate(**kwargs)


@functools.cache
def _reference(base_dir: Path, quantize: str) -> PeftReference:
    """The per-process cache of loaded references, keyed by (resolved base dir, quantize)."""
    return PeftReference(base_dir, quantize)


def peft_prompt_logprobs(base_dir: str | Path, adapter_dir: str | Path | None,
                         prompt_ids: list[int], quantize: str = "none") -> torch.Tensor:
    """PEFT's log-probabilities over the prompt: [len(prompt_ids) - 1, vocab] (see
    PeftReference.prompt_logprobs)."""
    return _reference(Path(base_dir).resolve(), quantize).prompt_logprobs(adapter_dir,
                                                                          list(prompt_ids))


def peft_greedy(base_dir: str | Path, adapter_dir: str | Path | None, prompt_ids: list[int],
                max_new_tokens: int, quantize: str = "none") -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from HF PEFT for one request run alone (see module doc)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    ref = _reference(Path(base_dir).resolve(), quantize)
    return ref.greedy(adapter_dir, list(prompt_ids), max_new_tokens)
