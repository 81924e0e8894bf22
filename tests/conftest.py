"""Session fixtures: tiny random models, PEFT adapters on disk, and fixed prompts.

    tiny_models   dict arch -> base model dir      (arch in models.ARCHS)
    adapter_root  Path; adapter_root / arch / name is a PEFT adapter folder
                  (every models.ADAPTER_SPECS for FULL_SPEC_ARCHS, else models.small_specs())
                  so Engine.build(..., adapter_root=str(adapter_root / "llama")) sees them by name.
    adapters      dict arch -> dict name -> adapter dir (the same folders)
    prompts       24 fixed prompt id lists, lengths 3..40 (models.make_prompts)

Everything is built once per session (about 5 s on one core).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models import ADAPTER_SPECS, ARCHS, build_adapters, build_base, make_prompts, small_specs

# Families whose fidelity tests mix every adapter spec (>= 16 distinct) in one batch.
FULL_SPEC_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_base(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def adapters(tiny_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        arch: build_adapters(base_dir, root / arch, ADAPTER_SPECS if arch in FULL_SPEC_ARCHS
                             else small_specs())
        for arch, base_dir in tiny_models.items()
    }


@pytest.fixture(scope="session")
def adapter_root(adapters) -> Path:
    """The folder holding one subfolder of adapters per arch."""
    any_path = next(iter(adapters["llama"].values()))
    return any_path.parent.parent


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    return make_prompts(24, min_len=3, max_len=40, seed=0)
