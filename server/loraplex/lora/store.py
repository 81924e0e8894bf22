"""Disk tier of the adapter cache: find, confine, validate and read PEFT LoRA folders.

An adapter is a standard PEFT folder under the adapter root::

    <root>/<relpath>/adapter_config.json
    <root>/<relpath>/adapter_model.safetensors

``AdapterStore.read`` turns one folder into an ``AdapterWeights``: float32 CPU
factors per served module, with PEFT's scaling already folded into ``B``, so
the LoRA layer computes ``y += B @ (A @ x)`` and nothing else.

What this module guarantees:

* Confinement. A path is checked as text (no absolute paths, no ``..``) and
  then resolved with ``os.path.realpath`` (which reads links but opens no
  file); a folder or file whose real location is outside the root is refused
  before it is opened. The resolved path is then opened one folder at a time
  from the root's descriptor, every component with ``O_NOFOLLOW``, so a link
  swapped in between the check and the open is refused, never followed; where
  ``/proc`` exists, the opened descriptor is checked once more. A merge's new
  folder is renamed into place the same way (``place``).
* No pickle. Only ``adapter_model.safetensors`` is parsed, from bytes, with
  ``safetensors.torch.load``; ``torch.load`` is never called.
* Exact serving or refusal. Anything that would make our ``B @ (A @ x)``
  differ from PEFT's forward (DoRA, biases, modules_to_save, embeddings,
  lm_head, ...) is refused with ``FailedPrecondition`` and a message that
  says what to change.
* Immutable versions. Each file is read once; the version is the sha256 of
  exactly the bytes that were parsed, so a file rewritten while we read it
  can never give a version that does not match the weights returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from loraplex.lora.merge import LoraTensors

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
MAX_NAME_LEN = 255
VERSION_HEX_CHARS = 12

_COMPONENT_RE = re.compile(r"[A-Za-z0-9._-]+")
# base_model.model.<module>.lora_A.weight, optionally .lora_A.<adapter>.weight
_LORA_KEY_RE = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<factor>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight"
)
# folders and files under the root are opened one component at a time, links not followed
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CONVERT_HINT = (
    "only safetensors are loaded; convert with: python -c \"import torch, safetensors.torch as s; "
    "s.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\" "
    "(on a machine you trust), or load it in PEFT and save_pretrained(dir, safe_serialization=True)"
)

# Config options whose forward pass is not y += scale * B @ (A @ x) on a plain linear.
# A value that is falsy (None, False, [], {}) means the option is off.
_UNSERVABLE_OPTIONS = {
    "use_dora": "DoRA (use_dora=true) rescales each weight by a learned magnitude; "
                "merge the adapter into the base model or retrain with use_dora=false",
    "modules_to_save": "modules_to_save replaces whole modules ({value}); "
                       "retrain without modules_to_save or serve a merged model",
    "layer_replication": "layer_replication changes the base model's layer stack; "
                         "retrain without layer_replication",
    "lora_bias": "lora_bias=true adds a bias to lora_B; retrain with lora_bias=false",
    "trainable_token_indices": "trainable_token_indices changes embedding rows; "
                               "retrain without trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) switches on mid-sequence; "
                               "retrain as a plain LoRA",
    "use_qalora": "QA-LoRA (use_qalora=true) pools the input before lora_A; retrain as a plain LoRA",
    "target_parameters": "target_parameters adapts raw parameters (e.g. MoE experts), not linears",
    "arrow_config": "Arrow routing mixes several adapters per token; serve the experts one by one",
    "kasa_config": "KaSA changes the base weight (SVD truncation); serve a merged model",
    "monteclora_config": "MonteCLoRA samples its factors; retrain as a plain LoRA",
    "use_bdlora": "BD-LoRA uses block-diagonal factors; retrain as a plain LoRA",
}


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is ambiguous
class AdapterWeights:
    name: str
    version: str  # first 12 hex chars of sha256(config bytes + safetensors bytes)
    path: str  # absolute, resolved folder path
    rank: int  # max rank over its modules
    alpha: float  # lora_alpha from the config
    target_modules: tuple[str, ...]  # sorted short names present, e.g. ("q_proj", "v_proj")
    use_rslora: bool
    base_model: str  # base_model_name_or_path or ""
    size_bytes: int  # bytes of the tensors as held (fp32)
    # served module name -> (A [r, in] fp32 contiguous, B [out, r] fp32, scaling folded in)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


@dataclass(frozen=True)
class _LoraSettings:
    """The parts of adapter_config.json that decide how the tensors are served."""

    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str


class AdapterStore:
    """Reads PEFT LoRA folders below one root directory."""

    def __init__(self, root: str, max_rank: int):
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise InvalidArgument(f"max_rank must be a positive integer, got {max_rank!r}")
        self.root = Path(os.path.realpath(root))
        self.max_rank = max_rank

    # ---- paths -------------------------------------------------------------

    def resolve(self, relpath: str) -> Path:
        """Real path of the adapter folder ``root/relpath``; it need not exist.

        InvalidArgument for malformed text, PermissionDenied for a path that is
        absolute, has ``..``, or leads (through links) outside the root.
        """
        _check_relpath(relpath)
        real = Path(os.path.realpath(self.root / relpath))
        self._ensure_inside(real, relpath)
        return real

    def scan(self) -> dict[str, Path]:
        """name -> folder for every folder below the root holding adapter_config.json.

        The name is the relative path with '/' separators ("team/support").
        Hidden folders (".tmp-upload") are skipped so uploads can be staged
        and renamed into place; linked folders are listed when they resolve
        inside the root but are not descended into (no link cycles).
        """
        found: dict[str, Path] = {}
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, _ in os.walk(self.root):  # followlinks=False
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            candidates = [here] + [here / d for d in dirnames if (here / d).is_symlink()]
            for folder in candidates:
                name = folder.relative_to(self.root).as_posix()
                if self._is_listable(name, folder):
                    found[name] = folder
        return dict(sorted(found.items()))

    def _is_listable(self, name: str, folder: Path) -> bool:
        if name == "." or not (folder / CONFIG_FILE).is_file():
            return False
        try:
            _check_name(name)
        except InvalidArgument:
            log.debug("skipping adapter folder with an unservable name: %r", name)
            return False
        return Path(os.path.realpath(folder)).is_relative_to(self.root)

    def _ensure_inside(self, real: Path, shown: str) -> None:
        if not real.is_relative_to(self.root):
            raise PermissionDenied(
                f"{shown!r} leads outside the adapter root {str(self.root)!r} (through a symlink); "
                "copy the adapter into the root instead of linking to it"
            )

    def _open_folder(self, parts: Sequence[str], shown: str, create: bool = False) -> int:
        """fd of the folder root/parts[0]/parts[1]/..., each opened from the one before
        it without following a link (and made first when `create`): a link swapped in
        after a path was checked is refused (PermissionDenied), never followed."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise NotFound(f"{shown!r} does not exist") from None
                except OSError as err:  # ELOOP (a link) or ENOTDIR
                    raise PermissionDenied(f"cannot open {shown!r}: {part!r} is not a folder "
                                           f"under the adapter root ({err.strerror})") from None
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read_file(self, folder: Path, filename: str, shown: str) -> bytes:
        """All bytes of folder/filename, refusing anything that resolves outside the root:
        the resolved path is checked, then opened one folder at a time (_open_folder)."""
        real = Path(os.path.realpath(folder / filename))
        self._ensure_inside(real, shown)
        *parents, last = real.relative_to(self.root).parts
        parent = self._open_folder(parents, shown)
        try:
            fd = os.open(last, _FILE_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise NotFound(f"{shown!r} does not exist") from None
        except OSError as err:  # ELOOP: a link was swapped in after the check
            raise PermissionDenied(f"cannot open {shown!r}: {err.strerror}") from None
        finally:
            os.close(parent)
        try:
            self._check_opened(fd, shown)
            with open(fd, "rb", closefd=False) as file:
                return file.read()
        finally:
            os.close(fd)

    def _check_opened(self, fd: int, shown: str) -> None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FailedPrecondition(f"{shown!r} is not a regular file")
        if os.path.isdir("/proc/self/fd"):  # Linux: where did the open really land?
            self._ensure_inside(Path(os.readlink(f"/proc/self/fd/{fd}")), shown)

    # ---- reading -----------------------------------------------------------

    def read(self, name: str, relpath: str, module_shapes: dict[str, tuple[int, int]],
             off_text: frozenset[str] = frozenset()) -> AdapterWeights:
        """Load and validate the adapter folder ``root/relpath`` as ``name``.

        ``module_shapes``: served module name -> (in_features, out_features) of
        every linear the server can apply LoRA to. ``off_text``: linears of a multimodal
        model that text requests never run (its vision tower): LoRA on them is skipped,
        since it changes nothing served.
        """
        _check_name(name)
        folder = self.resolve(relpath)
        if not folder.is_dir():
            raise NotFound(f"adapter folder {relpath!r} does not exist under {str(self.root)!r}")
        if not os.path.lexists(folder / CONFIG_FILE):
            raise NotFound(f"{relpath!r} has no {CONFIG_FILE}; is it a PEFT adapter folder?")
        config_bytes = self._read_file(folder, CONFIG_FILE, f"{relpath}/{CONFIG_FILE}")
        settings = _parse_config(config_bytes, name)
        weights_bytes = self._read_weights(folder, relpath)
        version = _version(config_bytes, weights_bytes)
        tensors = _parse_safetensors(weights_bytes, name)
        pairs = _group_lora_tensors(tensors, name, module_shapes, off_text)
        modules = {module: self._serve_module(name, module, a, b, settings, module_shapes[module])
                   for module, (a, b) in sorted(pairs.items())}
        return AdapterWeights(
            name=name,
            version=version,
            path=str(folder),
            rank=max(a.shape[0] for a, _ in modules.values()),
            alpha=settings.alpha,
            target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
            use_rslora=settings.use_rslora,
            base_model=settings.base_model,
            size_bytes=sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                           for a, b in modules.values()),
            modules=modules,
        )

    def read_lora_tensors(self, name: str, relpath: str, module_shapes: dict[str, tuple[int, int]],
                          off_text: frozenset[str] = frozenset()) -> tuple[LoraTensors, str]:
        """The adapter folder ``root/relpath`` as raw PEFT tensors, for merging.

        Same confinement, no-pickle rule and validation as ``read`` (a folder that
        ``read`` refuses is refused here too, except for the server's max rank,
        which only matters for serving), but the factors are returned *unscaled*
        (as in the file) with the per-module PEFT scaling beside them, in fp32
        (PEFT upcasts adapter weights to fp32 too). Returns the tensors and the
        version (hash of the bytes parsed), so a caller can check it read the
        version it meant.
        """
        _check_name(name)
        folder = self.resolve(relpath)
        if not folder.is_dir():
            raise NotFound(f"adapter folder {relpath!r} does not exist under {str(self.root)!r}")
        config_bytes = self._read_file(folder, CONFIG_FILE, f"{relpath}/{CONFIG_FILE}")
        settings = _parse_config(config_bytes, name)
        weights_bytes = self._read_weights(folder, relpath)
        version = _version(config_bytes, weights_bytes)
        pairs = _group_lora_tensors(_parse_safetensors(weights_bytes, name), name, module_shapes,
                                    off_text)
        modules, scalings = {}, {}
        for module, (a, b) in sorted(pairs.items(), key=lambda kv: list(module_shapes).index(kv[0])):
            in_features, out_features = module_shapes[module]
            _check_factor_shapes(name, module, a, b, in_features, out_features)
            r = a.shape[0]
            expected_r = _pattern_value(settings.rank_pattern, module, settings.r)
            if r != expected_r:
                raise FailedPrecondition(
                    f"adapter {name!r}: {module} has rank {r} in the tensors but {expected_r} in "
                    f"{CONFIG_FILE} (r / rank_pattern); fix the config")
            a32, b32 = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
            for factor, tensor in (("lora_A", a32), ("lora_B", b32)):
                if not torch.isfinite(tensor).all():
                    raise FailedPrecondition(f"adapter {name!r} has NaN or Inf values in {module}.{factor}")
            modules[module] = (a32, b32)
            scalings[module] = _scaling(_pattern_value(settings.alpha_pattern, module, settings.alpha), r,
                                        settings.use_rslora)
        lora = LoraTensors(r=settings.r, alpha=settings.alpha, use_rslora=settings.use_rslora,
                           target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
                           modules=modules, scalings=scalings)
        return lora, version

    def new_folder(self, name: str) -> Path:
        """Real path where a new adapter ``name`` would be written; it must not exist yet.

        PermissionDenied for a name that is absolute, has ``..`` or leads (through
        links) outside the root; InvalidArgument for a malformed name;
        AlreadyExists when something is already there.
        """
        folder = self.resolve(name)  # checks the name as a relative path
        if os.path.lexists(self.root / name) or os.path.lexists(folder):
            raise AlreadyExists(f"{name!r} already exists under the adapter root; choose a new name")
        return folder

    def staging_folder(self, name: str) -> Path:
        """A new hidden folder at the top of the root (``scan`` skips it) to write the
        adapter ``name`` into before ``place`` renames it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix=f".new-{name.replace('/', '-')}-"))

    def place(self, staged: Path, name: str) -> Path:
        """Rename a ``staging_folder`` to root/name, making its parent folders, and return
        its path. Every folder on the way is opened from the root's without following
        links, so a link swapped in since ``new_folder`` checked the name is refused
        (PermissionDenied), never written through; AlreadyExists when root/name exists."""
        _check_relpath(name)
        *parents, last = name.split("/")
        parent = self._open_folder(parents, name, create=True)
        try:
            try:
                os.stat(last, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                raise AlreadyExists(f"{name!r} already exists under the adapter root; "
                                    "choose a new name")
            try:  # (staged: made by staging_folder right under the real root)
                os.rename(staged, last, dst_dir_fd=parent)
            except OSError as err:  # EXDEV: a parent folder is another file system's mount
                raise FailedPrecondition(f"cannot move the new adapter into {name!r}: "
                                         f"{err.strerror}") from None
        finally:
            os.close(parent)
        return self.root / name

    def file_size(self, folder: Path, filename: str, shown: str) -> int:
        """Bytes of folder/filename, refusing anything that resolves outside the root."""
        real = Path(os.path.realpath(folder / filename))
        self._ensure_inside(real, shown)
        return real.stat().st_size

    def _read_weights(self, folder: Path, relpath: str) -> bytes:
        if not os.path.lexists(folder / WEIGHTS_FILE):
            # (folder: resolved inside the root) listed through a descriptor, no link followed
            fd = self._open_folder(folder.relative_to(self.root).parts, relpath)
            try:
                pickles = sorted(n for n in os.listdir(fd) if n.endswith(PICKLE_SUFFIXES))
            finally:
                os.close(fd)
            if pickles:
                raise FailedPrecondition(f"{relpath!r} holds {', '.join(pickles)}: {_CONVERT_HINT}")
            raise NotFound(f"{relpath!r} has no {WEIGHTS_FILE}")
        return self._read_file(folder, WEIGHTS_FILE, f"{relpath}/{WEIGHTS_FILE}")

    def _serve_module(self, name: str, module: str, a: torch.Tensor, b: torch.Tensor,
                      settings: _LoraSettings, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked fp32 (A [r, in], B [out, r] * scaling) for one module."""
        in_features, out_features = shape
        _check_factor_shapes(name, module, a, b, in_features, out_features)
        r = a.shape[0]
        if r > self.max_rank:
            raise FailedPrecondition(
                f"adapter {name!r} has rank {r} at {module}, above the server's max rank "
                f"{self.max_rank}; restart the server with a larger --max-lora-rank (>= {r})"
            )
        expected_r = _pattern_value(settings.rank_pattern, module, settings.r)
        if r != expected_r:
            raise FailedPrecondition(
                f"adapter {name!r} cannot be served exactly: {module} has rank {r} in the tensors "
                f"but {expected_r} in adapter_config.json (r / rank_pattern); fix the config"
            )
        scaling = _scaling(_pattern_value(settings.alpha_pattern, module, settings.alpha), r,
                           settings.use_rslora)
        a32 = a.to(torch.float32).contiguous()  # [r, in]
        b32 = b.to(torch.float32) * scaling  # [out, r]
        for factor, tensor in (("lora_A", a32), ("lora_B", b32)):
            if not torch.isfinite(tensor).all():
                raise FailedPrecondition(
                    f"adapter {name!r} has NaN or Inf values in {module}.{factor} (after scaling "
                    f"by {scaling:g}); the training diverged, use an earlier checkpoint"
                )
        return a32, b32.contiguous()


