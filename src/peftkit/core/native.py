"""peftkit's one native-binding layer: building, verifying and loading its compiled CPU kernels (plain C files, no
PyTorch headers), and the typed handle each binding uses (`Library`).

The system C compiler builds a kernel in well under a second, once per source, shared header
(`kernels/peftkit_native.h`), compiler, flags and CPU. Where the library goes: `peftkit.paths.kernel_folders`
(``$PEFTKIT_CACHE/kernels``, else ``$TMPDIR/peftkit-kernels-<uid>``), each used only if it is private to this user
(created 0700; another owner, a link or group/world write access: refused with a warning, the next folder tried).
A library is written to a temporary name, hashed, renamed to a name holding its hash, and the hash recorded in a
sidecar file (written atomically); before `dlopen` the file's content hash is checked against the sidecar. A file
that does not match, is missing or does not load is built again, never loaded: concurrent processes never load a
half-written library, and a planted or altered one is replaced.

Builds use `-march=native` and `-fopenmp` where the compiler takes them; a kernel's parallel loops then run on the
OpenMP runtime PyTorch has already loaded (same soname). Without a compiler, off Linux, or with
``PEFTKIT_NATIVE=0``, a `Library` has no functions and the caller uses its PyTorch path, which stays the reference.
Bindings: `peftkit.quant.native` (4-bit dequantization), `peftkit.methods.lora_native` (LoRA's skinny products),
`peftkit.train.attention_native` (packed causal attention); their operands are checked by `peftkit.core.operands`.
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
from types import SimpleNamespace
from typing import Any

from peftkit import paths

__all__ = ["HEADER", "OPENMP", "Library", "build_kernel", "cached_kernel", "cpu_flags", "present", "threads"]

OPENMP = "-fopenmp"
HEADER = Path(__file__).with_name("kernels") / "peftkit_native.h"  # included by every kernel


def cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: a library is built for this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def threads() -> int:
    """The threads a kernel call runs on: PyTorch's intra-op thread count."""
    import torch

    return torch.get_num_threads()


def present(kernel: SimpleNamespace | None, what: str) -> SimpleNamespace:
    """`kernel`, which a binding's caller has checked is built (its `usable`); a RuntimeError naming `what` if not."""
    if kernel is None:
        raise RuntimeError(f"{what}: the compiled kernel is unavailable here; use the PyTorch path")
    return kernel


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_key(compiler: str, source: Path, flags: tuple[str, ...], extra: tuple[str, ...]) -> str:
    """What a library is built from: source and header text, compiler, flags, CPU (16 hex digits)."""
    parts = (source.read_text(), HEADER.read_text(), compiler, *flags, "\0extra", *extra, cpu_flags())
    return _digest(b"\0".join(p.encode() for p in parts))[:16]


def _record(folder: Path, name: str) -> Path:
    """The sidecar holding the content hash of the library built for `name` (``<stem>-<key>``)."""
    return folder / f"{name}.sha256"


