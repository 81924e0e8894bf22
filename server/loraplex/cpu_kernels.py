"""Build and load loraplex's CPU kernels (cpu_kernels.c) with the system C compiler and ctypes.

The first engine that needs the kernels compiles them (a few tenths of a second) into
$XDG_CACHE_HOME/loraplex, else ~/.cache/loraplex; later ones load the cached library. (Every
engine loads them, whatever its device: guided decoding's masks are found on the CPU.)
The file name carries a hash of the source and flags, so a changed kernel is rebuilt, never
confused with an old one. Without a compiler, `load` returns None and the engine uses
torch ops (the `segmented` LoRA backend, SDPA attention) and numpy (the masks). The CPU
image builds the library in a build stage (`python cpu_kernels.py FOLDER`) and ships it in
its cache folder.

Only the standard library is used here, so the image's build stage needs no torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared")
_loaded: dict[Path, ctypes.CDLL | None] = {}  # folder -> library (None: could not build)


def kernel_dir() -> Path:
    """Where the library is looked for and built (read when called, not at import)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "loraplex"


def library_name() -> str:
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + platform.machine().encode()
    return f"loraplex_kernels-{hashlib.sha256(key).hexdigest()[:16]}.so"


def build(folder: Path) -> Path:
    """Compile the kernels into `folder` (written under a temporary name, then renamed, so
    processes building at once never load half a file). Raises OSError when there is no
    compiler, subprocess.CalledProcessError when it fails."""
    target = folder / library_name()
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    try:
        subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", str(tmp)], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load(folder: Path | None = None) -> ctypes.CDLL | None:
    """The kernels' library (built on first use), or None when it cannot be built here."""
    folder = folder or kernel_dir()
    if folder not in _loaded:
        try:
            lib = ctypes.CDLL(str(build(folder)))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            log.warning("CPU kernels unavailable (%s); using torch and numpy ops instead",
                        str(detail).strip()[:500])
            lib = None
        else:
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            for bgmv in (lib.lora_bgmv, lib.lora_bgmv_bf16):
                bgmv.argtypes = [p, i64, p, i64, p, i64, i64, p, p, i64, p, i64]
                bgmv.restype = ctypes.c_int
            for attend in (lib.paged_decode_attention, lib.paged_decode_attention_bf16):
                attend.argtypes = [p, p, p, p, i64, p, i64, i64, i64, i64, i64, i64, i64,
                                   ctypes.c_float, i64, i64, ctypes.c_float, p, p]
                attend.restype = None
            lib.trie_walk.argtypes = [p, p, p, p, p, i64, i64]
            lib.trie_walk.restype = i64
        _loaded[folder] = lib
    return _loaded[folder]


def load_for(device_type: str, dtype_name: str, required_by: str = "",
             takes: tuple[str, ...] = ("float32",)) -> ctypes.CDLL | None:
    """The library for a model in `dtype_name` on `device_type`: None unless that is one of
    the dtypes the caller's kernel `takes` on "cpu" and the kernels build here. `required_by`
    (an option that named the kernels explicitly, e.g. "lora_backend 'bgmv'") turns None
    into a ValueError."""
    lib = load() if device_type == "cpu" and dtype_name in takes else None
    if lib is None and required_by:
        wants = " or ".join({"float32": "fp32", "bfloat16": "bf16"}.get(t, t) for t in takes)
        raise ValueError(f"{required_by} needs {wants} on the CPU and a C compiler (see the "
                         f"log); the model is {dtype_name} on {device_type}: use 'auto'")
    return lib


if __name__ == "__main__":  # python cpu_kernels.py FOLDER: prebuild (the CPU image)
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else kernel_dir()))
