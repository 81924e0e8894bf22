"""Adapter store: real PEFT folders in, exact served factors (or a clear refusal) out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key as peft_get_pattern_key
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from loraplex.lora.store import AdapterStore, AdapterWeights, get_pattern_key

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def module_shapes() -> dict[str, tuple[int, int]]:
    """Every linear of the tiny Llama except lm_head: name -> (in, out)."""
    model = tiny_llama()
    return {name: (mod.in_features, mod.out_features) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name != "lm_head"}


def make_adapter(folder: Path, seed: int = 1, **lora_kwargs):
    """Save a real PEFT adapter (non-zero B) into folder; return the PeftModel."""
    model = tiny_llama()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(str(folder))
    return peft_model


def peft_reference(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """served module name -> (lora_A weight, lora_B weight, scaling) read off PEFT's layers."""
    ref = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            ref[name.removeprefix(PREFIX)] = (mod.lora_A["default"].weight.detach(),
                                              mod.lora_B["default"].weight.detach(),
                                              mod.scaling["default"])
    return ref


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One plain adapter (r=4, alpha=8, q/v) to copy and break in the refusal tests."""
    folder = tmp_path_factory.mktemp("plain") / "plain"
    peft_model = make_adapter(folder, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return folder, peft_reference(peft_model)


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "adapters"
    path.mkdir()
    return path


def copy_plain(plain, root: Path, relpath: str = "a") -> Path:
    dest = root / relpath
    shutil.copytree(plain[0], dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def first_key(tensors: dict, factor: str) -> str:
    return sorted(k for k in tensors if f".{factor}." in k)[0]


# ---- exact factors against PEFT ------------------------------------------------

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ATTN),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                     alpha_pattern={"q_proj": 3, "model.layers.0.mlp.down_proj": 32}),
    "regex_target": dict(r=4, lora_alpha=4, target_modules=r".*\.layers\.1\..*(k_proj|up_proj)"),
    "attention_only": dict(r=2, lora_alpha=5, target_modules=ATTN),
    "mlp_only": dict(r=3, lora_alpha=7, target_modules=MLP),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_factors_match_peft(case, root, module_shapes):
    peft_model = make_adapter(root / case, **CASES[case])
    ref = peft_reference(peft_model)
    weights = AdapterStore(str(root), max_rank=16).read(case, case, module_shapes)

    assert set(weights.modules) == set(ref)
    for module, (ref_a, ref_b, scaling) in ref.items():
        a, b = weights.modules[module]
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous()
        assert a.shape == (ref_a.shape[0], module_shapes[module][0])  # [r, in]
        assert b.shape == (module_shapes[module][1], ref_a.shape[0])  # [out, r]
        assert torch.equal(a, ref_a)
        assert torch.equal(b, ref_b * scaling)
        assert float(b.abs().sum()) > 0
    assert weights.rank == max(a.shape[0] for a, _, _ in ref.values())
    assert weights.alpha == CASES[case]["lora_alpha"]
    assert weights.use_rslora == CASES[case].get("use_rslora", False)
    assert weights.target_modules == tuple(sorted({m.rsplit(".", 1)[1] for m in ref}))
    assert weights.size_bytes == 4 * sum(a.numel() + b.numel() for a, b, _ in ref.values())
    assert weights.path == str((root / case).resolve())
    assert weights.base_model == ""
    assert len(weights.version) == 12 and int(weights.version, 16) >= 0


def test_pattern_scalings_are_the_expected_numbers(root, module_shapes):
    peft_model = make_adapter(root / "p", **CASES["patterns"])
    ref = peft_reference(peft_model)
    weights = AdapterStore(str(root), max_rank=16).read("p", "p", module_shapes)
    expected = {  # (rank, scaling) worked out by hand from the patterns
        "model.layers.0.self_attn.q_proj": (4, 3 / 4),
        "model.layers.1.self_attn.q_proj": (2, 3 / 2),
        "model.layers.0.self_attn.v_proj": (4, 8 / 4),
        "model.layers.0.mlp.down_proj": (6, 32 / 6),
        "model.layers.1.mlp.down_proj": (6, 8 / 6),
    }
    for module, (rank, scaling) in expected.items():
        assert ref[module][2] == scaling
        assert weights.modules[module][0].shape[0] == rank
    assert weights.rank == 6
    assert weights.target_modules == ("down_proj", "q_proj", "v_proj")


def test_targets_reported_from_tensors_for_regex(root, module_shapes):
    make_adapter(root / "rx", **CASES["regex_target"])
    weights = AdapterStore(str(root), max_rank=16).read("rx", "rx", module_shapes)
    assert set(weights.modules) == {"model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj"}
    assert weights.target_modules == ("k_proj", "up_proj")


def test_served_delta_equals_peft_layer_output(plain, root, module_shapes):
    folder = copy_plain(plain, root)
    weights = AdapterStore(str(root), max_rank=8).read("a", "a", module_shapes)
    peft_model = make_adapter(root / "again", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert folder.exists()
    torch.manual_seed(3)
    x = torch.randn(5, 64)  # [tokens, hidden]
    with torch.no_grad():
        expected = layer(x) - layer.base_layer(x)  # [tokens, out]
    a, b = weights.modules["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(x @ a.T @ b.T, expected, rtol=1e-5, atol=1e-6)


def test_adapter_name_inside_keys_and_half_precision(plain, root, module_shapes):
    folder = copy_plain(plain, root)

    def rename_and_halve(tensors):
        for key in list(tensors):
            new = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight")
            tensors[new] = tensors.pop(key).to(torch.bfloat16)

    edit_tensors(folder, rename_and_halve)
    weights = AdapterStore(str(root), max_rank=8).read("a", "a", module_shapes)
    for module, (ref_a, ref_b, scaling) in plain[1].items():
        a, b = weights.modules[module]
        assert a.dtype == torch.float32
        assert torch.equal(a, ref_a.to(torch.bfloat16).float())
        assert torch.equal(b, ref_b.to(torch.bfloat16).float() * scaling)


def test_base_model_is_returned(plain, root, module_shapes):
    edit_config(copy_plain(plain, root), base_model_name_or_path="org/other-model")
    assert AdapterStore(str(root), 8).read("a", "a", module_shapes).base_model == "org/other-model"


def test_fan_in_fan_out_does_not_change_the_factors(plain, root, module_shapes):
    """PEFT's lora_A / lora_B have one layout whatever fan_in_fan_out says (true for GPT-2's
    Conv1D layers, where PEFT sets it itself): it is read as the file holds them."""
    edit_config(copy_plain(plain, root), fan_in_fan_out=True)
    weights = AdapterStore(str(root), 8).read("a", "a", module_shapes)
    a, b = weights.modules["model.layers.0.self_attn.q_proj"]
    ref_a, ref_b, scaling = plain[1]["model.layers.0.self_attn.q_proj"]
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b * scaling)


def test_pattern_key_mirrors_peft():
    patterns = ["q_proj", "layers.1.self_attn.q_proj", r"layers\.[01]\.mlp\.down_proj", "mlp.*", "proj"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj"]
    for order in (patterns, patterns[::-1]):
        for name in names:
            assert get_pattern_key(order, name) == peft_get_pattern_key(order, name)


# ---- versions ----------------------------------------------------------------


def test_version_is_hash_of_files_and_tracks_every_byte(plain, root, module_shapes):
    folder = copy_plain(plain, root)
    store = AdapterStore(str(root), 8)
    config_bytes = (folder / "adapter_config.json").read_bytes()
    weights_path = folder / "adapter_model.safetensors"
    first = store.read("a", "a", module_shapes).version
    assert first == hashlib.sha256(config_bytes + weights_path.read_bytes()).hexdigest()[:12]
    assert store.read("a", "a", module_shapes).version == first
    assert store.read("other-name", "a", module_shapes).version == first

    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor value
    weights_path.write_bytes(bytes(data))
    changed = store.read("a", "a", module_shapes)
    assert changed.version != first

    (folder / "adapter_config.json").write_bytes(config_bytes + b"\n")
    assert store.read("a", "a", module_shapes).version not in (first, changed.version)


# ---- refusals of the adapter content ------------------------------------------


@pytest.mark.parametrize("changes, words", [
    (dict(peft_type="IA3"), "only LORA"),
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias"),
    (dict(bias="lora_only"), "bias"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(target_parameters=["experts.gate_up_proj"]), "target_parameters"),  # (MoE)
    (dict(r=8), "rank 4 in the tensors but 8"),
    (dict(rank_pattern={"v_proj": 2}), "rank 4 in the tensors but 2"),
    (dict(use_rslora="yes"), "use_rslora"),
    (dict(lora_alpha="8"), "lora_alpha"),
])
def test_config_refusals(plain, root, module_shapes, changes, words):
    edit_config(copy_plain(plain, root), **changes)
    with pytest.raises(FailedPrecondition, match=words):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


def test_dora_and_modules_to_save_say_not_exact(plain, root, module_shapes):
    edit_config(copy_plain(plain, root), use_dora=True)
    with pytest.raises(FailedPrecondition, match="cannot be served exactly"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


def test_lora_off_the_text_model_is_skipped_not_refused(plain, root, module_shapes, caplog):
    """A multimodal model's vision tower (loader.off_text_linears): text requests never run
    it, so LoRA there is skipped; here layer 1's q_proj stands in for such a linear."""
    tower = "model.layers.1.self_attn.q_proj"
    shapes = {m: s for m, s in module_shapes.items() if m != tower}
    copy_plain(plain, root)
    store = AdapterStore(str(root), 8)
    with pytest.raises(FailedPrecondition, match=f"targets {tower}"):
        store.read("a", "a", shapes)
    with caplog.at_level(logging.INFO, logger="loraplex.lora.store"):
        weights = store.read("a", "a", shapes, frozenset({tower}))
    assert tower not in weights.modules and "outside the text model" in caplog.text
    served = {m for m in plain[1] if m != tower}
    assert set(weights.modules) == served
    for module in served:
        torch.testing.assert_close(weights.modules[module][0], plain[1][module][0])
    every = frozenset(plain[1])
    with pytest.raises(FailedPrecondition, match="no LoRA tensors for the text model"):
        store.read("a", "a", {m: s for m, s in module_shapes.items() if m not in every}, every)