def _verified(folder: Path, name: str) -> Path | None:
    """The library recorded for `name` if its content hash is the recorded one, else None (build it again)."""
    try:
        recorded = _record(folder, name).read_text().strip()
        library = folder / f"{name}-{recorded[:16]}.so"
        return library if len(recorded) == 64 and _digest(library.read_bytes()) == recorded else None
    except OSError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(compiler: str, source: Path, folder: Path, name: str, flags: tuple[str, ...], extra: tuple[str, ...],
             timeout: float) -> Path:
    """Build `source` into `folder` as ``<name>-<content hash>.so`` and record its hash; the library's path.

    With OpenMP if the compiler has it, and without `-march=native` as the last resort (a compiler that refuses
    it gets portable code). Written to a temporary name first: nothing half-written ever carries the final name."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=name, suffix=".tmp")
    os.close(fd)
    portable = [f for f in flags if f != "-march=native"]
    try:
        errors = ""
        for attempt in ([*flags, OPENMP], [*flags], [*portable, OPENMP], portable):
            cmd = [compiler, *attempt, *extra, f"-I{HEADER.parent}", str(source), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                digest = _digest(Path(tmp).read_bytes())
                library = folder / f"{name}-{digest[:16]}.so"
                os.replace(tmp, library)
                _write_atomically(_record(folder, name), digest)
                return library
            errors = done.stderr.strip()
        raise RuntimeError(f"{compiler} failed: {errors[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(compiler: str, source: Path, folder: Path, stem: str, flags: tuple[str, ...],
          bind: Callable[[ctypes.CDLL], Any], extra: tuple[str, ...], timeout: float) -> tuple[Any, Path]:
    """`bind` applied to the library for `source` in `folder` (checked private first), and the library's path:
    the recorded one if its hash verifies and it loads, else a fresh build."""
    paths.private_folder(folder)
    name = f"{stem}-{_build_key(compiler, source, flags, extra)}"
    library = _verified(folder, name)
    if library is not None:
        try:
            return bind(ctypes.CDLL(str(library.absolute()))), library
        except (OSError, AttributeError):
            pass  # our own file, but it does not load (another toolchain's runtime): build it again
    library = _compile(compiler, source, folder, name, flags, extra, timeout)
    return bind(ctypes.CDLL(str(library.absolute()))), library


def build_kernel(folder: Path, stem: str, source: Path, flags: tuple[str, ...], bind: Callable[[ctypes.CDLL], Any],
                 extra: tuple[str, ...] = (), timeout: float = 120) -> Any:
    """`bind(library)` for `source` built into `folder` with the `extra` compiler flags (tests build each
    instruction-set path of a kernel this way); `folder` gets the same privacy and hash checks as the cache.

    Raises:
        RuntimeError: the build failed.
        paths.UnsafeFolder: `folder` is not private to this user.
    """
    return _load(os.environ.get("CC", "cc"), source, folder, stem, flags, bind, extra, timeout)[0]


def cached_kernel(stem: str, source: Path, flags: tuple[str, ...], bind: Callable[[ctypes.CDLL], Any],
                  what: str, timeout: float = 120) -> tuple[Any | None, str]:
    """Build (if not cached) and load `source`: ``bind(library)`` or None, and why (the library's path, or the
    reason there is none). A failed build warns once, naming `what` the kernel does; so does a refused folder."""
    if os.environ.get("PEFTKIT_NATIVE", "1") == "0":
        return None, "PEFTKIT_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"built on Linux only, this is {sys.platform}"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH"
    error: Exception | None = None
    for folder in paths.kernel_folders():  # the cache, or where it cannot be used, this user's temp folder
        try:
            fn, library = _load(compiler, source, folder, stem, flags, bind, (), timeout)
        except paths.UnsafeFolder as err:
            warnings.warn(f"peftkit: not keeping compiled kernels in an unsafe folder: {err}", stacklevel=4)
            error = err
            continue
        except OSError as err:
            error = err
            continue
        except (RuntimeError, AttributeError, subprocess.SubprocessError) as err:
            error = err
            break  # the build itself failed: another folder will not help
        return fn, str(library)
    warnings.warn(f"peftkit: {what} kernel unavailable, using the PyTorch path ({error})", stacklevel=4)
    return None, f"the build failed: {error}"


_CTYPES: dict[str, Any] = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "int": ctypes.c_int,
                           "f32": ctypes.c_float, "str": ctypes.c_char_p, "void": None}


def _bind_function(library: ctypes.CDLL, signature: str) -> Any:
    """The C function a signature such as ``"peftkit_lora_down: ptr i64 f32 int -> void"`` names, typed by it."""
    symbol, _, types = signature.partition(":")
    args, _, result = types.partition("->")
    fn = getattr(library, symbol.strip())
    fn.argtypes = [_CTYPES[t] for t in args.split()]
    fn.restype = _CTYPES[result.strip()]
    return fn


class Library:
    """One C kernel file and its typed functions, built on first use (`functions`) or None where unavailable.

    `signatures` maps each attribute of the result to a C signature: ``"symbol: argument types -> result type"``
    with the types ``ptr`` (a tensor's data pointer or None), ``i64``, ``int``, ``f32``, ``str`` and ``void``.
    `source`, `flags` and `timeout` may be changed (tests do) before the next `cache_clear`.
    """

    def __init__(self, stem: str, source: Path, flags: tuple[str, ...], signatures: dict[str, str], what: str,
                 timeout: float = 120):
        self.stem, self.source, self.flags, self.what, self.timeout = stem, source, flags, what, timeout
        self.signatures = dict(signatures)
        self._loaded: tuple[SimpleNamespace | None, str] | None = None

    def bind(self, library: ctypes.CDLL) -> SimpleNamespace:
        """The library's functions, typed, as attributes."""
        return SimpleNamespace(**{k: _bind_function(library, s) for k, s in self.signatures.items()})

    def loaded(self) -> tuple[SimpleNamespace | None, str]:
        """The functions (built and loaded once per process) or None, and why (the library's path or the reason)."""
        if self._loaded is None:
            self._loaded = cached_kernel(self.stem, self.source, self.flags, self.bind, self.what, self.timeout)
        return self._loaded

    def functions(self) -> SimpleNamespace | None:
        """The typed functions, or None where the kernel is unavailable (then the caller uses PyTorch)."""
        return self.loaded()[0]

    def cache_clear(self) -> None:
        """Look the kernel up afresh on the next call (environment, source, flags)."""
        self._loaded = None

    def build(self, folder: Path, extra: tuple[str, ...] = ()) -> SimpleNamespace:
        """The functions built into `folder` with the `extra` compiler flags (tests build each code path so).

        Raises:
            RuntimeError: the build failed.
        """
        return build_kernel(folder, self.stem, self.source, self.flags, self.bind, extra, self.timeout)

    def describe(self, compiled: str, fallback: str) -> str:
        """One line for `peftkit info`: `compiled` or `fallback` (what runs instead), and why."""
        kernel, why = self.loaded()
        return (compiled if kernel is not None else fallback) + f" ({why})"

    def status(self, code: int, what: str) -> None:
        """Raise MemoryError if a C function returned non-zero (it could not allocate its work buffers)."""
        if code != 0:
            raise MemoryError(f"{self.what} kernel: no memory for {what}")
