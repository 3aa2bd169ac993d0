"""C kernels for the CPU (`sgmv_cpu.c`, `paged_attention_cpu.c`): each built on first use with
the machine's C compiler and called through ctypes.

A C file is compiled once per source, compiler flags and CPU capability into
`$LORAPLEX_CACHE/kernels` (default `~/.cache/loraplex/kernels`). Without a working compiler, or
with `LORAPLEX_CPU_KERNEL=0`, `build_and_load` returns None and the caller keeps its torch
reference; nothing else changes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

log = logging.getLogger(__name__)


def avx512() -> bool:
    """Whether the kernels are built for AVX-512 here (flags() passes -mavx512f exactly then:
    16-float vectors, else 8); cpu_gemm.DENSE_ROWS follows it."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def flags() -> list[str]:
    # Only instruction sets this CPU has (torch has already asked it); no -march=native, so
    # a cache directory shared by two CPUs of the same capability stays valid.
    simd = {
        "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl"],
        "AVX2": ["-mavx2", "-mfma"],
    }.get(torch.backends.cpu.get_cpu_capability(), [])
    return ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp", *simd,
            *(["-DLP_PREFETCH_NTA"] if vendor() == "AuthenticAMD" else [])]


def vendor() -> str:
    """The CPU's vendor id (x86 Linux), or "". sgmv_cpu.c's weight prefetches take it: the
    non-temporal hint measured faster on AMD's cores and kept Intel's from reusing a panel."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("LORAPLEX_CACHE") or pathlib.Path.home() / ".cache/loraplex"
    return pathlib.Path(root) / "kernels"


def build(source: pathlib.Path, compiler: str, flags: list[str],
          fresh: bool = False) -> pathlib.Path:
    key = hashlib.sha256(source.read_bytes() + " ".join(
        [platform.machine(), compiler, *flags]).encode())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists() and not fresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling %s into %s", source.name, target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders never load a partial file
    return target


# argument codes of `build_and_load`'s signatures
ARG_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float}


def build_and_load(source: pathlib.Path, fallback: str, signatures: dict[str, str],
                   defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled `source` (with `-D` of each of `defines`), or None (logged, saying
    `fallback` is used instead). `signatures`: each entry point's arguments, one code of
    ARG_TYPES per argument ("pif": a pointer, an int64, a float), all returning void; a name
    ending in "?" may be missing (an older source a benchmark builds for comparison)."""
    lib = _build_and_load(source, fallback, defines)
    for name, codes in signatures.items() if lib is not None else ():
        fn = getattr(lib, name.rstrip("?"), None)
        if fn is None and name.endswith("?"):
            continue
        if fn is None:
            raise AttributeError(f"{source.name} has no entry point {name}")
        fn.argtypes = [ARG_TYPES[c] for c in codes]
        fn.restype = None
    return lib


def _build_and_load(source: pathlib.Path, fallback: str,
                    defines: tuple[str, ...]) -> ctypes.CDLL | None:
    if os.environ.get("LORAPLEX_CPU_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler for %s: using %s", source.name, fallback)
        return None
    options = [*flags(), *(f"-D{d}" for d in defines)]
    try:
        try:
            return ctypes.CDLL(str(build(source, compiler, options)))
        except OSError:  # a damaged file in the cache: build it again, once
            return ctypes.CDLL(str(build(source, compiler, options, fresh=True)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        # RuntimeError: no home directory to cache in
        detail = getattr(err, "stderr", "") or err
        log.warning("%s did not build (%s); using %s", source.name, detail, fallback)
        return None
