"""Adapter merging and export checked against PEFT on a tiny random Llama.

For every combination type the merged tensors are compared with those of
PEFT's ``add_weighted_adapter`` on the same adapters; the saved folder is
loaded back into PEFT and must give PEFT's logits and greedy tokens. The export
is loaded by plain transformers and compared with the unmerged PeftModel.
"""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loraplex.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument
from loraplex.lora.merge import (
    COMBINATION_TYPES,
    Checkpoint,
    LoraTensors,
    export_merged_model,
    merge_adapters,
    merge_into_base,
    save_peft_folder,
)

PREFIX = "base_model.model."
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8]])
SEED = 1234

# name -> (r, alpha, target modules); a1/a2 share a rank, a3 does not.
ADAPTERS = {
    "a1": (4, 8, ["q_proj", "v_proj"]),
    "a2": (4, 16, ALL),
    "a3": (8, 4, ["q_proj", "v_proj", "down_proj"]),
}

# combination type -> (sources, weights, extra kwargs)
EQUAL = ["a1", "a2"]
MIXED = ["a1", "a2", "a3"]
CASES = {
    "linear": (EQUAL, [0.7, -0.4], {}),
    "cat": (MIXED, [0.7, -0.4, 1.3], {}),
    "svd": (MIXED, [0.7, -0.4, 1.3], {}),
    "ties": (EQUAL, [0.7, 0.9], {"density": 0.5}),
    "ties_svd": (MIXED, [0.7, 0.9, 0.5], {"density": 0.6, "majority_sign_method": "frequency", "svd_rank": 6}),
    "dare_linear": (EQUAL, [0.7, -0.4], {"density": 0.5}),
    "dare_ties": (EQUAL, [0.7, 0.9], {"density": 0.7}),
    "dare_linear_svd": (MIXED, [0.7, -0.4, 1.3], {"density": 0.5}),
    "dare_ties_svd": (MIXED, [0.7, 0.9, 0.5], {"density": 0.5, "svd_clamp": 0.95}),
    "magnitude_prune": (EQUAL, [0.7, -0.4], {"density": 0.3}),
    "magnitude_prune_svd": (MIXED, [0.7, -0.4, 1.3], {"density": 0.3, "svd_rank": 3}),
}
assert set(CASES) == set(COMBINATION_TYPES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny SVDs on 2 busy cores: OpenMP threads spin-wait for each other and a
    [128, 64] SVD takes ~0.3 s instead of ~2 ms. One thread for this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return str(path)


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft_model(model_dir):
    model = None
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        if model is None:
            model = get_peft_model(_base(model_dir), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.eval()


def module_order(model):
    return [k.removeprefix(PREFIX) for k, _ in model.named_modules()]


def tensors_of(model, adapter) -> LoraTensors:
    """The adapter as LoraTensors, modules in the model's order."""
    cfg = model.peft_config[adapter]
    modules, scalings = {}, {}
    for key, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            name = key.removeprefix(PREFIX)
            modules[name] = (mod.lora_A[adapter].weight.detach().clone(), mod.lora_B[adapter].weight.detach().clone())
            scalings[name] = mod.scaling[adapter]
    return LoraTensors(r=cfg.r, alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora,
                       target_modules=tuple(sorted(cfg.target_modules)), modules=modules, scalings=scalings)


def peft_merge(model, monkeypatch, sources, weights, name, ctype, **kw):
    """PEFT's add_weighted_adapter, with the global RNG seeded right where its merge
    loop starts (after the new adapter's layers are created, which draws random numbers)."""
    inject = model.base_model.inject_adapter

    def seeded(*a, **k):
        out = inject(*a, **k)
        torch.manual_seed(SEED)
        return out

    monkeypatch.setattr(model.base_model, "inject_adapter", seeded)
    model.add_weighted_adapter(sources, weights, name, combination_type=ctype, **kw)
    monkeypatch.undo()


@torch.no_grad()
def run(model, adapter=None):
    if adapter is not None:
        model.set_adapter(adapter)
    logits = model(PROMPT).logits
    tokens = model.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("ctype", COMBINATION_TYPES)
def test_matches_peft(ctype, peft_model, model_dir, tmp_path, monkeypatch, capsys):
    sources, weights, kw = CASES[ctype]
    ours = merge_adapters([tensors_of(peft_model, s) for s in sources], weights, ctype,
                          seed=SEED, module_order=module_order(peft_model), **kw)
    peft_merge(peft_model, monkeypatch, sources, weights, f"peft_{ctype}", ctype, **kw)
    ref = tensors_of(peft_model, f"peft_{ctype}")

    assert ours.r == ref.r and ours.alpha == ref.alpha and ours.target_modules == ref.target_modules
    assert list(ours.modules) == list(ref.modules)
    worst = 0.0
    for name, (a, b) in ours.modules.items():
        ra, rb = ref.modules[name]
        assert a.shape == ra.shape and b.shape == rb.shape
        # SVD factors are sign-ambiguous in general, but the same torch.linalg.svd call on the
        # same delta is deterministic, so the factors themselves are compared for every type.
        diff = max((a - ra).abs().max().item(), (b - rb).abs().max().item())
        worst = max(worst, diff, (b @ a - rb @ ra).abs().max().item())
        assert ours.scalings[name] == ref.scalings[name] == 1.0
    assert worst <= 1e-5, f"{ctype}: max abs diff {worst}"
    with capsys.disabled():
        print(f"\n[merge] {ctype:20s} rank {ours.r:2d}  max abs diff vs PEFT {worst:.2e}")

    save_peft_folder(ours, str(tmp_path / ctype), model_dir)
    peft_model.load_adapter(str(tmp_path / ctype), adapter_name=f"ours_{ctype}")
    ref_logits, ref_tokens = run(peft_model, f"peft_{ctype}")
    our_logits, our_tokens = run(peft_model, f"ours_{ctype}")
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(our_tokens, ref_tokens)


def test_saved_folder_loads_standalone(peft_model, model_dir, tmp_path):
    merged = merge_adapters([tensors_of(peft_model, s) for s in MIXED], [0.5, 1.0, -0.5], "cat")
    save_peft_folder(merged, str(tmp_path / "cat"), model_dir)
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 16 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    fresh = PeftModel.from_pretrained(_base(model_dir), str(tmp_path / "cat")).eval()
    # cat is exact: the delta is the weighted sum of the sources' deltas
    with torch.no_grad():
        for key, mod in fresh.named_modules():
            if isinstance(mod, LoraLayer):
                want = sum(w * peft_model.get_submodule(key).get_delta_weight(s)
                           for s, w in zip(MIXED, [0.5, 1.0, -0.5])
                           if s in peft_model.get_submodule(key).lora_A)
                torch.testing.assert_close(mod.get_delta_weight("default"), want, atol=1e-6, rtol=0)


def test_rank_pattern_round_trip(peft_model, model_dir, tmp_path):
    """A source whose modules differ in rank/scaling is saved with rank/alpha patterns."""
    a3 = tensors_of(peft_model, "a3")
    q = "model.layers.0.self_attn.q_proj"
    modules = dict(a3.modules, **{q: (a3.modules[q][0][:2], a3.modules[q][1][:, :2])})
    odd = LoraTensors(a3.r, a3.alpha, False, a3.target_modules, modules, dict(a3.scalings, **{q: 3.0}))
    save_peft_folder(odd, str(tmp_path / "odd"), model_dir)
    loaded = PeftModel.from_pretrained(_base(model_dir), str(tmp_path / "odd")).eval()
    back = tensors_of(loaded, "default")
    assert back.scalings == odd.scalings
    for name, (a, b) in odd.modules.items():
        assert torch.equal(back.modules[name][0], a) and torch.equal(back.modules[name][1], b)


def test_single_source_is_linear_like_peft(peft_model, monkeypatch):
    ours = merge_adapters([tensors_of(peft_model, "a3")], [-0.6], "svd", svd_rank=2)
    peft_merge(peft_model, monkeypatch, ["a3"], [-0.6], "peft_single", "svd", svd_rank=2)
    ref = tensors_of(peft_model, "peft_single")
    assert ours.r == ref.r == 8
    for name, (a, b) in ours.modules.items():
        torch.testing.assert_close(a, ref.modules[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(b, ref.modules[name][1], atol=1e-6, rtol=0)


def test_dare_seed_is_reproducible_and_private(peft_model):
    srcs = [tensors_of(peft_model, s) for s in EQUAL]
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    one = merge_adapters(srcs, [1.0, 1.0], "dare_linear", density=0.5, seed=3)
    assert torch.equal(torch.rand(3), before)  # the global RNG was not touched
    two = merge_adapters(srcs, [1.0, 1.0], "dare_linear", density=0.5, seed=3)
    other = merge_adapters(srcs, [1.0, 1.0], "dare_linear", density=0.5, seed=4)
    name = next(iter(one.modules))
    assert torch.equal(one.modules[name][0], two.modules[name][0])
    assert not torch.equal(one.modules[name][0], other.modules[name][0])


def test_rslora_sources_are_folded_into_scaling_one(model_dir):
    torch.manual_seed(5)
    model = get_peft_model(_base(model_dir), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                         target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False))
    merged = merge_adapters([tensors_of(model, "default"), tensors_of(model, "b")], [1.0, 2.0], "cat")
    assert not merged.use_rslora and merged.alpha == merged.r == 6
    for key, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            a, b = merged.modules[key.removeprefix(PREFIX)]
            want = mod.get_delta_weight("default") + 2.0 * mod.get_delta_weight("b")
            torch.testing.assert_close(b @ a, want, atol=1e-6, rtol=0)


def test_progress_and_cancel(peft_model):
    srcs = [tensors_of(peft_model, s) for s in EQUAL]
    calls = []
    merge_adapters(srcs, [1.0, 1.0], "linear", progress=lambda d, t: calls.append((d, t)))
    n = len(srcs[1].modules)
    assert calls == [(i, n) for i in range(1, n + 1)]
    polls = []
    with pytest.raises(Cancelled):
        merge_adapters(srcs, [1.0, 1.0], "linear", should_stop=lambda: polls.append(1) or len(polls) > 3)


def _fake(r=4, shapes=None, name="model.layers.0.self_attn.q_proj"):
    out, inp = shapes or (64, 64)
    return LoraTensors(r, r, False, ("q_proj",), {name: (torch.randn(r, inp), torch.randn(out, r))}, {name: 1.0})


@pytest.mark.parametrize("call, error, words", [
    (lambda: merge_adapters([], [], "linear"), InvalidArgument, "at least one"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0], "linear"), InvalidArgument, "one weight per adapter"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "avg"), InvalidArgument, "dare_ties_svd"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "ties", density=0.0), InvalidArgument, "(0, 1]"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "ties", density=1.5), InvalidArgument, "(0, 1]"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "dare_linear"), InvalidArgument, "needs a density"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, float("nan")], "linear"), InvalidArgument, "finite"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "ties", density=0.5, majority_sign_method="max"),
     InvalidArgument, "frequency"),
    (lambda: merge_adapters([_fake(4), _fake(8)], [1.0, 1.0], "linear"), FailedPrecondition, "'cat'"),
    (lambda: merge_adapters([_fake(4), _fake(8)], [1.0, 1.0], "dare_ties", density=0.5), FailedPrecondition,
     "same rank"),
    (lambda: merge_adapters([_fake(), _fake(shapes=(64, 32))], [1.0, 1.0], "cat"), FailedPrecondition,
     "same base model"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "svd", svd_rank=0), InvalidArgument, "positive"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "svd", svd_rank=65), InvalidArgument, "svd_rank <= 64"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "svd", svd_clamp=1.5), InvalidArgument, "quantile"),
    (lambda: merge_adapters([_fake(), _fake()], [1.0, 1.0], "cat", module_order=["x"]), InvalidArgument,
     "module_order"),
    (lambda: merge_into_base({}, _fake()), FailedPrecondition, "no weight"),
    (lambda: merge_into_base({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}, _fake()),
     FailedPrecondition, "base weight is [32, 64]"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_merge_into_base_matches_merge_and_unload(peft_model, model_dir):
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    merged = merge_into_base(state, tensors_of(peft_model, "a2"))
    torch.manual_seed(101)  # a2's seed in the fixture
    ref = get_peft_model(_base(model_dir), LoraConfig(r=4, lora_alpha=16, target_modules=ALL))
    ref.load_state_dict({k.replace(".a2.", ".default."): v for k, v in peft_model.state_dict().items()
                         if ".a2." in k}, strict=False)
    ref_state = ref.merge_and_unload().state_dict()
    assert set(merged) == set(state)
    for k, v in merged.items():
        torch.testing.assert_close(v, ref_state[k], atol=1e-6, rtol=0)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           state["model.layers.0.self_attn.q_proj.weight"])


