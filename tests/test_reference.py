"""Sanity checks of the fixtures and of the PEFT reference itself (not of the engine).

If these fail, an engine fidelity failure means nothing: the tiny models are too flat,
the adapters do nothing, or the reference is not what PEFT does.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import ADAPTER_SPECS, ARCHS, SMALL_SPEC_NAMES, logit_gap_stats
from peft_reference import _reference, peft_greedy

NEW_TOKENS = 8


def _first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first position where a and b differ (len(a) if none)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def test_fixture_layout(tiny_models, adapters, adapter_root):
    assert set(tiny_models) == set(ARCHS)
    assert set(adapters["llama"]) == {s.name for s in ADAPTER_SPECS}
    for arch in ARCHS:
        assert set(SMALL_SPEC_NAMES) <= set(adapters[arch]) <= {s.name for s in ADAPTER_SPECS}
        for name, path in adapters[arch].items():
            assert path == adapter_root / arch / name
            assert (path / "adapter_config.json").is_file()
            assert (path / "adapter_model.safetensors").is_file()
    config = json.loads((adapters["llama"]["pattern_all"] / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"q_proj": 2, "down_proj": 32}
    assert json.loads((adapters["llama"]["r16_all_rslora"] / "adapter_config.json").read_text())["use_rslora"]
    assert isinstance(json.loads((adapters["llama"]["regex_l1_q_down"] / "adapter_config.json").read_text())
                      ["target_modules"], str)


@pytest.mark.parametrize("arch", ARCHS)
def test_base_logits_not_flat(tiny_models, prompts, arch):
    """Greedy must not be knife-edge: a clear top-1 at most positions."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    stats = logit_gap_stats(model, prompts)
    print(arch, {k: round(v, 3) for k, v in stats.items()})
    assert stats["logit_std"] > 1.5
    assert stats["gap_median"] > 0.3
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.decode(tokenizer("Hello, world").input_ids) == "Hello, world"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_adapter_changes_outputs(tiny_models, adapters, prompts, arch):
    """Each adapter changes the greedy continuation of at least half the prompts (most
    adapters: nearly all), and no chosen logprob explodes."""
    base_dir = tiny_models[arch]
    sample = prompts[::3]  # 8 prompts keep this to a few seconds per arch
    base_out = [peft_greedy(base_dir, None, p, NEW_TOKENS)[0] for p in sample]
    # every spec on llama; one of each kind on the other families (time)
    names = [n for n in adapters[arch] if arch == "llama" or n in SMALL_SPEC_NAMES]
    changed_total = 0
    for name in names:
        path = adapters[arch][name]
        outs = [peft_greedy(base_dir, path, p, NEW_TOKENS) for p in sample]
        changed = sum(ids != b for (ids, _), b in zip(outs, base_out))
        first_changed = sum(ids[0] != b[0] for (ids, _), b in zip(outs, base_out))
        worst_logprob = min(min(lp) for _, lp in outs)
        print(f"{arch} {name}: {changed}/{len(sample)} continuations changed, "
              f"{first_changed} at the first token, worst chosen logprob {worst_logprob:.2f}")
        assert changed >= len(sample) // 2, name
        assert worst_logprob > -8.0, name
        changed_total += changed
    assert changed_total >= 0.8 * len(sample) * len(names)


# Measured on the tiny llama (18 sequences x 8 tokens, chosen-token |dlogprob| vs fp32 over
# the common prefix): int8 mean 0.044 max 0.19 (12/18 sequences identical); nf4 mean 0.32
# max 1.11 and fp4 mean 0.33 max 1.01 (1/18 identical). 4-bit on a 64-wide random model is
# that lossy; the engine is compared with the *quantized* reference, not with fp32.
@pytest.mark.parametrize("quantize,max_mean,max_max", [("int8", 0.15, 0.6), ("nf4", 0.8, 2.5), ("fp4", 0.8, 2.5)])
def test_quantized_reference_close_to_fp32(tiny_models, adapters, prompts, quantize, max_mean, max_max):
    """The quantized references run, and stay near fp32 up to the first differing token."""
    base_dir = tiny_models["llama"]
    diffs, same, total = [], 0, 0
    for adapter in (None, adapters["llama"]["r8_all"], adapters["llama"]["r16_mlp"]):
        for p in prompts[::4]:
            ids32, lp32 = peft_greedy(base_dir, adapter, p, NEW_TOKENS)
            idsq, lpq = peft_greedy(base_dir, adapter, p, NEW_TOKENS, quantize=quantize)
            n = _first_divergence(ids32, idsq)
            diffs += [abs(a - b) for a, b in zip(lp32[:n], lpq[:n])]
            same += ids32 == idsq
            total += 1
    diffs = torch.tensor(diffs)
    print(f"{quantize}: {same}/{total} sequences identical to fp32; chosen-token |dlogprob| over the "
          f"common prefix ({len(diffs)} tokens): mean {diffs.mean():.4f} max {diffs.max():.4f}")
    assert diffs.mean() < max_mean and diffs.max() < max_max
    assert diffs.mean() > 0  # it really ran quantized


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_mixed_batch_matches_single_requests(tiny_models, adapters, prompts, arch):
    """PEFT's own batched generate(adapter_names=...) with left padding agrees with the
    single-request reference: the batch-1 reference is what PEFT means."""
    base_dir = tiny_models[arch]
    choices = [None] + list(adapters[arch].values())
    assigned = [choices[i % len(choices)] for i in range(len(prompts))]
    batch_ids, batch_lps = _reference(base_dir.resolve(), "none").mixed_batch_greedy(assigned, prompts, NEW_TOKENS)
    mismatched, max_diff = [], 0.0
    for i, (p, a) in enumerate(zip(prompts, assigned)):
        ids, lps = peft_greedy(base_dir, a, p, NEW_TOKENS)
        if ids != batch_ids[i]:
            mismatched.append(i)
        n = _first_divergence(ids, batch_ids[i])
        max_diff = max([max_diff] + [abs(x - y) for x, y in zip(lps[:n], batch_lps[i][:n])])
    print(f"{arch}: mixed batch vs single: {len(prompts) - len(mismatched)}/{len(prompts)} identical, "
          f"max |dlogprob| {max_diff:.2e}, mismatched rows {mismatched}")
    assert not mismatched
    assert max_diff < 1e-4
