"""Adapter merging and export, as pure tensor math (no server state, no protobuf).

Two operations:

* ``merge_adapters``: combine several LoRA adapters into a new one. The semantics
  are those of PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21), reproduced
  operation by operation so that the result is the same tensors PEFT makes:

  ===================== =========================== ==========================
  combination_type      ranks of the sources        rank of the result
  ===================== =========================== ==========================
  linear, ties,         must be equal               that rank
  dare_linear,
  dare_ties,
  magnitude_prune
  cat                   may differ                  sum of the ranks
  svd, ties_svd,        may differ                  ``svd_rank`` or the
  dare_linear_svd,                                  largest source rank
  dare_ties_svd,
  magnitude_prune_svd
  ===================== =========================== ==========================

  - The result always has ``lora_alpha == r``: every source's own scaling
    (``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA, per module) is folded
    into the merged tensors, so the result is served with scaling 1.
  - With a single source PEFT ignores the requested type and does ``linear``
    (the adapter times its weight); so do we.
  - ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` combine the A
    matrices and the B matrices *separately*, each with weight
    ``sqrt(|w * scaling|)`` (the sign goes on A only). That is not the weighted
    sum of the deltas (``B @ A``); ``cat`` and ``svd`` are the exact ones
    (``svd`` exact up to its rank truncation).
  - ``*_svd`` types combine the full deltas ``scaling * B @ A`` and factor the
    result back with ``torch.linalg.svd``: ``B = U[:, :r] @ diag(S[:r])``,
    ``A = Vh[:r]``, optionally clamped to the ``svd_clamp`` quantile.
  - A module that only some sources adapt is merged from those sources alone.
  - ``density`` (fraction of entries kept) is required by ties, dare_* and
    magnitude_prune*; ``majority_sign_method`` ("total" or "frequency") is used
    by the ties variants.

  DARE draws ``torch.bernoulli`` masks. The draws happen module by module in the
  order of ``module_order`` (default: the sources' dict order), and within a
  module one per source: for the A matrices of all sources, then their B
  matrices (for ``*_svd`` types one per source delta). With ``seed`` set they
  come from a private ``torch.Generator`` seeded with it, so the global RNG is
  untouched; that gives exactly the masks PEFT draws when PEFT's merge loop
  starts right after ``torch.manual_seed(seed)`` and the modules are given in
  the model's ``named_modules()`` order. (PEFT creates the new adapter's layers,
  which draws from the global RNG, *before* its merge loop; so seeding right
  before calling ``add_weighted_adapter`` is not the same state. The tests seed
  right after that injection.) With ``seed=None`` the global RNG is used, like PEFT.

  Deliberate differences from PEFT:
  - PEFT copies ``use_rslora`` from the first source into the merged config,
    so a merge whose first source uses rsLoRA is served with scaling
    ``sqrt(r)`` instead of 1 although the scalings were already folded in. We
    return ``use_rslora=False`` and ``alpha=r`` (scaling 1), which is what the
    merged tensors mean.
  - PEFT silently truncates to the shorter of ``adapters`` / ``weights`` and
    crashes deep inside for a density of ``None`` or an ``svd_rank`` larger than
    a module; we refuse those with an error that says what to fix.

* ``merge_into_base`` / ``export_merged_model``: fold an adapter into the base
  weights (``W += scaling * B @ A``, as ``merge_and_unload`` does) and write a
  standalone Hugging Face model folder.

Module names throughout are the HF module paths of the base model, e.g.
``model.layers.0.self_attn.q_proj`` (PEFT's file keys without the
``base_model.model.`` prefix and the ``.lora_A.weight`` suffix). Linear layers are
handled, in ``nn.Linear`` layout (weight ``[out, in]``) or transformers' ``Conv1D``
(GPT-2's, weight ``[in, out]``: the delta goes in transposed, as PEFT's
``fan_in_fan_out``, which PEFT also takes from the layer's kind). No LoRA on
embeddings or convolutions, no DoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraplex.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument

COMBINATION_TYPES = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# Types that combine A and B matrices element-wise, so every rank must match.
EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = tuple(t for t in COMBINATION_TYPES if t.endswith("svd"))
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t not in ("linear", "cat", "svd"))
MAJORITY_SIGN_METHODS = ("total", "frequency")

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraTensors:
    """One LoRA adapter as PEFT stores it.

    ``modules[name] = (A, B)`` with ``A: [r, in]``, ``B: [out, r]`` unscaled (as in
    the safetensors file); the layer computes ``y += scalings[name] * B @ (A @ x)``.
    ``r`` / ``alpha`` are the config's defaults; a module's real rank is
    ``A.shape[0]`` (PEFT's ``rank_pattern`` can make it differ).
    """

    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[str, float]


# --------------------------------------------------------------------------
# PEFT's merge_utils, op for op (peft/utils/merge_utils.py), with an explicit
# generator for the random pruning of DARE.


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _randomly_pruned(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:  # PEFT draws nothing then either
        return tensor
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    return tensor * mask / density


def _disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority_mask = sign == torch.where(magnitude >= 0, 1, -1)
    mixed = (_weighted(stacked, weights) * majority_mask).sum(dim=0)
    return mixed / torch.clamp(majority_mask.sum(dim=0), min=1.0)


def _combine(
    kind: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One of PEFT's task-arithmetic rules; ``kind`` is the type without ``_svd``."""
    if kind in ("linear", "svd"):
        return _weighted(torch.stack(tensors, dim=0), weights).sum(dim=0)
    if kind in ("ties", "magnitude_prune"):
        stacked = torch.stack([_magnitude_pruned(t, density) for t in tensors], dim=0)
    else:  # dare_linear, dare_ties
        stacked = torch.stack([_randomly_pruned(t, density, generator) for t in tensors], dim=0)
    if kind.endswith("ties"):
        return _disjoint_merge(stacked, weights, method)
    return _weighted(stacked, weights).sum(dim=0)


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` exactly as PEFT's ``Linear.get_delta_weight`` computes it."""
    half_on_cpu = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
    if half_on_cpu:
        out = (b.float() @ a.float()) * scaling
        return out.to(a.dtype)
    return (b @ a) * scaling


# --------------------------------------------------------------------------
# merge_adapters


def _rank_of(src: LoraTensors) -> int:
    """PEFT's rank of an adapter for merging: ``max(r, *rank_pattern.values())``."""
    return max([src.r] + [a.shape[0] for a, _ in src.modules.values()])


def _validate(
    sources: Sequence[LoraTensors],
    weights: Sequence[float],
    combination_type: str,
    svd_rank: int | None,
    density: float | None,
    majority_sign_method: str,
    svd_clamp: float | None,
) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise InvalidArgument(
            f"unknown combination_type {combination_type!r}; use one of: {', '.join(COMBINATION_TYPES)}"
        )
    if len(sources) == 0:
        raise InvalidArgument("merge needs at least one source adapter")
    if len(weights) != len(sources):
        raise InvalidArgument(
            f"got {len(weights)} weights for {len(sources)} source adapters; give exactly one weight per adapter"
        )
    for w in weights:
        if not math.isfinite(float(w)):
            raise InvalidArgument(f"weights must be finite numbers, got {w!r}")
    if density is not None and not (0.0 < density <= 1.0):
        raise InvalidArgument(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    if len(sources) > 1 and combination_type in DENSITY_TYPES and density is None:
        raise InvalidArgument(f"combination_type {combination_type!r} needs a density in (0, 1]")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise InvalidArgument(
            f"majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, got {majority_sign_method!r}"
        )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise InvalidArgument(f"svd_rank must be a positive integer (or unset for the largest source rank), got {svd_rank!r}")
    if svd_clamp is not None and not (0.0 <= svd_clamp <= 1.0):
        raise InvalidArgument(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp}")

    shapes: dict[str, tuple[int, int]] = {}
    for i, src in enumerate(sources):
        if not src.modules:
            raise InvalidArgument(f"source adapter #{i} has no modules")
        if set(src.modules) != set(src.scalings):
            raise InvalidArgument(f"source adapter #{i}: modules and scalings name different modules")
        for name, (a, b) in src.modules.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidArgument(
                    f"source adapter #{i}, module {name}: expected A [r, in] and B [out, r], "
                    f"got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(name, shape) != shape:
                raise FailedPrecondition(
                    f"module {name} is [out, in] = {list(shapes[name])} in one source and {list(shape)} in "
                    f"source adapter #{i}; adapters can only be merged if they were trained on the same base model"
                )


def merge_adapters(
    sources: list[LoraTensors],
    weights: list[float],
    combination_type: str,
    *,
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
    svd_clamp: float | None = None,
    module_order: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LoraTensors:
    """Combine ``sources`` into one adapter like PEFT's ``add_weighted_adapter``.

    See the module docstring for the rules. ``module_order`` lists module names
    in the order to process them (the base model's ``named_modules()`` order
    reproduces PEFT's DARE draws); names not in any source are skipped, and it
    must name every module of every source. ``progress(done, total)`` is called
    after each module; ``should_stop()`` is polled before each module and
    ``Cancelled`` is raised when it returns True.

    Raises ``InvalidArgument`` for malformed parameters and ``FailedPrecondition``
    when the sources cannot be merged with this type (unequal ranks, different
    base models).
    """
    _validate(sources, weights, combination_type, svd_rank, density, majority_sign_method, svd_clamp)
    kind = "linear" if len(sources) == 1 else combination_type  # PEFT does the same

    ranks = [_rank_of(s) for s in sources]
    if kind in EQUAL_RANK_TYPES:
        per_module = {(n, a.shape[0]) for s in sources for n, (a, _) in s.modules.items()}
        if len(set(ranks)) != 1 or len({r for _, r in per_module}) != 1:
            raise FailedPrecondition(
                f"combination_type {kind!r} needs all adapters (and all their modules) to have the same rank, "
                f"got ranks {ranks}; use 'cat' or one of the svd types ({', '.join(SVD_TYPES)}) to merge "
                "adapters of different ranks"
            )
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    names: list[str] = []
    for src in sources:
        names.extend(n for n in src.modules if n not in names)
    if module_order is not None:
        listed = set(module_order)
        missing = [n for n in names if n not in listed]
        if missing:
            raise InvalidArgument(f"module_order does not name these modules of the sources: {missing[:5]}")
        wanted = set(names)
        names = [n for n in dict.fromkeys(module_order) if n in wanted]

    if kind in SVD_TYPES:
        for name in names:
            a, b = next(s.modules[name] for s in sources if name in s.modules)
            if new_rank > min(b.shape[0], a.shape[1]):
                raise InvalidArgument(
                    f"svd_rank {new_rank} is larger than module {name} ([out, in] = [{b.shape[0]}, {a.shape[1]}]); "
                    f"use svd_rank <= {min(b.shape[0], a.shape[1])}"
                )

    generator = None
    if seed is not None and kind.startswith("dare"):
        first_a = sources[0].modules[next(iter(sources[0].modules))][0]
        generator = torch.Generator(device=first_a.device)
        generator.manual_seed(seed)

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for done, name in enumerate(names):
        if should_stop is not None and should_stop():
            raise Cancelled(f"merge cancelled after {done} of {len(names)} modules")
        present = [(s.modules[name], s.scalings[name], float(w)) for s, w in zip(sources, weights) if name in s.modules]
        if kind == "cat":
            modules[name] = _merge_cat(present, new_rank)
        elif kind in SVD_TYPES:
            modules[name] = _merge_svd(
                kind, present, new_rank, density, majority_sign_method, generator, svd_clamp
            )
        else:
            modules[name] = _merge_factors(kind, present, density, majority_sign_method, generator)
        if progress is not None:
            progress(done + 1, len(names))

    target_modules = tuple(sorted({t for s in sources for t in s.target_modules}))
    return LoraTensors(
        r=new_rank,
        alpha=float(new_rank),
        use_rslora=False,
        target_modules=target_modules,
        modules=modules,
        scalings={name: 1.0 for name in modules},
    )


_Present = list[tuple[tuple[torch.Tensor, torch.Tensor], float, float]]  # ((A, B), scaling, weight)


def _merge_cat(present: _Present, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    (a0, b0), _, _ = present[0]
    new_a = torch.zeros(new_rank, a0.shape[1], dtype=a0.dtype, device=a0.device)  # [r_new, in]
    new_b = torch.zeros(b0.shape[0], new_rank, dtype=b0.dtype, device=b0.device)  # [out, r_new]
    loras_a = torch.cat([a * w * s for (a, _), s, w in present], dim=0)
    loras_b = torch.cat([b for (_, b), _, _ in present], dim=1)
    new_a[: loras_a.shape[0], :] = loras_a
    new_b[:, : loras_b.shape[1]] = loras_b
    return new_a, new_b


def _merge_factors(
    kind: str, present: _Present, density: float | None, method: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    weights_a, weights_b = [], []
    for _, s, w in present:
        ws = w * s
        sign = 1 if ws >= 0 else -1
        weights_a.append(math.sqrt(abs(ws)) * sign)  # the sign on one side only
        weights_b.append(math.sqrt(abs(ws)))
    a_list = [a for (a, _), _, _ in present]
    b_list = [b for (_, b), _, _ in present]
    device, dtype = a_list[0].device, a_list[0].dtype
    new_a = _combine(kind, a_list, torch.tensor(weights_a).to(device), density, method, generator)
    new_b = _combine(kind, b_list, torch.tensor(weights_b).to(device), density, method, generator)
    return new_a.to(dtype), new_b.to(dtype)


def _merge_svd(
    kind: str,
    present: _Present,
    new_rank: int,
    density: float | None,
    method: str,
    generator: torch.Generator | None,
    clamp: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [_delta(a, b, s) for (a, b), s, _ in present]  # [out, in] each
    weights = torch.tensor([w for _, _, w in present]).to(deltas[0].device)
    delta = _combine(kind.removesuffix("_svd"), deltas, weights, density, method, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)  # as PEFT's default
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])  # [out, r]
    vh = vh[:new_rank, :]  # [r, in]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u = u.clamp(-hi, hi)
        vh = vh.clamp(-hi, hi)
    return vh, u


# --------------------------------------------------------------------------
# PEFT folder


def save_peft_folder(
    result: LoraTensors, folder: str, base_model_name_or_path: str, *, task_type: str | None = "CAUSAL_LM"
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` that
    ``PeftModel.from_pretrained`` loads. Modules whose rank or scaling differs
    from ``r`` / ``alpha`` get ``rank_pattern`` / ``alpha_pattern`` entries."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in result.modules.items():
        r = a.shape[0]
        alpha = result.scalings[name] * (math.sqrt(r) if result.use_rslora else r)
        pattern = re.escape(name)
        if r != result.r:
            rank_pattern[pattern] = r
        if not math.isclose(alpha, result.alpha, rel_tol=1e-6):
            alpha_pattern[pattern] = alpha
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": result.r,
        "lora_alpha": result.alpha,
        "use_rslora": result.use_rslora,
        "target_modules": list(result.target_modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    os.makedirs(folder, exist_ok=True)
    _atomic_write(os.path.join(folder, ADAPTER_WEIGHTS), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(os.path.join(folder, ADAPTER_CONFIG), lambda p: _write_json(p, config))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------
# merge into the base model


def merge_into_base(
    state: dict[str, torch.Tensor], adapter: LoraTensors, conv1d: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """A new state dict with ``W += scaling * B @ A`` for every adapted module
    (``W += (scaling * B @ A).T`` for the modules in ``conv1d``, whose weight is
    ``[in, out]``: see ``Checkpoint``).

    Computes like PEFT's ``merge_and_unload`` (delta in fp32, then added) but
    adds in fp32 and rounds once to the weight's dtype. ``state`` is not changed.
    """
    _check_modules_present(state.keys(), adapter)
    merged = dict(state)
    for name, (a, b) in adapter.modules.items():
        merged[f"{name}.weight"] = _merged_weight(state[f"{name}.weight"], name, a, b,
                                                  adapter.scalings[name], name in conv1d)
    return merged


@dataclass(frozen=True)
class Checkpoint:
    """A model folder's safetensors weights, as export reads them (headers only).

    ``conv1d``: the modules that are transformers ``Conv1D`` (GPT-2's linears), whose
    weight is stored ``[in, out]``, the transpose of ``nn.Linear``'s. A square one
    (GPT-2's ``attn.c_proj``) cannot be told apart by its shape, so ``read`` builds the
    model's architecture from its config on the meta device (no weights read or
    allocated) and looks. ``dropped_prefix``: the model's outer prefix where the
    checkpoint leaves it out, as transformers' loading accepts (``"transformer."`` for the
    original GPT-2's ``h.0.attn.c_attn.weight``, module ``transformer.h.0.attn.c_attn``);
    else ``""``. Module names are the model's, as an adapter names them.
    """

    shards: list[str]
    index: dict | None  # model.safetensors.index.json, when sharded
    shapes: dict[str, list[int]]  # tensor key -> shape
    conv1d: frozenset[str]
    dropped_prefix: str

    @classmethod
    def read(cls, model_dir: str) -> Checkpoint:
        from transformers import AutoConfig
        from transformers.pytorch_utils import Conv1D

        from loraplex.model.loader import model_class

        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        index = None
        if os.path.isfile(index_path):
            with open(index_path) as f:
                index = json.load(f)
            shards = sorted(set(index["weight_map"].values()))
        elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            shards = ["model.safetensors"]
        else:
            raise FailedPrecondition(
                f"{model_dir} has no model.safetensors (or sharded index); export reads "
                "safetensors only, convert .bin checkpoints first")
        shapes: dict[str, list[int]] = {}
        for shard in shards:
            with safe_open(os.path.join(model_dir, shard), framework="pt") as f:
                shapes.update((k, f.get_slice(k).get_shape()) for k in f.keys())
        try:
            config = AutoConfig.from_pretrained(model_dir)
            with torch.device("meta"):
                model = model_class(config).from_config(config)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise FailedPrecondition(
                f"transformers could not build the model of {model_dir} from its config.json, "
                f"to find the layout of its weights ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        conv1d = frozenset(name for name, module in model.named_modules()
                           if isinstance(module, Conv1D))
        prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
        dropped = prefix and not any(k.startswith(prefix) for k in shapes) and any(
            k.startswith(prefix) for k in model.state_dict())
        return cls(shards, index, shapes, conv1d, prefix if dropped else "")

    def weight_key(self, module: str) -> str:
        """The key of ``module``'s weight in this checkpoint."""
        if self.dropped_prefix and module.startswith(self.dropped_prefix):
            module = module[len(self.dropped_prefix):]
        return f"{module}.weight"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (in, out) of every 2-D weight, in file order (the adapter store
        checks an adapter against them)."""
        shapes = {}
        for key, shape in self.shapes.items():
            if key.endswith(".weight") and len(shape) == 2:
                module = self.dropped_prefix + key.removesuffix(".weight")
                shapes[module] = tuple(shape) if module in self.conv1d else (shape[1], shape[0])
        return shapes


def _check_modules_present(keys, adapter: LoraTensors, weight_keys: dict[str, str] | None = None) -> None:
    """Every adapted module's weight among ``keys``, at ``weight_keys[module]`` (default:
    ``module.weight``)."""
    keys = set(keys)
    missing = [n for n in adapter.modules if (weight_keys or {}).get(n, f"{n}.weight") not in keys]
    if missing:
        tied = " (lm_head is tied to the embeddings in this checkpoint)" if "lm_head" in missing else ""
        raise FailedPrecondition(
            f"the base model has no weight for adapted modules {missing[:5]}{tied}; "
            "is the adapter trained on this base model?"
        )


def _check_shape(shape: Sequence[int], name: str, a: torch.Tensor, b: torch.Tensor, conv1d: bool) -> None:
    want, layout = ((a.shape[1], b.shape[0]), "[in, out] (a Conv1D)") if conv1d else ((b.shape[0], a.shape[1]), "[out, in]")
    if tuple(shape) != want:
        raise FailedPrecondition(
            f"module {name}: base weight is {list(shape)} but the adapter expects {layout} = "
            f"{list(want)}; is the adapter trained on this base model?"
        )


def _merged_weight(
    w: torch.Tensor, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float, conv1d: bool
) -> torch.Tensor:
    _check_shape(w.shape, name, a, b, conv1d)
    if not w.is_floating_point():
        raise FailedPrecondition(f"module {name}: base weight is {w.dtype}; merge needs an unquantized checkpoint")
    delta = (b.float() @ a.float()) * scaling  # [out, in]
    if conv1d:
        delta = delta.T  # [in, out], as the weight
    return (w.float() + delta.to(w.device)).to(w.dtype)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_merged_model(
    model_dir: str, adapter: LoraTensors, out_dir: str, dtype: torch.dtype | str | None = None,
    checkpoint: Checkpoint | None = None,
) -> None:
    """Write a standalone HF model folder: ``model_dir``'s weights with ``adapter``
    merged in, loadable by ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    Reads only safetensors (``model.safetensors`` or a sharded index; never
    pickles) from an unquantized (fp32/fp16/bf16) checkpoint, one shard at a time,
    and keeps the shard layout. When the server runs the base quantized (NF4 /
    int8), the export still merges into this unquantized checkpoint on disk, so
    the exported model is the full-precision base plus the adapter, not the
    quantized weights being served. ``dtype`` (e.g. ``torch.bfloat16`` or
    ``"bfloat16"``) casts every floating tensor; None keeps the checkpoint's.
    ``config.json`` (with the dtype updated), the generation config and the
    tokenizer files are copied. ``out_dir`` must not exist or be empty; it is
    written under a temporary name and renamed at the end. ``checkpoint``:
    ``Checkpoint.read(model_dir)``, where the caller has read it already.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is not None and dtype not in _DTYPES.values():
        raise InvalidArgument(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FailedPrecondition(f"{model_dir} has no config.json; point at a Hugging Face model folder")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise FailedPrecondition(
            f"{model_dir} is a pre-quantized checkpoint; export needs the unquantized (fp32/bf16/fp16) checkpoint"
        )
    if os.path.realpath(out_dir) == os.path.realpath(model_dir):
        raise InvalidArgument("out_dir must differ from model_dir")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise AlreadyExists(f"{out_dir} already exists and is not empty; choose a new folder")

    # Fail before writing anything: every adapted module present, with the right shape.
    checkpoint = checkpoint or Checkpoint.read(model_dir)
    keys = {name: checkpoint.weight_key(name) for name in adapter.modules}
    _check_modules_present(checkpoint.shapes, adapter, keys)
    for name, (a, b) in adapter.modules.items():
        _check_shape(checkpoint.shapes[keys[name]], name, a, b, name in checkpoint.conv1d)
    if config.get("tie_word_embeddings") and "lm_head" in adapter.modules:
        raise FailedPrecondition(
            "the adapter changes lm_head, which this model ties to its input embeddings; "
            "a merged export cannot keep them tied"
        )

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        total_size = 0
        for shard in checkpoint.shards:
            state = load_file(os.path.join(model_dir, shard))
            for name, (a, b) in adapter.modules.items():
                key = keys[name]
                if key in state:
                    state[key] = _merged_weight(state[key], name, a, b, adapter.scalings[name],
                                                name in checkpoint.conv1d)
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            total_size += sum(v.numel() * v.element_size() for v in state.values())
            save_file(state, os.path.join(tmp_dir, shard), metadata={"format": "pt"})
            del state
        if checkpoint.index is not None:
            index = dict(checkpoint.index,
                         metadata=dict(checkpoint.index.get("metadata", {}), total_size=total_size))
            _write_json(os.path.join(tmp_dir, "model.safetensors.index.json"), index)
        if dtype is not None:
            name = next(k for k, v in _DTYPES.items() if v == dtype)
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        _write_json(os.path.join(tmp_dir, "config.json"), config)
        for entry in os.listdir(model_dir):
            src = os.path.join(model_dir, entry)
            if not os.path.isfile(src) or entry.startswith(".") or entry in ("config.json",):
                continue
            if entry.endswith(_WEIGHT_SUFFIXES) or entry.endswith(".index.json"):
                continue
            shutil.copy2(src, os.path.join(tmp_dir, entry))  # tokenizer, generation config, ...
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