def _version(config_bytes: bytes, weights_bytes: bytes) -> str:
    """First hex chars of sha256(config bytes + safetensors bytes), hashed in place (no
    concatenated copy of a file that may be gigabytes)."""
    digest = hashlib.sha256(config_bytes)
    digest.update(weights_bytes)
    return digest.hexdigest()[:VERSION_HEX_CHARS]


# ---- names and paths ---------------------------------------------------------


def _check_text(text: object, what: str) -> list[str]:
    """Checks shared by names and paths; returns the '/'-separated components."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{what} is empty; give a folder name relative to the adapter root")
    if "\x00" in text:
        raise InvalidArgument(f"{what} contains a NUL byte")
    if "://" in text:
        raise InvalidArgument(
            f"{what} {text!r} is a URL; only folders under the adapter root are served, download it there first"
        )
    if len(text) > MAX_NAME_LEN:
        raise InvalidArgument(f"{what} is {len(text)} characters long; the limit is {MAX_NAME_LEN}")
    return text.split("/")


def _check_components(parts: list[str], text: str, what: str) -> None:
    for part in parts:
        if part == "." or not _COMPONENT_RE.fullmatch(part):
            raise InvalidArgument(
                f"{what} {text!r} has the component {part!r}; use only letters, digits, '.', '_' and '-' "
                "between single '/' separators"
            )


def _check_name(name: str) -> None:
    """An adapter name: like a relative path, '/' allowed, nothing else special."""
    parts = _check_text(name, "adapter name")
    if ".." in parts:
        raise InvalidArgument(f"adapter name {name!r} contains '..'")
    _check_components(parts, name, "adapter name")


def _check_relpath(relpath: str) -> None:
    """A folder path relative to the adapter root, checked as text before any lookup."""
    parts = _check_text(relpath, "adapter path")
    if relpath.startswith(("/", "\\")) or os.path.isabs(relpath) or re.match(r"[A-Za-z]:", relpath):
        raise PermissionDenied(f"adapter path {relpath!r} is absolute; give a path relative to the adapter root")
    if ".." in parts:
        raise PermissionDenied(f"adapter path {relpath!r} contains '..'; paths must stay under the adapter root")
    _check_components(parts, relpath, "adapter path")


# ---- adapter_config.json -------------------------------------------------------


def _parse_config(raw: bytes, name: str) -> _LoraSettings:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FailedPrecondition(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise FailedPrecondition(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    _check_servable_config(config, name)
    settings = _LoraSettings(
        r=_positive_int(config.get("r", 8), "r", name),
        alpha=_finite_float(config.get("lora_alpha", 8), "lora_alpha", name),
        use_rslora=_flag(config.get("use_rslora", False), "use_rslora", name),
        rank_pattern=_pattern(config, "rank_pattern", name, _positive_int),
        alpha_pattern=_pattern(config, "alpha_pattern", name, _finite_float),
        base_model=config.get("base_model_name_or_path") or "",
    )
    # (fan_in_fan_out is not read: PEFT's lora_A / lora_B have one layout whatever it says;
    # it sets how a delta is merged into a base weight, which PEFT, and merge.py, take from
    # the base layer's kind: true for a GPT-2 Conv1D, false for a linear)
    return settings


def _check_servable_config(config: dict, name: str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise FailedPrecondition(
            f"adapter {name!r} has peft_type {peft_type!r}; only LORA adapters are served"
        )
    for option, reason in _UNSERVABLE_OPTIONS.items():
        value = config.get(option)
        if value:
            raise FailedPrecondition(
                f"adapter {name!r} cannot be served exactly: " + reason.format(value=value)
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise FailedPrecondition(
            f"adapter {name!r} cannot be served exactly: bias={bias!r} trains base-layer biases; "
            "retrain with bias='none'"
        )


def _positive_int(value: object, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FailedPrecondition(f"adapter {name!r}: {what} in {CONFIG_FILE} must be a positive integer, got {value!r}")
    return value


def _flag(value: object, what: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise FailedPrecondition(f"adapter {name!r}: {what} in {CONFIG_FILE} must be true or false, got {value!r}")
    return value


def _finite_float(value: object, what: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FailedPrecondition(f"adapter {name!r}: {what} in {CONFIG_FILE} must be a finite number, got {value!r}")
    return float(value)


def _pattern(config: dict, key: str, name: str, check) -> dict:
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise FailedPrecondition(f"adapter {name!r}: {key} in {CONFIG_FILE} must be an object")
    for regex, value in pattern.items():
        try:
            re.compile(regex)
        except re.error as err:
            raise FailedPrecondition(f"adapter {name!r}: {key} key {regex!r} is not a regex ({err})") from None
        check(value, f"{key}[{regex!r}]", name)
    return pattern


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """Mirror of peft.utils.other.get_pattern_key (peft 0.21): the first pattern
    that matches a dotted suffix of the module name, else the name itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's lookup in LoraModel._create_and_replace: pattern.get(get_pattern_key(...), default)."""
    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """Exactly LoraLayer.update_layer: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ---- adapter_model.safetensors ----------------------------------------------


def _parse_safetensors(raw: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(raw)
    except SafetensorError as err:
        raise FailedPrecondition(
            f"adapter {name!r}: {WEIGHTS_FILE} is corrupt or truncated ({err}); write it again"
        ) from None


def _group_lora_tensors(tensors: dict[str, torch.Tensor], name: str,
                        module_shapes: dict[str, tuple[int, int]],
                        off_text: frozenset[str] = frozenset()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """served module -> (lora_A weight, lora_B weight), refusing every other tensor but
    the LoRA factors of `off_text` linears, which are skipped."""
    _refuse_variant_tensors(tensors, name)
    factors: dict[tuple[str, str], torch.Tensor] = {}
    skipped = set()
    lora_keys_first = sorted(tensors, key=lambda k: (_LORA_KEY_RE.fullmatch(k) is None, k))
    for key in lora_keys_first:  # so a targeted lm_head is named before its saved base weight
        match = _LORA_KEY_RE.fullmatch(key)
        if match and _off_text(match["module"], off_text, module_shapes):
            skipped.add(match["module"])
            continue
        module, factor = _split_lora_key(key, name, module_shapes)
        if (module, factor) in factors:
            raise FailedPrecondition(
                f"adapter {name!r} holds {module}.{factor} twice (several adapter names in one file); "
                "save one adapter per folder"
            )
        factors[(module, factor)] = tensors[key]
    if skipped:
        log.info("adapter %r: LoRA on %d linears outside the text model (such as %s) is not "
                 "applied: requests are text only", name, len(skipped), min(skipped))
    if not factors:
        raise FailedPrecondition(
            f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA tensors"
            + (" for the text model (only for its other towers, which text requests never "
               "run)" if skipped else ""))
    pairs = {}
    for module in sorted({m for m, _ in factors}):
        for factor, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if (module, factor) not in factors:
                raise FailedPrecondition(
                    f"adapter {name!r} has {module}.{other} but no {module}.{factor}; the file is incomplete"
                )
        pairs[module] = (factors[(module, "lora_A")], factors[(module, "lora_B")])
    return pairs


def _refuse_variant_tensors(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Name the LoRA variant a file holds, whatever its config says, before any generic refusal."""
    refuse = f"adapter {name!r} cannot be served exactly: "
    for key in sorted(tensors):
        if "lora_embedding_A" in key or "lora_embedding_B" in key:
            raise FailedPrecondition(refuse + f"{key} is a LoRA on an embedding; retrain without targeting embeddings")
        if "lora_magnitude_vector" in key:
            raise FailedPrecondition(refuse + f"{key} is a DoRA magnitude; merge the adapter or retrain without DoRA")


