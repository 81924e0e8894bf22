"""oneDNN-packed CPU linears (loraplex.model.cpu_linear) and where the loader uses them."""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from loraplex.config import EngineConfig, ModelConfig
from loraplex.model.cpu_linear import PackedLinear, can_pack
from loraplex.model.loader import load_model


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_computes_the_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    packed = PackedLinear(linear)
    for x in (torch.randn(1, 7, 96), torch.randn(5, 96), torch.randn(1, 14, 96)[:, ::2]):
        with torch.inference_mode():
            expected = F.linear(x, linear.weight, linear.bias)
            got = packed(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


BF16_PACKS = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT


@pytest.mark.skipif(not BF16_PACKS, reason="oneDNN packs no bf16 weight on this CPU")
def test_packed_linear_bf16():
    linear = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x).float(), F.linear(x, linear.weight).float(),
                                   rtol=2e-2, atol=2e-2)


def test_only_plain_cpu_linears_are_packed():
    assert can_pack(nn.Linear(8, 8))
    assert not can_pack(nn.Linear(8, 8).half())  # oneDNN packs fp32 and bf16 only
    assert can_pack(nn.Linear(8, 8).to(torch.bfloat16)) == BF16_PACKS  # bf16: where it can
    assert not can_pack(bnb.nn.Linear4bit(8, 8))
    assert not can_pack(nn.Conv1d(8, 8, 1))


def test_a_bf16_cpu_model_is_served_on_any_cpu(tiny_models, adapter_root):
    """bf16 linears are packed only where oneDNN can (on an AVX2-only CPU packing them
    raised, and the load with it); served, the model's log-probabilities are HF's in bf16."""
    from engine_helpers import greedy, run_all
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import GenerationRequest

    engine = Engine.build(ModelConfig(path=str(tiny_models["llama"]), dtype="bfloat16"),
                          EngineConfig(max_gpu_adapters=2, max_lora_rank=16,
                                       kv_cache_memory=4 * 2**20, block_size=8),
                          str(adapter_root))
    bases = {type(layer.base_layer) for layer in engine.loaded.lora_layers.values()}
    assert bases == ({PackedLinear} if BF16_PACKS else {nn.Linear})
    engine.start()
    prompt = list(range(4, 20))
    try:
        out, = run_all(engine, [GenerationRequest(prompt, greedy(6, logprobs=True))])
    finally:
        engine.stop()
    assert len(out.token_ids) == 6
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + list(out.token_ids)])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(  # [6]
        1, torch.tensor(out.token_ids)[:, None])[:, 0]
    served = torch.tensor([lp.logprob for lp in out.logprobs])  # [6]
    torch.testing.assert_close(served, expected, rtol=0, atol=0.1)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_loader_packs_the_plain_linears_of_a_cpu_model(tiny_models, quantize):
    loaded = load_model(ModelConfig(path=str(tiny_models["llama"]), quantize=quantize),
                        max_slots=2, max_rank=8)
    bases = {type(layer.base_layer) for layer in loaded.lora_layers.values()}
    assert bases == ({PackedLinear} if quantize == "none" else {bnb.nn.Linear4bit})
    assert isinstance(loaded.model.get_output_embeddings(), PackedLinear)  # never quantized
    assert loaded.vocab_size == 256


def test_a_head_tied_to_the_embeddings_is_not_packed(tmp_path):
    from models import build_base

    base = build_base("llama", tmp_path / "tied", tie_word_embeddings=True)
    loaded = load_model(ModelConfig(path=str(base)), max_slots=1, max_rank=4)
    head = loaded.model.get_output_embeddings()
    assert type(head) is nn.Linear  # packing it would hold a second copy of the embeddings
    assert head.weight is loaded.model.get_input_embeddings().weight
    assert all(isinstance(layer.base_layer, PackedLinear) for layer in loaded.lora_layers.values())


def test_nf4_linears_with_inputs_off_the_blocksize_are_served(tmp_path, adapter_root):
    """bitsandbytes repacks a Linear4bit for its AVX512-BF16 CPU kernel at the first eval
    forward, and fails for in_features not a multiple of 64 (here down_proj, 96 inputs):
    the loader keeps such layers on bnb's generic path, and the engine serves the model as
    HF does with that same choice."""
    from bitsandbytes.functional import has_avx512bf16

    from engine_helpers import build_engine, greedy, run_all
    from loraplex.engine.request import GenerationRequest
    from loraplex.model.loader import _keep_unpackable_4bit_unpacked
    from transformers import AutoModelForCausalLM

    from models import build_base
    from peft_reference import quantization_config

    def load_hf():  # (not peft_reference.load_base, which keeps such layers unpacked too)
        return AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quantization_config("nf4"), device_map="cpu").eval()

    base = build_base("llama", tmp_path / "odd", intermediate_size=96)
    prompt = list(range(4, 20))
    hf = load_hf()
    if has_avx512bf16():  # the failure this works around, where bnb takes that path
        with pytest.raises(RuntimeError, match="invalid for input"), torch.no_grad():
            hf(torch.tensor([prompt]))
        hf = load_hf()
    _keep_unpackable_4bit_unpacked(hf)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          min_new_tokens=8)[0, len(prompt):].tolist()
    engine = build_engine(base, adapter_root, quantize="nf4")
    try:
        out, = run_all(engine, [GenerationRequest(prompt, greedy(8))])
    finally:
        engine.stop()
    assert list(out.token_ids) == ref


def test_a_model_folder_of_pickled_weights_is_refused(tmp_path, monkeypatch):
    """Only safetensors are read: a folder holding pytorch_model.bin fails the load
    without unpickling it (a ValueError, so `loraplex serve` exits 2 saying why)."""
    from models import build_base
    from safetensors.torch import load_file

    base = build_base("llama", tmp_path / "base")
    state = load_file(base / "model.safetensors")
    torch.save(state, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or {})
    with pytest.raises(ValueError, match="could not load .* no file named model.safetensors"):
        load_model(ModelConfig(path=str(base)), max_slots=1, max_rank=4)
    assert unpickled == []