def test_multimodal_checkpoint_names_reach_the_text_model(plain, root, module_shapes):
    """An adapter trained on a multimodal checkpoint names the text model's linears
    model.language_model.<...> and may adapt its vision tower (model.visual.<...>); served
    on that text model loaded alone (model.<...>, as transformers renames the weights), the
    first are its linears and the tower's are skipped. Equal factors either way."""
    def renamed(tensors):
        for key in list(tensors):
            tensors[key.replace(PREFIX + "model.", PREFIX + "model.language_model.")] = \
                tensors.pop(key)
        tensors[PREFIX + "model.visual.blocks.0.attn.qkv.lora_A.weight"] = torch.ones(4, 8)
        tensors[PREFIX + "model.visual.blocks.0.attn.qkv.lora_B.weight"] = torch.ones(24, 4)
    edit_tensors(copy_plain(plain, root), renamed)
    store = AdapterStore(str(root), 8)
    weights = store.read("a", "a", module_shapes)
    assert set(weights.modules) == set(plain[1])
    for module, (a, _, _) in plain[1].items():
        torch.testing.assert_close(weights.modules[module][0], a)
    # and the other way: the text model's own names, served inside the multimodal model
    inside = {m.replace("model.", "model.language_model.", 1): s for m, s in module_shapes.items()}
    copy_plain(plain, root, "b")
    assert set(store.read("b", "b", inside).modules) == {
        m.replace("model.", "model.language_model.", 1) for m in plain[1]}