# Where multimodal models keep their other towers (Gemma 3's model.vision_tower, Qwen3.5's
# model.visual, LLaVA's multi_modal_projector): a module under one, in a model loaded for
# text alone (which has no such module), is one text requests would never run.
_TOWERS = frozenset({"visual", "vision_tower", "vision_model", "audio_tower",
                     "multi_modal_projector", "mm_projector"})


def _off_text(module: str, off_text: frozenset[str], module_shapes: dict) -> bool:
    if module in off_text:
        return True
    return _served_name(module, module_shapes) is None and bool(
        _TOWERS & set(module.split(".")[:2]))


def _served_name(module: str, module_shapes: dict) -> str | None:
    """The served linear an adapter's module name means: the name itself, or, across a
    multimodal checkpoint and its text model loaded alone (as transformers renames their
    weights), the name with its `language_model` level dropped or added."""
    head, _, rest = module.partition(".")
    candidates = (module, module.replace(".language_model.", ".", 1),
                  module.removeprefix("language_model."), f"{head}.language_model.{rest}")
    return next((c for c in candidates if c in module_shapes), None)


def _split_lora_key(key: str, name: str, module_shapes: dict[str, tuple[int, int]]) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A[.<adapter>].weight' -> (<served module>, 'lora_A')
    (see _served_name)."""
    refuse = f"adapter {name!r} cannot be served exactly: "
    match = _LORA_KEY_RE.fullmatch(key)
    if not match:
        raise FailedPrecondition(
            refuse + f"tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A/lora_B.weight), "
            "e.g. a full weight saved by modules_to_save or save_embedding_layers; "
            "save the adapter again with only its LoRA weights"
        )
    module = _served_name(match["module"], module_shapes)
    if module is None:
        raise FailedPrecondition(
            refuse + f"it targets {match['module']}, which is not a linear layer this server "
            "applies LoRA to (embeddings and lm_head are not served); retrain without that module"
        )
    return module, match["factor"]


def _check_factor_shapes(name: str, module: str, a: torch.Tensor, b: torch.Tensor,
                         in_features: int, out_features: int) -> None:
    for factor, tensor in (("lora_A", a), ("lora_B", b)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise FailedPrecondition(f"adapter {name!r}: {module}.{factor} has dtype {tensor.dtype}; "
                                     "LoRA factors must be floating point")
    got = (tuple(a.shape), tuple(b.shape))
    ok = (a.dim() == 2 and b.dim() == 2 and a.shape[1] == in_features
          and b.shape[0] == out_features and b.shape[1] == a.shape[0] and a.shape[0] >= 1)
    if not ok:
        raise FailedPrecondition(
            f"adapter {name!r} does not fit the base model at {module}: expected lora_A [r, {in_features}] "
            f"and lora_B [{out_features}, r], got lora_A {list(got[0])} and lora_B {list(got[1])}; "
            "was it trained on a different base model?"
        )
