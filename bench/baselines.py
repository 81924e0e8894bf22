"""Speed baselines for loraplex: static batching with HF transformers and HF PEFT.

(a) peft_static_batch: all N adapters loaded in one PeftModel; requests go in arrival order
    in static batches of `batch_size`, each batch one left-padded
    `generate(..., adapter_names=[...])` (PEFT's mixed-adapter batching).
(b) hf_static_batch: plain transformers `generate`, no adapters, same batching.

Static batching runs each batch until its longest request is done, so with varied
output lengths the short requests' slots idle; only useful tokens are counted (each
request's own max_new_tokens), which is what a continuous-batching engine is compared on.
EOS never stops generation (the models are random; every request makes exactly its
max_new_tokens tokens in the count). The base is loaded as loraplex loads it: the same
bitsandbytes quantization, dtype and device (loraplex.model.loader).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from bench.workload import BenchRequest
from loraplex.model.loader import load_hf_model as load_like_loraplex
from loraplex.model.loader import resolve_device, resolve_dtype

PAD_ID = 0


def load_hf_model(base_dir: str | Path, quantize: str = "none", dtype: str = "auto",
                  device: str = "auto") -> torch.nn.Module:
    """The base model for baseline (b), eval, EOS cleared so generate never stops early."""
    dev = resolve_device(device)
    model = load_like_loraplex(str(base_dir), quantize, resolve_dtype(dtype, dev), dev).eval()
    model.generation_config.eos_token_id = None
    return model


def load_peft_model(base_dir: str | Path, adapter_dirs: dict[str, Path],
                    **base_options) -> torch.nn.Module:
    """Baseline (a)'s model: one PeftModel holding every adapter under its own name, on the
    base `load_hf_model(base_dir, **base_options)` gives."""
    from peft import PeftModel

    names = list(adapter_dirs)
    # the adapters stay in the files' dtype (the model's): PEFT's default upcasts bf16
    # adapters to fp32, which would slow the baseline on a GPU
    model = PeftModel.from_pretrained(load_hf_model(base_dir, **base_options),
                                      adapter_dirs[names[0]], adapter_name=names[0],
                                      autocast_adapter_dtype=False)
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name, autocast_adapter_dtype=False)
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
    seconds, useful, outputs = 0.0, 0, []
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        input_ids, attention_mask = _left_pad([r.prompt_ids for r in batch])
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        longest = max(r.max_new_tokens for r in batch)  # the whole batch runs this long
        config = GenerationConfig(do_sample=False, max_new_tokens=longest, min_new_tokens=longest,
                                  eos_token_id=None, pad_token_id=PAD_ID, use_cache=True)
        kwargs = {}
        if with_adapters:
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in batch]
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=config, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        assert out.shape[1] == input_ids.shape[1] + longest
        useful += sum(r.max_new_tokens for r in batch)
        width = input_ids.shape[1]
        outputs += [out[i, width:width + r.max_new_tokens].tolist() for i, r in enumerate(batch)]
    return dict(tokens=useful, seconds=seconds, tok_per_s=useful / seconds, outputs=outputs)


def peft_static_batch(model, requests: list[BenchRequest], batch_size: int = 32) -> dict:
    """(a) HF PEFT mixed-adapter static batching. model: from load_peft_model."""
    return _static_batches(model, requests, batch_size, with_adapters=True)


def hf_static_batch(model, requests: list[BenchRequest], batch_size: int = 32) -> dict:
    """(b) plain transformers static batching, no adapter (requests' adapters are ignored)."""
    return _static_batches(model, requests, batch_size, with_adapters=False)


def warm_up(model, with_adapters: bool) -> None:
    """One tiny generate so lazy initialisation is not timed."""
    _static_batches(model, [BenchRequest([5, 6, 7, 8], 2, None)], 1, with_adapters)