def test_config_not_json(plain, root, module_shapes):
    (copy_plain(plain, root) / "adapter_config.json").write_text("{r: 4")
    with pytest.raises(FailedPrecondition, match="not valid JSON"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


def test_embedding_target_refused(root, module_shapes):
    make_adapter(root / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(FailedPrecondition, match="embedding"):
        AdapterStore(str(root), 8).read("emb", "emb", module_shapes)


def test_lm_head_target_refused(root, module_shapes):
    make_adapter(root / "head", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    with pytest.raises(FailedPrecondition, match="targets lm_head"):
        AdapterStore(str(root), 8).read("head", "head", module_shapes)


def test_rank_above_max_names_rank_max_and_flag(plain, root, module_shapes):
    copy_plain(plain, root)
    with pytest.raises(FailedPrecondition, match=r"rank 4 .*max rank 2.*--max-lora-rank"):
        AdapterStore(str(root), max_rank=2).read("a", "a", module_shapes)


def test_shape_mismatch_names_module_expected_and_got(plain, root, module_shapes):
    copy_plain(plain, root)
    shapes = dict(module_shapes, **{"model.layers.1.self_attn.v_proj": (64, 48)})
    with pytest.raises(FailedPrecondition) as info:
        AdapterStore(str(root), 8).read("a", "a", shapes)
    message = str(info.value)
    assert "model.layers.1.self_attn.v_proj" in message
    assert "lora_B [48, r]" in message and "lora_B [32, 4]" in message


@pytest.mark.parametrize("factor, value", [("lora_B", float("nan")), ("lora_A", float("inf"))])
def test_non_finite_values_refused(plain, root, module_shapes, factor, value):
    def poison(tensors):
        tensors[first_key(tensors, factor)][0, 0] = value

    edit_tensors(copy_plain(plain, root), poison)
    with pytest.raises(FailedPrecondition, match="NaN or Inf"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


@pytest.mark.parametrize("dropped, missing", [("lora_B", "lora_B"), ("lora_A", "lora_A")])
def test_unpaired_factor_refused(plain, root, module_shapes, dropped, missing):
    edit_tensors(copy_plain(plain, root), lambda t: t.pop(first_key(t, dropped)))
    with pytest.raises(FailedPrecondition, match=f"no .*{missing}"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


def test_no_lora_tensors_refused(plain, root, module_shapes):
    folder = copy_plain(plain, root)
    save_file({}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(FailedPrecondition, match="no LoRA tensors"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


@pytest.mark.parametrize("key", [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
    "base_model.model.lm_head.weight",
])
def test_foreign_tensors_refused(plain, root, module_shapes, key):
    edit_tensors(copy_plain(plain, root), lambda t: t.update({key: torch.ones(4)}))
    with pytest.raises(FailedPrecondition, match="cannot be served exactly"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


@pytest.mark.parametrize("cut", ["truncated", "header_only", "garbage", "empty"])
def test_corrupt_safetensors_refused(plain, root, module_shapes, cut):
    weights_path = copy_plain(plain, root) / "adapter_model.safetensors"
    data = weights_path.read_bytes()
    broken = {"truncated": data[: len(data) // 2], "header_only": data[:8],
              "garbage": b"\xff" * 64, "empty": b""}[cut]
    weights_path.write_bytes(broken)
    with pytest.raises(FailedPrecondition, match="corrupt"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)


class _Marker:
    """Unpickling this creates the marker file: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("filename", ["adapter_model.bin", "model.pt", "weights.pth", "x.pkl"])
def test_pickles_refused_without_unpickling(plain, root, module_shapes, tmp_path, filename):
    folder = copy_plain(plain, root)
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled-marker"
    (folder / filename).write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(FailedPrecondition, match="only safetensors are loaded; convert with"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)
    assert not marker.exists()


def test_pickle_named_safetensors_is_corrupt_not_run(plain, root, module_shapes, tmp_path):
    folder = copy_plain(plain, root)
    marker = tmp_path / "unpickled-marker"
    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(FailedPrecondition, match="corrupt"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)
    assert not marker.exists()


def test_missing_things_are_not_found(plain, root, module_shapes):
    store = AdapterStore(str(root), 8)
    with pytest.raises(NotFound):
        store.read("nope", "nope", module_shapes)
    (root / "empty").mkdir()
    with pytest.raises(NotFound, match="adapter_config.json"):
        store.read("empty", "empty", module_shapes)
    (copy_plain(plain, root) / "adapter_model.safetensors").unlink()
    with pytest.raises(NotFound, match="adapter_model.safetensors"):
        store.read("a", "a", module_shapes)
    with pytest.raises(NotFound):
        AdapterStore(str(root / "missing-root"), 8).read("a", "a", module_shapes)


# ---- names and paths -----------------------------------------------------------

BAD_TEXT = ["", "a\x00b", "http://host/x", "s3://bucket/a", "a" * 256, "has space", "a//b",
            "a/./b", "trailing/", "ümlaut", "a@v1", "~/a"]


@pytest.mark.parametrize("text", BAD_TEXT)
def test_malformed_path_is_invalid_argument(root, module_shapes, text):
    store = AdapterStore(str(root), 8)
    with pytest.raises(InvalidArgument):
        store.resolve(text)
    with pytest.raises(InvalidArgument):
        store.read("a", text, module_shapes)


@pytest.mark.parametrize("text", BAD_TEXT + ["..", "a/../b"])
def test_malformed_name_is_invalid_argument(plain, root, module_shapes, text):
    copy_plain(plain, root)
    with pytest.raises(InvalidArgument):
        AdapterStore(str(root), 8).read(text, "a", module_shapes)


def test_long_valid_name_is_accepted(plain, root, module_shapes):
    copy_plain(plain, root)
    name = "team/" + "x" * 250
    assert AdapterStore(str(root), 8).read(name, "a", module_shapes).name == name


@pytest.mark.parametrize("text", ["/etc", "/tmp/adapters/a", "..", "../a", "a/../../b", "a/.."])
def test_escaping_path_is_permission_denied(plain, root, module_shapes, text):
    copy_plain(plain, root)
    store = AdapterStore(str(root), 8)
    with pytest.raises(PermissionDenied):
        store.resolve(text)
    with pytest.raises(PermissionDenied):
        store.read("a", text, module_shapes)


@pytest.fixture
def opened(monkeypatch):
    """Every path os.open is asked for while the test runs."""
    paths: list[str] = []
    real_open = os.open

    def recording_open(path, *args, dir_fd=None, **kwargs):
        folder = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        paths.append(os.path.realpath(os.path.join(folder, path)))
        return real_open(path, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    return paths


def _inside(path: str, real_root: str) -> bool:
    return path == real_root or path.startswith(real_root + os.sep)


def _outside_adapter(plain, tmp_path) -> Path:
    outside = tmp_path / "outside"
    shutil.copytree(plain[0], outside / "adapter")
    return outside


def test_symlinks_out_of_root_refused_before_open(plain, root, module_shapes, tmp_path, opened):
    outside = _outside_adapter(plain, tmp_path)
    (root / "linked").symlink_to(outside / "adapter")  # folder link
    (root / "team").symlink_to(outside)  # link on a parent folder
    (root / "etc").symlink_to("/etc")
    files = copy_plain(plain, root, "files")
    (files / "adapter_model.safetensors").unlink()
    (files / "adapter_model.safetensors").symlink_to(outside / "adapter" / "adapter_model.safetensors")
    config = copy_plain(plain, root, "config")
    (config / "adapter_config.json").unlink()
    (config / "adapter_config.json").symlink_to("/etc/passwd")

    store = AdapterStore(str(root), 8)
    for relpath in ["linked", "team/adapter", "etc", "files", "config"]:
        with pytest.raises(PermissionDenied, match="outside the adapter root"):
            store.read("x", relpath, module_shapes)
    real_root = str(root.resolve())
    assert any(path.endswith("adapter_config.json") for path in opened), \
        "the in-root config files should have been opened"
    assert all(_inside(path, real_root) for path in opened), opened


def test_symlinks_inside_root_are_followed(plain, root, module_shapes):
    copy_plain(plain, root, "v1")
    (root / "current").symlink_to("v1")
    store = AdapterStore(str(root), 8)
    via_link = store.read("current", "current", module_shapes)
    assert via_link.path == str((root / "v1").resolve())
    assert via_link.version == store.read("v1", "v1", module_shapes).version
    assert store.resolve("current") == (root / "v1").resolve()


def test_resolve_returns_confined_real_path(root):
    store = AdapterStore(str(root), 8)
    assert store.resolve("team/support") == root.resolve() / "team" / "support"


def test_max_rank_must_be_positive(root):
    with pytest.raises(InvalidArgument):
        AdapterStore(str(root), 0)


# ---- scan ----------------------------------------------------------------------


def test_scan_lists_direct_and_nested_adapters(plain, root, tmp_path):
    for relpath in ["a", "team/support", "team/sales", "a/checkpoint-10", ".staging/b", "bad name"]:
        copy_plain(plain, root, relpath)
    (root / "team" / "notes").mkdir()
    (root / "alias").symlink_to("team/support")
    (root / "escape").symlink_to(_outside_adapter(plain, tmp_path) / "adapter")

    found = AdapterStore(str(root), 8).scan()
    real = root.resolve()
    assert found == {
        "a": real / "a",
        "a/checkpoint-10": real / "a" / "checkpoint-10",
        "alias": real / "alias",
        "team/sales": real / "team" / "sales",
        "team/support": real / "team" / "support",
    }
    assert list(found) == sorted(found)


def test_scan_of_missing_root_is_empty(tmp_path):
    assert AdapterStore(str(tmp_path / "nothing"), 8).scan() == {}


def test_weights_dataclass_is_frozen(plain, root, module_shapes):
    copy_plain(plain, root)
    weights = AdapterStore(str(root), 8).read("a", "a", module_shapes)
    assert isinstance(weights, AdapterWeights)
    with pytest.raises(AttributeError):
        weights.version = "x"
    assert " modules=" not in repr(weights)


def test_link_swapped_in_after_the_check_is_still_refused(plain, root, module_shapes, tmp_path,
                                                          monkeypatch, opened):
    """Simulate the race (a link appears between realpath and open) by making realpath
    blind to links: every component is opened without following links, so neither a file
    link nor a folder link is followed, and nothing outside the root is opened."""
    outside = _outside_adapter(plain, tmp_path)
    (root / "team").symlink_to(outside)
    files = copy_plain(plain, root, "files")
    (files / "adapter_config.json").unlink()
    (files / "adapter_config.json").symlink_to(outside / "adapter" / "adapter_config.json")
    store = AdapterStore(str(root), 8)
    real_root = str(root.resolve())
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    with pytest.raises(PermissionDenied, match="cannot open"):  # ELOOP from O_NOFOLLOW
        store.read("x", "files", module_shapes)
    with pytest.raises(PermissionDenied, match="'team' is not a folder under the adapter root"):
        store.read("x", "team/adapter", module_shapes)  # ELOOP/ENOTDIR opening team/
    assert all(_inside(path, real_root) for path in opened), opened


def test_place_moves_a_staged_folder_into_new_parents(plain, root, module_shapes):
    store = AdapterStore(str(root), 8)
    staged = store.staging_folder("team/new")
    shutil.copytree(plain[0], staged, dirs_exist_ok=True)
    assert staged.parent == root.resolve() and staged.name.startswith(".")  # scan skips it
    assert store.place(staged, "team/new") == root.resolve() / "team" / "new"
    assert not staged.exists() and store.scan() == {"team/new": root.resolve() / "team" / "new"}
    assert store.read("team/new", "team/new", module_shapes).rank == 4
    again = store.staging_folder("team/new")
    with pytest.raises(AlreadyExists, match="already exists"):
        store.place(again, "team/new")
    assert again.exists()  # left to the caller, who removes it


def test_place_never_writes_through_a_link_swapped_in_after_the_check(plain, root, tmp_path):
    """new_folder checked 'team/new' while team/ was a folder; a link to the outside
    replaced it during the merge: place refuses, and nothing lands outside."""
    store = AdapterStore(str(root), 8)
    (root / "team").mkdir()
    assert store.new_folder("team/new") == root.resolve() / "team" / "new"
    staged = store.staging_folder("team/new")
    (staged / "adapter_config.json").write_text("{}")
    (root / "team").rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "team").symlink_to(outside)
    with pytest.raises(PermissionDenied, match="'team' is not a folder under the adapter root"):
        store.place(staged, "team/new")
    assert list(outside.iterdir()) == [] and staged.exists()


def test_file_size_refuses_a_link_out_of_the_root(plain, root, tmp_path):
    outside = _outside_adapter(plain, tmp_path)
    files = copy_plain(plain, root, "files")
    store = AdapterStore(str(root), 8)
    weights = files / "adapter_model.safetensors"
    assert store.file_size(files, weights.name, "files") == weights.stat().st_size
    weights.unlink()
    weights.symlink_to(outside / "adapter" / "adapter_model.safetensors")
    with pytest.raises(PermissionDenied, match="outside the adapter root"):
        store.file_size(files, weights.name, "files")


def test_non_regular_files_refused(plain, root, module_shapes):
    folder = copy_plain(plain, root)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        AdapterStore(str(root), 8).read("a", "a", module_shapes)
    fifo = copy_plain(plain, root, "fifo")
    (fifo / "adapter_config.json").unlink()
    os.mkfifo(fifo / "adapter_config.json")  # opening it for a blocking read would hang
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        AdapterStore(str(root), 8).read("fifo", "fifo", module_shapes)