def test_export_matches_peft(peft_model, model_dir, tmp_path):
    adapter = merge_adapters([tensors_of(peft_model, s) for s in MIXED], [0.8, 0.5, 1.2], "cat")
    out = tmp_path / "exported"
    export_merged_model(model_dir, adapter, str(out), dtype=None)
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    save_peft_folder(adapter, str(tmp_path / "ad"), model_dir)
    ref = PeftModel.from_pretrained(_base(model_dir), str(tmp_path / "ad")).eval()
    our_logits, our_tokens = run(exported)
    ref_logits, ref_tokens = run(ref)
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(our_tokens, ref_tokens)

    bf16 = tmp_path / "bf16"
    export_merged_model(model_dir, adapter, str(bf16), dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(bf16 / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("prefix_dropped", [False, True])
def test_export_of_a_conv1d_model_matches_peft(prefix_dropped, tmp_path, capsys):
    """GPT-2's linears are transformers Conv1D, weight [in, out], and its attn.c_proj is
    square, so no shape tells the layout: `loraplex export` merges each delta in transposed
    (as PEFT's fan_in_fan_out), and the exported model gives the logits and tokens of PEFT
    with the adapter unmerged; merge_into_base gives merge_and_unload's weights. The
    original GPT-2 checkpoint's keys leave the model's "transformer." out
    (`h.0.attn.c_attn.weight`), which transformers loads as well: so does export, and the
    export keeps its keys."""
    from loraplex.cli import main
    from models import FAMILY_SPECS, build_adapters, build_base

    base = build_base("gpt2", tmp_path / "gpt2")
    state = load_file(str(base / "model.safetensors"))
    if prefix_dropped:
        save_file({k.removeprefix("transformer."): v for k, v in state.items()},
                  str(base / "model.safetensors"), metadata={"format": "pt"})
    spec = FAMILY_SPECS["gpt2"][0]  # every linear: c_attn, attn.c_proj, c_fc, mlp.c_proj
    adapter_dir = build_adapters(base, tmp_path / "adapters", (spec,))[spec.name]
    checkpoint = Checkpoint.read(str(base))
    assert checkpoint.conv1d == {f"transformer.h.{i}.{m}" for i in range(2)
                                 for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert checkpoint.dropped_prefix == ("transformer." if prefix_dropped else "")
    assert checkpoint.weight_key("transformer.h.1.mlp.c_fc") == (
        "h.1.mlp.c_fc.weight" if prefix_dropped else "transformer.h.1.mlp.c_fc.weight")
    rc = main(["export", "--model", str(base), "--adapter-root", str(tmp_path / "adapters"),
               "--adapter", spec.name, "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    exported = _base(str(tmp_path / "out"))
    ref = PeftModel.from_pretrained(_base(str(base)), str(adapter_dir)).eval()
    our_logits, our_tokens = run(exported)
    ref_logits, ref_tokens = run(ref)
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(our_tokens, ref_tokens)
    assert (set(load_file(str(tmp_path / "out" / "model.safetensors")))
            == set(load_file(str(base / "model.safetensors"))))

    merged = merge_into_base(state, tensors_of(ref, "default"), checkpoint.conv1d)
    ref_state = ref.merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(v, ref_state[k], atol=1e-6, rtol=0)
    square = "transformer.h.0.attn.c_proj.weight"
    assert not torch.equal(merged[square], state[square])


def test_export_sharded_and_refusals(peft_model, model_dir, tmp_path):
    adapter = tensors_of(peft_model, "a1")
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((open(os.path.join(model_dir, "config.json")).read()))
    keys = sorted(state)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, ks in parts.items():
        save_file({k: state[k] for k in ks}, str(sharded / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, ks in parts.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    export_merged_model(str(sharded), adapter, str(tmp_path / "out"))
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    want = merge_into_base(state, adapter)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0)

    with pytest.raises(AlreadyExists):
        export_merged_model(model_dir, adapter, str(tmp_path / "out"))
    empty = tmp_path / "nobin"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FailedPrecondition, match="safetensors"):
        export_merged_model(str(empty), adapter, str(tmp_path / "x"))
    (empty / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    with pytest.raises(FailedPrecondition, match="unquantized"):
        export_merged_model(str(empty), adapter, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    wrong = LoraTensors(4, 4, False, ("q_proj",), {"model.layers.0.self_attn.q_proj": (torch.zeros(4, 32),
                        torch.zeros(64, 4))}, {"model.layers.0.self_attn.q_proj": 1.0})
    with pytest.raises(FailedPrecondition, match="expects"):
        export_merged_model(model_dir, wrong, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".export")]
