"""The committed demo model and adapters do what demo/README.md says.

Plain transformers + PEFT greedy generation on the assets in demo/assets (no
loraplex engine involved), compared with the reference functions in
demo/tasks.py. The model is small and trained briefly, so each task may miss
at most 1 of the 20 inputs; the build measured >= 95% on 200 held-out inputs
(demo/assets/ACCURACY.json).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "demo" / "assets"
MODEL_DIR = ASSETS / "model"
ADAPTERS = ("reverse", "sort", "caesar")
MAX_MISSES = 1  # out of 20 per task

# Fixed inputs: lowercase letters and single spaces, 3-12 characters.
INPUTS = [
    "abc", "zzz", "cat", "hello", "world", "loraplex", "quick fox", "lazy dog",
    "xyz abc", "mississippi", "banana", "the end", "jumps over", "adapter",
    "zebra a", "kite run", "q w e r t y", "abcdefghijkl", "gpu free", "ok go",
]


def _load_tasks():
    spec = importlib.util.spec_from_file_location("demo_tasks", ROOT / "demo" / "tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tasks = _load_tasks()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is fastest, and much steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    m = PeftModel.from_pretrained(base, ASSETS / "adapters" / ADAPTERS[0],
                                  adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        m.load_adapter(ASSETS / "adapters" / name, adapter_name=name)
    return m.eval()


def _greedy(model, tokenizer, inputs: list[str]) -> list[str]:
    out = {}
    by_len: dict[int, list[str]] = {}
    for s in inputs:
        by_len.setdefault(len(s), []).append(s)
    with torch.no_grad():
        for group in by_len.values():  # equal-length prompts: no padding needed
            enc = tokenizer([tasks.prompt_for(s) for s in group], return_tensors="pt")
            gen = model.generate(**enc, do_sample=False, max_new_tokens=tasks.MAX_LEN + 2)
            for s, row in zip(group, gen):
                out[s] = tokenizer.decode(row[enc.input_ids.shape[1]:],
                                          skip_special_tokens=True)
    return [out[s] for s in inputs]


def test_inputs_are_in_distribution():
    assert len(INPUTS) == 20 and len(set(INPUTS)) == 20
    for s in INPUTS:
        assert tasks.MIN_LEN <= len(s) <= tasks.MAX_LEN
        assert set(s) <= set(tasks.LETTERS + " ") and "  " not in s and s == s.strip()


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer(tasks.prompt_for("hello world")).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len("hello world=")  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world="
    assert tokenizer.decode(ids[1:]) == "hello world="  # no spaces between characters
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["h", "e"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.bos_token + tasks.prompt_for("hello")


def test_assets_are_standard_and_small():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert gen["eos_token_id"] == cfg["eos_token_id"]
    for name in ADAPTERS:
        d = ASSETS / "adapters" / name
        assert (d / "adapter_config.json").is_file()
        assert (d / "adapter_model.safetensors").is_file()
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024


@pytest.mark.parametrize("task", ["copy", *ADAPTERS])
def test_greedy_outputs_match_reference(model, tokenizer, task):
    if task == "copy":
        with model.disable_adapter():
            got = _greedy(model, tokenizer, INPUTS)
    else:
        model.set_adapter(task)
        got = _greedy(model, tokenizer, INPUTS)
    want = [tasks.TASKS[task](s) for s in INPUTS]
    misses = [(s, w, g) for s, w, g in zip(INPUTS, want, got) if w != g]
    assert len(misses) <= MAX_MISSES, f"{task}: {len(misses)}/20 wrong: {misses}"
