"""Building and loading peftkit's compiled CPU kernels: plain C files (no PyTorch headers), built on first use.

The system C compiler builds a kernel in well under a second, once per source, compiler, flags and CPU, into
`$PEFTKIT_CACHE/kernels` (or a folder in the temp dir if that is not writable). A library is written to a temporary
name, then renamed: concurrent processes never load a half-written one; a cached file that does not load is built
again. Builds use `-march=native` and `-fopenmp` where the compiler takes them; a kernel's parallel loops then run on
the OpenMP runtime PyTorch has already loaded (same soname). Without a compiler, off Linux, or with
``PEFTKIT_NATIVE=0``, `cached_kernel` answers None and the caller uses its PyTorch path, which stays the reference.
Used by `peftkit.quant.native` (4-bit dequantization) and `peftkit.methods.lora_native` (LoRA's skinny products).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["OPENMP", "build_kernel", "cached_kernel", "cpu_flags"]

OPENMP = "-fopenmp"


def cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: a library is built for this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compile(compiler: str, source: Path, target: Path, flags: tuple[str, ...], extra: tuple[str, ...],
             timeout: float) -> None:
    """Build the shared library at `target` (`extra` flags after `flags`), atomically: with OpenMP if the compiler
    has it, and without `-march=native` as the last resort (a compiler that refuses it gets portable code)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    portable = [f for f in flags if f != "-march=native"]
    try:
        errors = ""
        for attempt in ([*flags, OPENMP], [*flags], [*portable, OPENMP], portable):
            cmd = [compiler, *attempt, *extra, str(source), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
            errors = done.stderr.strip()
        raise RuntimeError(f"{compiler} failed: {errors[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(compiler: str, source: Path, target: Path, flags: tuple[str, ...], bind: Callable[[ctypes.CDLL], Any],
          extra: tuple[str, ...], timeout: float) -> Any:
    """`bind` applied to the library at `target`, built first if it is missing or does not load."""
    if target.exists():
        try:
            return bind(ctypes.CDLL(str(target)))
        except (OSError, AttributeError):
            pass  # a damaged or foreign file under our name: build it again
    _compile(compiler, source, target, flags, extra, timeout)
    return bind(ctypes.CDLL(str(target)))


def build_kernel(folder: Path, stem: str, source: Path, flags: tuple[str, ...], bind: Callable[[ctypes.CDLL], Any],
                 extra: tuple[str, ...] = (), timeout: float = 120) -> Any:
    """`bind(library)` for `source` built into `folder` with the `extra` compiler flags (tests build each
    instruction-set path of a kernel this way).

    Raises:
        RuntimeError: the build failed.
    """
    name = hashlib.sha256("\0".join(extra).encode()).hexdigest()[:16]
    return _load(os.environ.get("CC", "cc"), source, folder / f"{stem}-{name}.so", flags, bind, extra, timeout)


def cached_kernel(stem: str, source: Path, flags: tuple[str, ...], bind: Callable[[ctypes.CDLL], Any],
                  what: str, timeout: float = 120) -> tuple[Any | None, str]:
    """Build (if not cached) and load `source`: ``bind(library)`` or None, and why (the library's path, or the
    reason there is none). A failed build warns once, naming `what` the kernel does."""
    if os.environ.get("PEFTKIT_NATIVE", "1") == "0":
        return None, "PEFTKIT_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"built on Linux only, this is {sys.platform}"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH"
    from peftkit.models import cache_dir

    key = hashlib.sha256(b"\0".join(s.encode() for s in (source.read_text(), compiler, *flags, cpu_flags())))
    name = f"{stem}-{key.hexdigest()[:16]}.so"
    # the cache, or where it cannot be written (a read-only home), a folder of this user's in the temp dir
    folders = (cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"peftkit-kernels-{os.getuid()}")
    error: Exception | None = None
    for folder in folders:
        try:
            fn = _load(compiler, source, folder / name, flags, bind, (), timeout)
        except OSError as err:
            error = err
            continue
        except (RuntimeError, AttributeError, subprocess.SubprocessError) as err:
            error = err
            break  # the build itself failed: another folder will not help
        return fn, str(folder / name)
    warnings.warn(f"peftkit: {what} kernel unavailable, using the PyTorch path ({error})", stacklevel=4)
    return None, f"the build failed: {error}"
